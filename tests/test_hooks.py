"""The libvirt qemu hook: install/uninstall/status, the script as libvirtd runs it, the spool, the unit file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from libvirt_cgrep import hooks
from libvirt_cgrep.cli import run
from libvirt_cgrep.core import protection
from libvirt_cgrep.errors import ConflictError, StateError, UsageError
from tests.conftest import LabFactory

REPO = Path(__file__).resolve().parent.parent
NS = protection.NS
PROTECTED_XML = (
    "<domain type='qemu'><name>db1</name><metadata>"
    f'<cgrep:protection xmlns:cgrep="{NS}" target="/srv/replica" rpo="300"/>'
    "</metadata><devices/></domain>\n"
)
PLAIN_XML = "<domain type='qemu'><name>db1</name><metadata/><devices/></domain>\n"
EVENT_NAME = re.compile(r"^[0-9]+-[0-9]+\.json$")


@pytest.fixture
def inst(tmp_path: Path) -> tuple[Path, Path]:
    """A hooks dir and a spool, both not yet existing, under tmp_path."""
    return tmp_path / "etc" / "hooks", tmp_path / "var" / "spool"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _events(spool: Path) -> list[Path]:
    return sorted(p for p in spool.iterdir() if EVENT_NAME.match(p.name))


def run_hook(script: Path, *args: str, stdin: bytes = PROTECTED_XML.encode()) -> subprocess.CompletedProcess[bytes]:
    """Run the hook the way libvirtd does: exec'ed directly, XML on stdin, args DOMAIN OP SUBOP EXTRA."""
    return subprocess.run(
        [str(script), *args], input=stdin, capture_output=True, timeout=10, check=False, env={"PATH": "/usr/bin:/bin"}
    )


# --- the packaged script -----------------------------------------------------------


def test_repo_hook_is_a_symlink_to_the_packaged_script() -> None:
    link = REPO / "hooks" / "qemu.d" / "virt-cgrep"
    assert link.is_symlink()
    assert os.readlink(link) == "../../libvirt_cgrep/data/qemu-hook.sh"
    assert link.resolve() == (REPO / "libvirt_cgrep" / "data" / "qemu-hook.sh").resolve()
    assert _mode(link.resolve()) & 0o111
    text = hooks.packaged_script()
    assert text == link.read_text()
    assert f"NS={NS}\n" in text
    assert re.findall(r"^SPOOL=.*$", text, re.MULTILINE) == [f"SPOOL={hooks.DEFAULT_SPOOL}"]
    assert hooks.render_script() == text


def test_script_is_posix_sh() -> None:
    script = REPO / "libvirt_cgrep" / "data" / "qemu-hook.sh"
    for shell in ("dash", "bash", "busybox"):
        exe = shutil.which(shell)
        if exe is None:
            continue
        argv = [exe, "sh", "-n", str(script)] if shell == "busybox" else [exe, "-n", str(script)]
        assert subprocess.run(argv, capture_output=True, check=False).returncode == 0, shell


# --- install / uninstall / status ---------------------------------------------------


def test_install_fresh(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    res = hooks.install(hooks_dir, spool)
    script = hooks_dir / "qemu.d" / "virt-cgrep"
    assert res.script == script and res.spool == spool
    assert res.created and res.changed and res.spool_created and res.needs_restart
    assert res.spool_mode_fixed is None
    assert script.is_file() and not script.is_symlink()
    assert _mode(script) == 0o755
    assert script.read_text() == hooks.render_script(spool)
    assert f"\nSPOOL={spool}\n" in script.read_text()
    assert spool.is_dir() and _mode(spool) == 0o700
    assert [p.name for p in (hooks_dir / "qemu.d").iterdir()] == ["virt-cgrep"]  # no temp file left


def test_install_is_idempotent(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    first = hooks.install(hooks_dir, spool)
    before = first.script.stat()
    again = hooks.install(hooks_dir, spool)
    assert not again.created and not again.changed and not again.needs_restart
    assert not again.spool_created and again.spool_mode_fixed is None
    after = first.script.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_install_updates_content_and_mode(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    script = hooks.install(hooks_dir, spool).script
    script.write_text(script.read_text() + "# local edit\n")
    res = hooks.install(hooks_dir, spool)
    assert res.changed and not res.created and not res.needs_restart
    assert script.read_text() == hooks.render_script(spool)
    os.chmod(script, 0o700)
    assert hooks.install(hooks_dir, spool).changed
    assert _mode(script) == 0o755
    # A new spool path is a content change: the SPOOL line is rewritten.
    other = spool.parent / "other"
    res = hooks.install(hooks_dir, other)
    assert res.changed and res.spool_created and f"\nSPOOL={other}\n" in script.read_text()


def test_install_fixes_spool_mode(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    spool.mkdir(parents=True)
    os.chmod(spool, 0o755)
    res = hooks.install(hooks_dir, spool)
    assert not res.spool_created and res.spool_mode_fixed == 0o755
    assert _mode(spool) == 0o700


def test_install_refuses_a_spool_that_is_not_a_directory(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    spool.parent.mkdir(parents=True)
    spool.write_text("x")
    with pytest.raises(StateError):
        hooks.install(hooks_dir, spool)
    assert not (hooks_dir / "qemu.d" / "virt-cgrep").exists()


def test_uninstall_removes_only_our_file(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    hooks.install(hooks_dir, spool)
    other = hooks_dir / "qemu.d" / "10-other"
    other.write_text("#!/bin/sh\nexit 0\n")
    main_hook = hooks_dir / "qemu"
    main_hook.write_text("#!/bin/sh\nexit 0\n")
    (spool / "1-1.json").write_text("{}")
    res = hooks.uninstall(hooks_dir)
    assert res.removed and res.script == hooks_dir / "qemu.d" / "virt-cgrep"
    assert not res.script.exists()
    assert other.read_text() == "#!/bin/sh\nexit 0\n" and main_hook.exists()
    assert (spool / "1-1.json").exists()  # the spool is the agent's, kept
    assert not hooks.uninstall(hooks_dir).removed


def test_foreign_file_is_never_touched(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    script = hooks_dir / "qemu.d" / "virt-cgrep"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n# someone else's\nexit 0\n")
    with pytest.raises(ConflictError):
        hooks.install(hooks_dir, spool)
    with pytest.raises(ConflictError):
        hooks.uninstall(hooks_dir)
    assert script.read_text() == "#!/bin/sh\n# someone else's\nexit 0\n"
    assert not spool.exists()
    assert not hooks.status(hooks_dir).installed


def test_status_before_and_after(inst: tuple[Path, Path]) -> None:
    hooks_dir, spool = inst
    st = hooks.status(hooks_dir, spool)
    assert (st.installed, st.up_to_date, st.spool_exists, st.spool_ok, st.spool_mode, st.pending) == (
        False,
        False,
        False,
        False,
        None,
        0,
    )
    hooks.install(hooks_dir, spool)
    st = hooks.status(hooks_dir)  # the spool is read back from the installed script
    assert st.spool == spool
    assert st.installed and st.up_to_date and st.spool_exists and st.spool_ok and st.spool_mode == 0o700
    assert st.pending == 0
    (spool / "1-1.json").write_text("{}")
    (spool / "2-1.json").write_text("{}")
    (spool / ".3-1.tmp").write_text("")
    assert hooks.status(hooks_dir).pending == 2
    assert not hooks.status(hooks_dir, spool.parent / "elsewhere").up_to_date
    os.chmod(spool, 0o750)
    st = hooks.status(hooks_dir)
    assert st.spool_exists and not st.spool_ok and st.spool_mode == 0o750
    (hooks_dir / "qemu.d" / "virt-cgrep").write_text(hooks.render_script(spool) + "\n")
    assert not hooks.status(hooks_dir).up_to_date
    hooks.uninstall(hooks_dir)
    assert not hooks.status(hooks_dir).installed


def test_spool_path_is_quoted_for_the_shell(tmp_path: Path) -> None:
    hooks_dir, spool = tmp_path / "hooks", tmp_path / "a b'c$(touch x)"
    script = hooks.install(hooks_dir, spool).script
    assert hooks.status(hooks_dir).spool == spool
    r = run_hook(script, "db1", "started", "begin", "-")
    assert r.returncode == 0, r.stderr
    assert len(_events(spool)) == 1
    assert not (tmp_path / "x").exists() and not Path("x").exists()


# --- the CLI --------------------------------------------------------------------------


def test_cli_install_status_uninstall(inst: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    hooks_dir, spool = inst
    where = ["--hooks-dir", str(hooks_dir)]
    assert run(["hooks", "install", *where, "--spool", str(spool)]) == 0
    out = capsys.readouterr().out
    assert f"installed {hooks_dir / 'qemu.d' / 'virt-cgrep'}" in out
    assert f"created spool {spool}" in out
    assert "restart libvirtd" in out and "reload" in out
    assert run(["hooks", "install", *where, "--spool", str(spool)]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "libvirtd" not in out
    assert run(["hooks", "install", *where, "--spool", str(spool), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["created"] is False and doc["changed"] is False and doc["needs_restart"] is False

    assert run(["hooks", "status", *where, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "script": str(hooks_dir / "qemu.d" / "virt-cgrep"),
        "installed": True,
        "up_to_date": True,
        "spool": str(spool),
        "spool_exists": True,
        "spool_mode": "0700",
        "spool_ok": True,
        "pending": 0,
    }
    assert run(["hooks", "status", *where]) == 0
    out = capsys.readouterr().out
    assert "installed:  yes" in out and "up to date: yes" in out and "pending:    0" in out

    assert run(["hooks", "uninstall", *where, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"script": str(hooks_dir / "qemu.d" / "virt-cgrep"), "removed": True}
    assert run(["hooks", "uninstall", *where]) == 0
    assert "was not installed" in capsys.readouterr().out
    assert run(["hooks", "status", *where, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["installed"] is False


def test_cli_foreign_file_is_a_conflict(inst: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    hooks_dir, _ = inst
    (hooks_dir / "qemu.d").mkdir(parents=True)
    (hooks_dir / "qemu.d" / "virt-cgrep").write_text("#!/bin/sh\n")
    assert run(["hooks", "uninstall", "--hooks-dir", str(hooks_dir)]) == 67
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--spool", "spool"],
        ["--spool", "./spool"],
        ["--spool", "../spool"],
        ["--spool", ""],
        ["--spool", "/var/lib/../../tmp/x"],
        ["--spool", "/tmp/a\nb"],
        ["--hooks-dir", "etc/libvirt/hooks"],
        ["--hooks-dir", "/etc/libvirt/../hooks"],
    ],
)
@pytest.mark.parametrize("verb", ["install", "status"])
def test_cli_hostile_paths_are_refused(
    verb: str, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    defaults = {"--hooks-dir": str(tmp_path / "hooks"), "--spool": str(tmp_path / "spool")}
    defaults.pop(args[0])
    argv = ["hooks", verb, *args, *(x for kv in defaults.items() for x in kv)]
    assert run(argv) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("virt-cgrep: error:")
    assert list(tmp_path.iterdir()) == []


def test_hostile_paths_in_the_api() -> None:
    with pytest.raises(UsageError):
        hooks.install(Path("hooks"), Path("/tmp/s"))
    with pytest.raises(UsageError):
        hooks.uninstall(Path("hooks"))
    with pytest.raises(UsageError):
        hooks.render_script(Path("spool"))


# --- the script, run as libvirtd runs it ------------------------------------------------


@pytest.fixture
def installed(inst: tuple[Path, Path]) -> tuple[Path, Path]:
    """(script, spool) of a fresh install in tmp_path."""
    hooks_dir, spool = inst
    return hooks.install(hooks_dir, spool).script, spool


def test_protected_started_writes_one_event(installed: tuple[Path, Path]) -> None:
    script, spool = installed
    t0 = time.time()
    r = run_hook(script, "db1", "started", "begin", "-")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    files = list(spool.iterdir())
    assert len(files) == 1 and EVENT_NAME.match(files[0].name), files
    assert _mode(files[0]) == 0o600
    raw = files[0].read_text()
    assert raw.endswith("\n") and raw.count("\n") == 1
    doc = json.loads(raw)
    assert set(doc) == {"domain", "op", "subop", "time"}
    assert (doc["domain"], doc["op"], doc["subop"]) == ("db1", "started", "begin")
    assert t0 - 1 <= doc["time"] <= time.time() + 1
    ns, pid = files[0].name.removesuffix(".json").split("-")
    assert abs(int(ns) / 1e9 - doc["time"]) < 1e-3 and int(pid) > 0


@pytest.mark.parametrize("op", hooks.OPS)
def test_every_watched_op_writes_an_event(installed: tuple[Path, Path], op: str) -> None:
    script, spool = installed
    assert run_hook(script, "db1", op, "end", "-").returncode == 0
    assert [(e.domain, e.op, e.subop) for e in hooks.read_spool(spool)] == [("db1", op, "end")]


@pytest.mark.parametrize("op", ["prepare", "start", "restore", "attach", "", "started;id"])
def test_other_ops_write_nothing(installed: tuple[Path, Path], op: str) -> None:
    script, spool = installed
    assert run_hook(script, "db1", op, "begin", "-").returncode == 0
    assert list(spool.iterdir()) == []


def test_unprotected_domain_writes_nothing(installed: tuple[Path, Path]) -> None:
    script, spool = installed
    for xml in (PLAIN_XML, "", "urn:x-libvirt-cgrep:protection:2 " + PLAIN_XML):
        assert run_hook(script, "db1", "started", "begin", "-", stdin=xml.encode()).returncode == 0
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize("name", ['we"ird', "back\\slash", "tab\tname", "new\nline", "ctl\x01\x1f\x7f", "é ü 漢", "-rf", "$(id)"])
def test_domain_names_are_json_escaped(installed: tuple[Path, Path], name: str) -> None:
    script, spool = installed
    assert run_hook(script, name, "stopped", "end", "-").returncode == 0
    (f,) = _events(spool)
    assert json.loads(f.read_bytes())["domain"] == name
    assert [e.domain for e in hooks.read_spool(spool)] == [name]


def test_missing_spool_exits_0(installed: tuple[Path, Path]) -> None:
    script, spool = installed
    spool.rmdir()
    r = run_hook(script, "db1", "started", "begin", "-")
    assert r.returncode == 0 and b"cannot write" in r.stderr
    assert not spool.exists()


def test_unwritable_spool_exits_0(tmp_path: Path) -> None:
    # Root ignores permission bits: make the spool's parent a regular file, so nothing can be created.
    (tmp_path / "file").write_text("")
    script = tmp_path / "hook"
    script.write_text(hooks.render_script(tmp_path / "file" / "spool"))
    os.chmod(script, 0o755)
    r = run_hook(script, "db1", "started", "begin", "-")
    assert r.returncode == 0 and b"cannot write" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hook"]


def test_closed_or_empty_stdin_exits_0(installed: tuple[Path, Path]) -> None:
    script, spool = installed
    r = subprocess.run(
        [str(script), "db1", "started", "begin", "-"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False
    )
    assert r.returncode == 0
    r = subprocess.run(f"exec <&- {script} db1 started begin -", shell=True, capture_output=True, timeout=10, check=False)
    assert r.returncode == 0
    assert list(spool.iterdir()) == []


def _feed(script: Path, op: str, data: bytes) -> tuple[int, float]:
    """Write all of ``data`` to the hook's stdin as libvirtd does; BrokenPipeError if it did not drain it."""
    t = time.monotonic()
    proc = subprocess.Popen([str(script), "big", op, "begin", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    rc = proc.wait(timeout=10)
    return rc, time.monotonic() - t


@pytest.mark.parametrize("op", ["started", "prepare"])
def test_large_stdin_is_drained_quickly(installed: tuple[Path, Path], op: str) -> None:
    script, spool = installed
    data = PROTECTED_XML.encode() + b"<!-- " + b"x" * (5 << 20) + b" -->"
    rc, took = _feed(script, op, data)
    assert rc == 0 and took < 1.0, took
    assert len(_events(spool)) == (1 if op == "started" else 0)


def test_only_the_first_mib_is_searched(installed: tuple[Path, Path]) -> None:
    script, spool = installed
    data = b"<domain>" + b" " * (1 << 20) + PROTECTED_XML.encode()
    rc, took = _feed(script, "started", data)
    assert rc == 0 and took < 1.0
    assert list(spool.iterdir()) == []


def test_pathological_stdin_is_still_fast(installed: tuple[Path, Path]) -> None:
    script, spool = installed
    near_miss = NS[:-1].encode() + b"2 "
    rc, took = _feed(script, "started", near_miss * ((5 << 20) // len(near_miss)))
    assert rc == 0 and took < 1.0, took
    assert list(spool.iterdir()) == []


# --- the spool ---------------------------------------------------------------------------


def test_read_and_consume(installed: tuple[Path, Path]) -> None:
    script, spool = installed
    for op in ("stopped", "release", "started"):
        assert run_hook(script, "db1", op, "begin", "-").returncode == 0
    events = hooks.read_spool(spool)
    assert [e.op for e in events] == ["stopped", "release", "started"]
    assert all(e.path.parent == spool for e in events)
    assert [e.time for e in events] == sorted(e.time for e in events)
    assert events[0].as_dict()["domain"] == "db1"
    hooks.consume(spool, events[:2])
    assert [e.op for e in hooks.read_spool(spool)] == ["started"]
    hooks.consume(spool, events)  # already consumed ones are fine
    assert list(spool.iterdir()) == []


def test_malformed_and_foreign_entries(installed: tuple[Path, Path], tmp_path: Path) -> None:
    script, spool = installed
    assert run_hook(script, "good", "started", "begin", "-").returncode == 0
    secret = tmp_path / "secret.json"
    secret.write_text('{"domain": "evil", "op": "started", "subop": "begin", "time": 1}')
    (spool / "10-1.json").symlink_to(secret)
    (spool / "11-1.json").write_text("not json")
    (spool / "12-1.json").write_text('{"domain": "x", "op": "prepare", "subop": "begin", "time": 1}')
    (spool / "13-1.json").write_text('{"domain": "x", "op": "started", "subop": "begin", "time": true}')
    (spool / "14-1.json").write_text('["domain"]')
    (spool / "15-1.json").write_bytes(b'{"domain": "\xff", "op": "started", "subop": "-", "time": 1}')
    (spool / "16-1.json").write_text(
        '{"domain": "big", "op": "started", "subop": "-", "time": 1, "pad": "' + "x" * (70 << 10) + '"}'
    )
    os.mkfifo(spool / "17-1.json")
    (spool / "junk.txt").write_text("x")
    (spool / "adir").mkdir()
    (spool / ".fresh.tmp").write_text("")
    (spool / ".stale.tmp").write_text("")
    old = time.time() - 3600
    os.utime(spool / ".stale.tmp", (old, old))
    events = hooks.read_spool(spool)
    assert [e.domain for e in events] == ["good"]
    left = sorted(p.name for p in spool.iterdir())
    assert left == sorted([".fresh.tmp", "adir", events[0].path.name])
    assert secret.exists()  # the link was removed, never followed
    with pytest.raises(UsageError):
        hooks.consume(spool, [hooks.SpoolEvent("x", "started", "-", 1.0, secret)])
    assert secret.exists()


def test_missing_spool_has_no_events(tmp_path: Path) -> None:
    assert hooks.read_spool(tmp_path / "nope") == []
    hooks.consume(tmp_path / "nope", [])


# --- contrib ------------------------------------------------------------------------------


def test_agent_config_example_is_valid_and_documents_the_defaults() -> None:
    config = pytest.importorskip("libvirt_cgrep.agent.config")
    example = REPO / "contrib" / "agent.toml.example"
    assert config.load(example) == config.AgentConfig()
    text = example.read_text()
    for key in ("concurrency", "margin", "tick", "state_dir", "spool", "alerts_file", "alert_command", "metrics", "log_level"):
        assert re.search(rf"^{key} = ", text, re.MULTILINE), key


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "contrib" / "virt-cgrep-agent.service").read_text()
    exec_start = "ExecStart=/usr/bin/virt-cgrep agent --config /etc/libvirt-cgrep/agent.toml\n"
    assert exec_start in unit
    for line in ("KillMode=process\n", "NoNewPrivileges=yes\n", "ProtectSystem=full\n", "UMask=0077\n", "Restart=on-failure\n"):
        assert line in unit
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    entry = Path(sys.executable).parent / "virt-cgrep"
    copy = tmp_path / "virt-cgrep-agent.service"
    copy.write_text(unit.replace("/usr/bin/virt-cgrep", str(entry)))
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stderr


# --- a real libvirtd ----------------------------------------------------------------------


def _libvirtd_pid() -> int:
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True, check=False).stdout.split()
    if len(out) != 1:
        pytest.skip(f"expected one libvirtd process, found {len(out)}")
    return int(out[0])


def _reload_libvirtd(conn: libvirt.virConnect) -> None:
    """SIGHUP: libvirtd re-scans its hooks (and reloads configs); guests and client connections are kept.

    A restart would do too, but would break every open connection, including
    the test session's and those of other suites sharing this daemon.
    """
    pid = _libvirtd_pid()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:  # the reload runs in a daemon thread: wait until the daemon answers again
        time.sleep(0.5)
        try:
            conn.getVersion()
            conn.listAllDomains(0)
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise


def test_real_libvirtd_runs_the_hook(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    hooks_dir = hooks.DEFAULT_HOOKS_DIR
    script = hooks.script_path(hooks_dir)
    if script.exists() or script.is_symlink():
        pytest.skip(f"{script} exists (a real install?): not touching it")
    made = [d for d in (hooks_dir, hooks_dir / "qemu.d") if not d.exists()]
    spool = tmp_path / "spool"
    vm = lab_vm(disks=1, size=16 << 20, tag="hook", mode="idle")
    dom = conn.lookupByName(vm.name)
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        "<protection target='/x' rpo='60'/>",
        "cgrep",
        NS,
        libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    try:
        res = hooks.install(hooks_dir, spool)
        assert res.needs_restart
        _reload_libvirtd(conn)
        dom.destroy()
        dom.create()
        want = {("stopped", "end"), ("release", "end"), ("started", "begin")}
        deadline = time.monotonic() + 20
        seen: list[tuple[str, str]] = []
        while True:
            # Other suites' protected domains may show up too: keep ours only.
            events = hooks.read_spool(spool)
            seen += [(e.op, e.subop) for e in events if e.domain == vm.name]
            hooks.consume(spool, events)
            if want <= set(seen) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert want <= set(seen), seen
        assert seen.index(("stopped", "end")) < seen.index(("started", "begin"))
        assert dom.isActive()
    finally:
        with contextlib.suppress(Exception):
            hooks.uninstall(hooks_dir)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        _reload_libvirtd(conn)
    assert not script.exists()
    # The daemon no longer runs it: a stop/start leaves the spool empty and works.
    for e in hooks.read_spool(spool):
        assert e.domain != vm.name
    dom.destroy()
    dom.create()
    assert dom.isActive()
    assert [e for e in hooks.read_spool(spool) if e.domain == vm.name] == []
