"""Build the lab guest: a Debian cloud kernel plus a busybox initramfs.

The guest has no root disk.  Its initramfs holds a static busybox, the virtio
block drivers taken from the kernel package, the ``/init`` script and the
``cgrep-workload`` program (both in ``guest/`` next to this module).  Every
virtio disk of the guest is a data disk for the workload.

Everything lives under one cache directory::

    debs/        the downloaded .deb files (kept between builds)
    work/        scratch space of a build (removed after a successful build)
    vmlinuz      the kernel
    initrd.img   the initramfs (gzip-compressed newc cpio)
    stamp        sha256 of the inputs the outputs were built from

A build is skipped when ``stamp`` matches the current inputs and the outputs
exist.  Outputs are world-readable (libvirt's QEMU runs as another user).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from libvirt_cgrep.adapters import proc
from libvirt_cgrep.adapters.fs import save_file
from libvirt_cgrep.errors import LabBuildError

__all__ = [
    "BUILD_VERSION",
    "GuestArtifacts",
    "LabBuildError",
    "build_guest",
    "default_cache_dir",
]

#: Bump when the build recipe changes in a way that alters the outputs.
BUILD_VERSION = "1"

CACHE_ENV = "CGREP_LAB_CACHE"
DEFAULT_CACHE_DIR = Path("/var/cache/libvirt-cgrep/lab")

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Modules copied into the initramfs; guest/init loads them in this order
#: (retrying failures), and has the same list.  virtio needs virtio_ring in 6.1.
MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)

GUEST_DIR = Path(__file__).parent / "guest"
WORKLOAD_SOURCE = GUEST_DIR / "workload.c"
INIT_SCRIPT = GUEST_DIR / "init"

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
STAMP_NAME = "stamp"
LOCK_NAME = ".lock"

_DIR_MODE = 0o755
_FILE_MODE = 0o644
_EXEC_MODE = 0o755

_KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(\d\S*-cloud-amd64)$")


@dataclass(frozen=True)
class GuestArtifacts:
    """The outputs of :func:`build_guest`."""

    kernel: Path
    initrd: Path
    kernel_version: str
    stamp: str
    rebuilt: bool


@dataclass(frozen=True)
class _Deb:
    package: str
    version: str
    path: Path


def default_cache_dir() -> Path:
    """``$CGREP_LAB_CACHE`` when set, else /var/cache/libvirt-cgrep/lab."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return DEFAULT_CACHE_DIR


def _noop_log(_message: str) -> None:
    return None


def build_guest(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    offline: bool = False,
    log: Callable[[str], None] = _noop_log,
) -> GuestArtifacts:
    """Build (or reuse) the lab guest kernel and initramfs.

    ``offline`` reuses the debs already in the cache without asking apt for
    newer versions (fast; what ``lab up`` does); ``virt-cgrep lab build`` asks.

    Raises LabBuildError when a tool is missing, a package cannot be found or
    downloaded, or a build step fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache.absolute()
    try:
        _ensure_dir(cache)
        with _locked(cache / LOCK_NAME):
            return _build_locked(cache, force=force, offline=offline, log=log)
    except OSError as exc:
        raise LabBuildError(_one_line(f"lab build failed: {exc}")) from exc


def _build_locked(cache: Path, *, force: bool, offline: bool, log: Callable[[str], None]) -> GuestArtifacts:
    debs_dir = cache / "debs"
    _ensure_dir(debs_dir)
    kernel_deb, busybox_deb = (_cached_debs(debs_dir) if offline else None) or _ensure_debs(debs_dir, log)
    kernel_version = _kernel_version_of(kernel_deb.package)

    stamp = _compute_stamp([kernel_deb.path, busybox_deb.path])
    kernel_out = cache / KERNEL_NAME
    initrd_out = cache / INITRD_NAME
    stamp_file = cache / STAMP_NAME
    if not force and kernel_out.is_file() and initrd_out.is_file() and _read_stamp(stamp_file) == stamp:
        log(f"lab guest is up to date ({kernel_version}, stamp {stamp[:12]})")
        return GuestArtifacts(kernel_out, initrd_out, kernel_version, stamp, rebuilt=False)

    started = time.monotonic()
    work = cache / "work"
    if work.exists():
        shutil.rmtree(work)
    _ensure_dir(work)

    log(f"extracting {kernel_deb.path.name}")
    kroot = work / "kernel"
    _run(["dpkg-deb", "-x", str(kernel_deb.path), str(kroot)])
    vmlinuz = kroot / "boot" / f"vmlinuz-{kernel_version}"
    if not vmlinuz.is_file():
        raise LabBuildError(f"{kernel_deb.path.name} has no boot/vmlinuz-{kernel_version}")
    modules = _collect_modules(_merged_usr(kroot, f"lib/modules/{kernel_version}"), work / "modules", log)

    log(f"extracting {busybox_deb.path.name}")
    broot = work / "busybox"
    _run(["dpkg-deb", "-x", str(busybox_deb.path), str(broot)])
    busybox = _merged_usr(broot, "bin/busybox")
    if not busybox.is_file():
        raise LabBuildError(f"{busybox_deb.path.name} has no bin/busybox (nor usr/bin/busybox)")

    log("compiling cgrep-workload (gcc -static -O2)")
    workload = work / "cgrep-workload"
    _compile_workload(workload)

    log("assembling initramfs")
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        cpio.add_dir(d)
    cpio.add_char_device("dev/console", 0o600, 5, 1)
    cpio.add_char_device("dev/null", 0o666, 1, 3)
    cpio.add_file("init", INIT_SCRIPT.read_bytes(), _EXEC_MODE)
    cpio.add_file("bin/busybox", busybox.read_bytes(), _EXEC_MODE)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("bin/cgrep-workload", workload.read_bytes(), _EXEC_MODE)
    for name, data in modules:
        cpio.add_file(f"lib/modules/{name}.ko", data, _FILE_MODE)
    image = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)

    save_file(kernel_out, vmlinuz.read_bytes(), _FILE_MODE)
    save_file(initrd_out, image, _FILE_MODE)
    save_file(stamp_file, (stamp + "\n").encode(), _FILE_MODE)
    shutil.rmtree(work, ignore_errors=True)
    log(
        f"built lab guest {kernel_version}: initrd {len(image)} bytes, {len(modules)} modules, {time.monotonic() - started:.1f} s"
    )
    return GuestArtifacts(kernel_out, initrd_out, kernel_version, stamp, rebuilt=True)


# --------------------------------------------------------------------------
# packages


def _ensure_debs(debs_dir: Path, log: Callable[[str], None]) -> tuple[_Deb, _Deb]:
    """The kernel and busybox .debs of apt's candidate versions, downloaded if needed.

    When apt cannot say or fetch them (no package lists, offline), the debs
    already in debs/ are used.
    """
    try:
        kernel_pkg = _kernel_package()
        versions = _candidate_versions([kernel_pkg, BUSYBOX_PACKAGE])
        result: list[_Deb] = []
        for package in (kernel_pkg, BUSYBOX_PACKAGE):
            deb = _find_deb(debs_dir, package, versions[package])
            if deb is None:
                log(f"downloading {package} {versions[package]}")
                deb = _download(debs_dir, package, versions[package])
            else:
                log(f"using cached {deb.path.name}")
            result.append(deb)
    except LabBuildError as exc:
        cached = _cached_debs(debs_dir)
        if cached is None:
            raise
        log(f"{exc}; using the cached {cached[0].path.name} and {cached[1].path.name}")
        return cached
    for deb in result:
        _prune_other_debs(debs_dir, deb)
    return result[0], result[1]


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key.strip() == "Depends" and _KERNEL_PACKAGE_RE.match(value):
            return value
    raise LabBuildError(
        f"no linux-image-*-cloud-amd64 dependency in 'apt-cache depends {KERNEL_META_PACKAGE}' (run 'apt-get update')"
    )


def _candidate_versions(packages: Sequence[str]) -> dict[str, str]:
    """Candidate version of each package, from one `apt-cache policy` call."""
    out = _run(["apt-cache", "policy", *packages])
    versions: dict[str, str] = {}
    current: str | None = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            current = line.rstrip()[:-1]
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "Candidate" and current is not None and current in packages and value and value != "(none)":
            versions[current] = value
    for package in packages:
        if package not in versions:
            raise LabBuildError(f"apt has no candidate version of {package} (run 'apt-get update')")
    return versions


def _kernel_version_of(package: str) -> str:
    m = _KERNEL_PACKAGE_RE.match(package)
    if m is None:
        raise LabBuildError(f"unexpected kernel package name {package!r}")
    return m.group(1)


def _deb_file_name(package: str, version: str) -> str:
    """The name `apt-get download` gives the file (':' of an epoch is '%3a')."""
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def _deb_fields(path: Path) -> tuple[str, str]:
    out = _run(["dpkg-deb", "-f", str(path), "Package", "Version"])
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields.get("Package", ""), fields.get("Version", "")


def _find_deb(debs_dir: Path, package: str, version: str) -> _Deb | None:
    path = debs_dir / _deb_file_name(package, version)
    if not path.is_file():
        return None
    try:
        if _deb_fields(path) == (package, version):
            return _Deb(package, version, path)
    except LabBuildError:
        pass
    path.unlink()  # unreadable or not what its name says: fetch it again
    return None


def _cached_debs(debs_dir: Path) -> tuple[_Deb, _Deb] | None:
    """The newest kernel and busybox debs already in debs/, for offline rebuilds."""
    kernels = sorted(debs_dir.glob("linux-image-*-cloud-amd64_*.deb"), key=lambda p: p.stat().st_mtime)
    busyboxes = sorted(debs_dir.glob(f"{BUSYBOX_PACKAGE}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not kernels or not busyboxes:
        return None
    found: list[_Deb] = []
    for path in (kernels[-1], busyboxes[-1]):
        package, version = _deb_fields(path)
        found.append(_Deb(package, version, path))
    if _KERNEL_PACKAGE_RE.match(found[0].package) is None:
        return None
    return found[0], found[1]


def _download(debs_dir: Path, package: str, version: str) -> _Deb:
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
    try:
        _run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
            cwd=tmp,
        )
        files = list(tmp.glob("*.deb"))
        if len(files) != 1:
            raise LabBuildError(f"apt-get download {package}={version} produced {len(files)} .deb files")
        got = _deb_fields(files[0])
        if got != (package, version):
            raise LabBuildError(f"downloaded {files[0].name} is {got[0]} {got[1]}, wanted {package} {version}")
        final = debs_dir / _deb_file_name(package, version)
        os.chmod(files[0], _FILE_MODE)
        with open(files[0], "rb") as f:
            os.fsync(f.fileno())
        os.replace(files[0], final)
        return _Deb(package, version, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_other_debs(debs_dir: Path, keep: _Deb) -> None:
    """Remove other versions of the same package (kernels: any ABI)."""
    pattern = "linux-image-*-cloud-amd64_*.deb" if keep.package.startswith("linux-image-") else f"{keep.package}_*.deb"
    for path in debs_dir.glob(pattern):
        if path != keep.path:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# build steps


def _compute_stamp(debs: Sequence[Path]) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    add("build-version", BUILD_VERSION.encode())
    for deb in debs:
        add("deb-name", deb.name.encode())
        size = deb.stat().st_size
        h.update(f"deb-data\0{size}\0".encode())
        with open(deb, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    add("workload.c", WORKLOAD_SOURCE.read_bytes())
    add("init", INIT_SCRIPT.read_bytes())
    add("builder", Path(__file__).read_bytes())  # a changed builder rebuilds
    return h.hexdigest()


def _merged_usr(root: Path, rel: str) -> Path:
    """``root/rel``, or ``root/usr/rel`` where the package installs under /usr (merged /usr: Debian 13)."""
    plain = root / rel
    usr = root / "usr" / rel
    return usr if not plain.exists() and usr.exists() else plain


def _read_stamp(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _collect_modules(moddir: Path, outdir: Path, log: Callable[[str], None]) -> list[tuple[str, bytes]]:
    """(name, plain .ko bytes) of each of MODULES found in the kernel package, in order."""
    if not moddir.is_dir():
        raise LabBuildError(f"kernel package has no {moddir.name} module directory")
    builtin = _builtin_modules(moddir)
    index: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        name, _, suffix = path.name.partition(".ko")
        if suffix in ("", ".xz", ".zst", ".gz"):
            index.setdefault(name.replace("-", "_"), path)

    found: list[tuple[str, bytes]] = []
    for name in MODULES:
        module = index.get(name)
        if module is None:
            why = "built into the kernel" if name in builtin else "not in the kernel package"
            log(f"module {name}: {why}, skipped")
            continue
        found.append((name, _decompress_module(module, outdir)))
    if not found and "virtio_blk" not in builtin:
        raise LabBuildError("kernel package has no virtio_blk module and does not build it in")
    return found


def _builtin_modules(moddir: Path) -> set[str]:
    try:
        text = (moddir / "modules.builtin").read_text()
    except OSError:
        return set()
    return {Path(line.strip()).name.partition(".ko")[0].replace("-", "_") for line in text.splitlines() if line}


def _decompress_module(path: Path, outdir: Path) -> bytes:
    """The plain .ko bytes of a module file (busybox insmod takes no compressed modules)."""
    if path.name.endswith(".ko"):
        return path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise LabBuildError(_one_line(f"cannot decompress {path.name}: {exc}")) from exc
    # .ko.zst: no zstd in the Python 3.11 standard library
    _ensure_dir(outdir)
    out = outdir / path.name.removesuffix(".zst")
    _run(["zstd", "-q", "-d", "-f", "-o", str(out), str(path)])
    return out.read_bytes()


def _compile_workload(output: Path) -> None:
    _run(["gcc", "-static", "-O2", "-Wall", "-s", "-o", str(output), str(WORKLOAD_SOURCE)])


class _Cpio:
    """A newc ("070701") cpio archive, written without the cpio tool so that
    device nodes and root ownership need no privileges."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def add_dir(self, name: str, mode: int = _DIR_MODE) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", ino=0, nlink=1)
        return b"".join(self._parts)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if ino is None:
            ino = self._ino
            self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts.append(header + encoded + _pad4(len(header) + len(encoded)))
        self._parts.append(data + _pad4(len(data)))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


# --------------------------------------------------------------------------
# helpers


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run argv in the C locale; LabBuildError with stderr's last line on failure."""
    return proc.run(argv, cwd=cwd, env=dict(os.environ, LC_ALL="C", LANG="C"), error=LabBuildError)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _ensure_dir(path: Path) -> None:
    """Create path and missing parents as 0755 (whatever the umask)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        os.chmod(d, _DIR_MODE)
    if not path.is_dir():
        raise LabBuildError(f"{path} is not a directory")
    if path.stat().st_uid == os.geteuid() and stat.S_IMODE(path.stat().st_mode) != _DIR_MODE:
        os.chmod(path, _DIR_MODE)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds sharing one cache directory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, _FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
