"""protect/unprotect and the agent against real libvirt and real lab guests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.cli import run
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.lab import domain as labdom
from tests.conftest import URI, LabFactory


def metadata(conn: libvirt.virConnect, name: str, live: bool) -> str | None:
    flag = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        xml: str = lv.lookup(conn, name).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, prot.NS, flag)
    except libvirt.libvirtError:
        return None
    return xml


def test_protect_and_unprotect(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    vm = lab_vm(disks=1, tag="prot")
    for bad in (["--rpo", "5x"], ["--rpo", "0s"], ["--rpo", "5m", "--group", "a b"], ["--rpo", "5m", "--keep", "-1"]):
        assert run(["-c", URI, "protect", vm.name, "--target", str(tmp_path), *bad]) == 64
    assert run(["-c", URI, "protect", vm.name, "--target", "relative", "--rpo", "5m"]) == 64
    assert metadata(conn, vm.name, live=True) is None and metadata(conn, vm.name, live=False) is None
    assert run(["-c", URI, "protect", "no-such-domain-y", "--target", str(tmp_path), "--rpo", "5m"]) == 65
    assert run(["-c", URI, "protect", vm.name, "--target", str(tmp_path), "--rpo", "90s", "--group", "g1", "--keep", "3"]) == 0
    for live in (True, False):
        xml = metadata(conn, vm.name, live)
        assert xml is not None
        p = prot.from_xml(xml)
        assert (p.rpo, p.group, p.keep, p.target) == (90, "g1", 3, str(tmp_path))
    assert run(["-c", URI, "unprotect", vm.name]) == 0
    assert metadata(conn, vm.name, live=True) is None and metadata(conn, vm.name, live=False) is None
    assert run(["-c", URI, "unprotect", vm.name]) == 65


@pytest.fixture
def agent_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "agent"
    d.mkdir()
    (d / "agent.toml").write_text(
        f'uri = "{URI}"\nconcurrency = 2\nmargin = 1.0\ntick = 0.1\nstate_dir = "{d}"\nspool = "{d / "spool"}"\n'
        f'alerts_file = "{d / "alerts.jsonl"}"\n'
    )
    yield d


def start_agent(d: Path, group: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "libvirt_cgrep", "agent", "--config", str(d / "agent.toml"), "--only", group],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "agent.log", "ab"),
    )


def stop_agent(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def alerts(d: Path) -> list[dict[str, str]]:
    f = d / "alerts.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def status(d: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "status", "--state-dir", str(d), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def test_agent_holds_a_short_rpo(conn: libvirt.virConnect, lab_vm: LabFactory, agent_dir: Path, tmp_path: Path) -> None:
    """Short version of the RPO soak: 2 disks, a ~10 MB/s writer, RPO 15 s, 60 s; no violation once a point exists."""
    vm = lab_vm(disks=2, tag="rpo", rate=160, bs=65536)
    target = tmp_path / "replica"
    assert run(["-c", URI, "protect", vm.name, "--target", str(target), "--rpo", "15s", "--keep", "5"]) == 0
    proc = start_agent(agent_dir, vm.name)
    samples: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            rows = [r for r in status(agent_dir) if r["group"] == vm.name] if (agent_dir / "agent.db").exists() else []
            if rows:
                samples.append(str(rows[0]["state"]))
    finally:
        rc = stop_agent(proc)
    assert rc == 0
    assert labdom.get(conn, vm.name).state == "running"
    kinds = [a["kind"] for a in alerts(agent_dir) if a["group"] == vm.name]
    # the group starts violated (no point yet), is restored by the first cycle, and stays within its RPO
    assert kinds[:2] == ["rpo-violated", "rpo-restored"], kinds
    assert kinds.count("rpo-violated") == 1, kinds
    first_ok = next(i for i, s in enumerate(samples) if s in ("ok", "at-risk"))
    within = [s for s in samples[first_ok:] if s != "violated"]
    print(f"RPO 15 s for 60 s: {len(within)}/{len(samples[first_ok:])} samples within the RPO; states {set(samples)}")
    assert len(within) == len(samples[first_ok:])
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "verify", str(target), "--write-order", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert all(v["ok"] for v in json.loads(out.stdout))
    hist = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "history", vm.name, "--state-dir", str(agent_dir), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    cycles = json.loads(hist.stdout)["cycles"]
    assert len(cycles) >= 5 and all(c["ok"] for c in cycles)


def test_unreachable_target_alerts_in_pairs(
    conn: libvirt.virConnect, lab_vm: LabFactory, agent_dir: Path, tmp_path: Path
) -> None:
    vm = lab_vm(disks=1, tag="unr")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the target's parent directory should be")
    target = blocker / "replica"
    assert run(["-c", URI, "protect", vm.name, "--target", str(target), "--rpo", "5s"]) == 0
    proc = start_agent(agent_dir, vm.name)
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            rows = [r for r in status(agent_dir) if r["group"] == vm.name] if (agent_dir / "agent.db").exists() else []
            if rows and int(rows[0]["failures"]) >= 2:  # type: ignore[call-overload]
                break
            time.sleep(0.3)
        assert rows and rows[0]["state"] == "violated" and rows[0]["last_error"]
        blocker.unlink()  # the target becomes reachable
        end = time.monotonic() + 60
        while time.monotonic() < end and "rpo-restored" not in [a["kind"] for a in alerts(agent_dir) if a["group"] == vm.name]:
            time.sleep(0.3)
    finally:
        assert stop_agent(proc) == 0
    kinds = [a["kind"] for a in alerts(agent_dir) if a["group"] == vm.name]
    assert kinds == ["rpo-violated", "rpo-restored"], kinds
    assert labdom.get(conn, vm.name).state == "running"
