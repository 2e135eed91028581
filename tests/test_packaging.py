"""The Debian package (issue #19): 'make deb' builds it out of tree; its contents, control data and lintian
are checked, and it runs from a scratch root with Debian's python3 and Debian's python3 modules.

Builds once per module (about 10 s; lintian about 6 s). The slow tier also installs the package with apt
into a fresh container of the other Debian release and uses it (scripts/deb-check: a lab VM, a point, a sync);
'make deb-check' does that on both releases.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")
# what the package must hold (regexes over 'dpkg-deb -c' paths; the unit's dir differs by release)
EXPECTED = {
    r"\./usr/bin/virt-cgrep": "-rwxr-xr-x",
    r"\./etc/libvirt/hooks/qemu\.d/virt-cgrep": "-rwxr-xr-x",
    r"\./(usr/)?lib/systemd/system/virt-cgrep-agent\.service": "-rw-r--r--",
    r"\./etc/libvirt-cgrep/agent\.toml": "-rw-r--r--",
    r"\./usr/share/doc/virt-cgrep/examples/agent\.toml\.example": "-rw-r--r--",
    r"\./usr/share/man/man1/virt-cgrep\.1\.gz": "-rw-r--r--",
    r"\./usr/share/bash-completion/completions/virt-cgrep": "-rw-r--r--",
    r"\./usr/lib/python3/dist-packages/libvirt_cgrep/cli/__init__\.py": "-rw-r--r--",
    r"\./usr/lib/python3/dist-packages/libvirt_cgrep/data/qemu-hook\.sh": "-rwxr-xr-x",
    r"\./usr/lib/python3/dist-packages/virt_cgrep_vendor\.pth": "-rw-r--r--",
    r"\./usr/share/virt-cgrep/vendor/qemu/qmp/qmp_client\.py": "-rw-r--r--",
    r"\./usr/share/doc/virt-cgrep/examples/prometheus/virt-cgrep\.rules\.yml": "-rw-r--r--",
    r"\./usr/share/doc/virt-cgrep/examples/grafana/virt-cgrep\.json": "-rw-r--r--",
}
DEPENDS = [
    "python3-libvirt",
    "python3-lxml",
    "python3-prometheus-client",
    "python3-zstandard",
    "qemu-system-x86 | qemu-system",
    "qemu-utils",
    "libvirt-daemon-system",
    "openssh-client",
]
# what a build must never leave in the checkout
BUILD_LEFTOVERS = ["debian/.debhelper", "debian/virt-cgrep", "debian/files", "debian/debhelper-build-stamp", ".pybuild"]

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-buildpackage") is None
    or not Path("/usr/share/perl5/Debian/Debhelper/Buildsystem/pybuild.pm").exists()
    or not DEBIAN_PYTHON.exists(),
    reason="dpkg-buildpackage, debhelper or dh-python missing: 'make deps' (or 'make deb-deps') installs them",
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    before = _digest(ROOT / "pyproject.toml")
    proc = subprocess.run([str(ROOT / "scripts/build-deb"), str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _digest(ROOT / "pyproject.toml") == before
    assert [p for p in BUILD_LEFTOVERS if (ROOT / p).exists()] == []
    debs = list(out.glob("virt-cgrep_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def test_deb_holds_the_cli_hook_unit_config_man_completion(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    entries = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    for pattern, mode in EXPECTED.items():
        found = [p for p in entries if re.fullmatch(pattern, p)]
        assert found, pattern
        assert entries[found[0]] == mode, (found[0], entries[found[0]])
    assert not [p for p in entries if "/tests/" in p or p.endswith(".pyc")]


def test_deb_control_data(deb: Path) -> None:
    fields = {
        f: subprocess.run(["dpkg-deb", "-f", str(deb), f], capture_output=True, text=True, check=True).stdout.strip()
        for f in ("Package", "Architecture", "Depends")
    }
    assert fields["Package"] == "virt-cgrep" and fields["Architecture"] == "all"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    for want in DEPENDS:
        assert want in depends, (want, depends)


def test_deb_unit_is_not_enabled_nor_started_and_etc_files_are_conffiles(deb: Path, tmp_path: Path) -> None:
    ctrl = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctrl)], check=True)
    postinst = (ctrl / "postinst").read_text()
    # --no-enable: 'enable' only refreshes the links of a unit the admin enabled (debian-installed), never a new one
    systemd = postinst[postinst.index("dh_installsystemd") :]
    assert "deb-systemd-helper debian-installed 'virt-cgrep-agent.service'" in systemd.split("deb-systemd-helper enable")[0]
    assert "deb-systemd-invoke start" not in postinst
    assert "install -d -m 0700" in postinst  # the state dir and the hook's spool
    conffiles = (ctrl / "conffiles").read_text().split()
    assert {"/etc/libvirt/hooks/qemu.d/virt-cgrep", "/etc/libvirt-cgrep/agent.toml"} <= set(conffiles)


def test_lintian_reports_no_error(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian missing: 'make deps' installs it")
    out = subprocess.run(["lintian", "--no-tag-display-limit", str(deb)], capture_output=True, text=True, check=False)
    tags = [line for line in out.stdout.splitlines() if re.match(r"[EWI]: ", line)]
    print("lintian:", *tags, sep="\n  ")
    assert not [t for t in tags if t.startswith("E: ")], out.stdout
    assert out.returncode == 0, out.stdout + out.stderr


def test_runs_from_a_scratch_root_with_debians_python(deb: Path, tmp_path: Path) -> None:
    """dpkg -x, then the installed /usr/bin/virt-cgrep and every module under Debian's python3 and modules."""
    root = tmp_path / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    vendor = (root / "usr/lib/python3/dist-packages/virt_cgrep_vendor.pth").read_text().strip()
    assert vendor == "/usr/share/virt-cgrep/vendor"
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        # the .pth names the installed path: in a scratch root both dirs go on PYTHONPATH by hand
        "PYTHONPATH": f"{root}/usr/lib/python3/dist-packages:{root}{vendor}",
    }
    version = subprocess.run(
        [str(DEBIAN_PYTHON), str(root / "usr/bin/virt-cgrep"), "--version"], capture_output=True, text=True, env=env, check=False
    )
    assert version.returncode == 0 and version.stdout.startswith("virt-cgrep "), version.stdout + version.stderr
    code = (
        "import importlib, pkgutil, libvirt_cgrep, qemu.qmp\n"
        f"assert libvirt_cgrep.__file__.startswith({str(root)!r}) and qemu.qmp.__file__.startswith({str(root)!r})\n"
        "names = [m.name for m in pkgutil.walk_packages(libvirt_cgrep.__path__, 'libvirt_cgrep.')]\n"
        "for n in names:\n"
        "    if not n.endswith('__main__'):\n"
        "        importlib.import_module(n)\n"
        "print(len(names))\n"
    )
    imported = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
    )
    assert imported.returncode == 0, imported.stderr
    assert int(imported.stdout) > 50
    hook = root / "etc/libvirt/hooks/qemu.d/virt-cgrep"
    assert hook.read_bytes() == (ROOT / "libvirt_cgrep/data/qemu-hook.sh").read_bytes()
    assert os.access(hook, os.X_OK)
    page = subprocess.run(["zcat", str(root / "usr/share/man/man1/virt-cgrep.1.gz")], capture_output=True, check=True).stdout
    assert page == (ROOT / "man/virt-cgrep.1").read_bytes()


def test_debian_version_is_the_package_version() -> None:
    """debian/changelog's newest entry names the version the code reports (a native package: no revision)."""
    from libvirt_cgrep import __version__

    head = (ROOT / "debian/changelog").read_text().splitlines()[0]
    m = re.match(r"libvirt-cgrep \(([^)]+)\) ", head)
    assert m is not None, head
    assert m.group(1) == __version__, "bump debian/changelog (dch -v VERSION) with libvirt_cgrep.__version__"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CGREP_PLATFORM") is not None, reason="already inside a release container")
def test_deb_installs_into_the_other_release_and_runs_a_point_and_a_sync() -> None:
    """apt-get install of the .deb built there, --version, man, hook, unit, then a point and a sync with it."""
    other = subprocess.run([str(ROOT / "scripts/platform"), "other"], capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.run(
        [str(ROOT / "scripts/platform"), "run", other, "--", "scripts/deb-check"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "deb-check: passed" in proc.stdout
