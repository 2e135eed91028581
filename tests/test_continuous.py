"""Continuous mode against real libvirt, a real lab guest, a real qemu-storage-daemon, local and over loopback ssh."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.agent.continuous import read_sidecar
from libvirt_cgrep.core import continuous as cc
from libvirt_cgrep.engine.libvirt_backend import disks_of
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.build import GuestArtifacts
from tests.conftest import SSHD, URI, GroupFactory, LabFactory, wait_progress
from tests.test_agent import agent_dir
from tests.test_agent_faults import (
    PrivateLibvirtd,
    cgrep,
    is_running,
    kinds,
    launch,
    point_ids,
    private_libvirtd,
    up_on,
    verify_all,
    wait_for,
)

__all__ = ["agent_dir", "private_libvirtd"]  # fixtures, re-exported for pytest


def cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", URI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def no_jobs(conn: libvirt.virConnect, name: str) -> bool:
    dom = lv.lookup(conn, name)
    return all(not dom.blockJobInfo(d.target, 0) for d in disks_of(lv.live_xml(dom)))


def verify(target: str, *point_ids: object) -> list[dict[str, Any]]:
    res: list[dict[str, Any]] = json.loads(cli("verify", target, "--write-order", "--json", check=False).stdout)
    return [r for r in res if not point_ids or r["point_id"] in point_ids]


def test_continuous_points_are_consistent(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """4 disks, 12 points cut on the replica side, --keep 10 (2 merged in the daemon): the 10 kept all write-order
    consistent and fresh, the primary's chains unchanged, no job left."""
    vm = lab_vm(disks=4, tag="cont")
    wait_progress(vm.directory / "console.log", records=10)
    chains = [d.chain for d in disks_of(lv.live_xml(lv.lookup(conn, vm.name)))]
    target = str(tmp_path / "replica")
    out = cli("continuous", vm.name, "--target", target, "--interval", "1s", "--count", "12", "--keep", "10", "--json")
    evs = events(out.stdout)
    pts = [e for e in evs if e["event"] == "point"]
    assert [e["event"] for e in evs if e["event"] != "progress"][:2] == ["syncing", "in-sync"] and len(pts) == 12
    assert sum(len(e["pruned"]) for e in pts) == 2
    res = verify(target)
    assert [r["point_id"] for r in res] == [e["point_id"] for e in pts[2:]]
    bad = [r for r in res if not (r["ok"] and r["write_order"]["consistent"])]
    assert not bad, bad
    maxes = [int(r["write_order"]["max"]) for r in res]
    assert maxes == sorted(maxes) and maxes[-1] > maxes[0]  # fresh: every point newer than the one before
    assert [d.chain for d in disks_of(lv.live_xml(lv.lookup(conn, vm.name)))] == chains
    assert no_jobs(conn, vm.name)
    assert labdom.get(conn, vm.name).state == "running"
    cuts = sorted(float(e["cut_ms"]) for e in pts)
    lat = sorted(float(e["write_ms"]) for e in pts if e["write_ms"] is not None)
    assert len(lat) >= 10 and lat[0] > 0, pts  # the guest writes all along: every interval has its mean latency
    print(
        f"continuous 4 disks: 10/10 consistent; replica cut median {cuts[6]:.1f} ms, max {cuts[-1]:.1f} ms; "
        f"guest write latency (mirrored) median {lat[len(lat) // 2]:.2f} ms"
    )
    # nothing uncommitted stays on the replica
    assert not list(Path(target).glob("*/disks/*/*/.staging-*"))


def test_negative_control_split_cut_shows_holes(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """The same replica-side cut, but one transaction per disk 250 ms apart: the checker must find holes.

    (50 ms apart, as in the prototype, gave 2/5 under a load average of 20: the starved guest wrote too few records
    in between; 250 ms keeps the control's power under load.)"""
    vm = lab_vm(disks=4, tag="contneg")
    wait_progress(vm.directory / "console.log", records=10)
    target = str(tmp_path / "replica")
    env = {"CGREP_FAULT_SPLIT_CUT_MS": "250"}
    cli("continuous", vm.name, "--target", target, "--interval", "1s", "--count", "4", "--json", env=env)
    res = verify(target)
    assert len(res) == 4
    broken = [r for r in res if not r["write_order"]["consistent"]]
    print(f"negative control (per-disk transactions 250 ms apart): {len(broken)}/4 NOT consistent")
    assert len(broken) >= 3


class Runner:
    """``virt-cgrep continuous`` in the background, its JSON events read as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "libvirt_cgrep", "-c", URI, "continuous", *args, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events: list[dict[str, Any]] = []

    def wait_for(self, kind: str, n: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while sum(e["event"] == kind for e in self.events) < n:
            assert time.monotonic() < end, f"no {kind} event: {self.events}"
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"continuous ended (exit {self.proc.wait()}) before {kind}: {self.events} {err}")
            ev = json.loads(line)
            ev["t"] = time.monotonic()
            self.events.append(ev)
        return [e for e in self.events if e["event"] == kind][n - 1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()


@pytest.fixture
def runs() -> Iterator[Callable[..., Runner]]:
    """Factory of :class:`Runner`; every run still going when the test ends (passed or failed) is stopped."""
    made: list[Runner] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Runner:
        made.append(Runner(*args, env=env))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def status(d: Path) -> list[dict[str, Any]]:
    """The agent's status rows ([] before its state database exists)."""
    from tests.test_agent import status as agent_status

    return agent_status(d) if (d / "agent.db").exists() else []


def assert_guest_writes(vm: labdom.LabDomain, within: float) -> None:
    """The guest goes on acknowledging writes (no I/O error, not blocked past ``within`` seconds)."""
    wait_progress(vm.directory / "console.log", records=5, timeout=within)
    assert "error" not in (vm.directory / "console.log").read_text(errors="replace").lower()[-4000:]


@pytest.mark.slow
def test_over_ssh_and_link_cut(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path, ssh_env: SSHD) -> None:
    """NBD through an OpenSSH unix-socket forwarding; cutting the link (killing it) degrades within 1 s, guest unharmed."""
    vm = lab_vm(disks=2, tag="contssh")
    target = ssh_env.target(tmp_path / "replica")
    r = Runner(vm.name, "--target", target, "--interval", "1s")
    try:
        syncing = r.wait_for("syncing")
        r.wait_for("point", 3)
        t_cut = time.monotonic()
        os.kill(int(syncing["forwarder_pid"]), signal.SIGKILL)
        degraded = r.wait_for("degraded", timeout=30)
        assert float(degraded["t"]) - t_cut < 1.0, degraded
        assert r.proc.wait(timeout=60) == 66
    finally:
        r.stop()
    assert_guest_writes(vm, 10)
    assert no_jobs(conn, vm.name)
    res = verify(str(tmp_path / "replica"))
    assert len(res) >= 3 and all(x["ok"] and x["write_order"]["consistent"] for x in res)


@pytest.mark.slow
def test_replica_killed(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """The replica's daemon killed: degraded within 1 s (block-job events), guest unharmed, committed points intact."""
    vm = lab_vm(disks=2, tag="contkill")
    target = str(tmp_path / "replica")
    r = Runner(vm.name, "--target", target, "--interval", "1s")
    try:
        syncing = r.wait_for("syncing")
        r.wait_for("point", 2)
        t_kill = time.monotonic()
        os.kill(int(syncing["daemon_pid"]), signal.SIGKILL)
        degraded = r.wait_for("degraded", timeout=30)
        assert float(degraded["t"]) - t_kill < 1.0, degraded
        assert r.proc.wait(timeout=60) == 66
    finally:
        r.stop()
    assert_guest_writes(vm, 10)
    assert no_jobs(conn, vm.name)
    res = verify(target)
    assert len(res) >= 2 and all(x["ok"] and x["write_order"]["consistent"] for x in res)
    assert not list(Path(target).glob("*/disks/*/*/.staging-*"))


@pytest.mark.slow
def test_replica_hung(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """SIGSTOP of the daemon: the link is broken within --replica-timeout, guest writes resume, no I/O error."""
    vm = lab_vm(disks=2, tag="conthung")
    target = str(tmp_path / "replica")
    r = Runner(vm.name, "--target", target, "--interval", "1s", "--replica-timeout", "2s")
    pid = 0
    try:
        pid = int(r.wait_for("syncing")["daemon_pid"])
        r.wait_for("point", 2)
        t_stop = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        degraded = r.wait_for("degraded", timeout=30)
        blocked = float(degraded["t"]) - t_stop
        print(f"hung replica: link broken {blocked:.2f} s after SIGSTOP (timeout 2 s)")
        assert blocked < 2.5, degraded
        assert r.proc.wait(timeout=60) == 66
    finally:
        r.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert_guest_writes(vm, 5)
    assert no_jobs(conn, vm.name)
    res = verify(target)
    assert len(res) >= 2 and all(x["ok"] and x["write_order"]["consistent"] for x in res)


# slow tier: over the default tier's time budget (about 3 min under load). Continuous mode is retried only after
# 20 s, and RPO 10 s makes a snapshot-mode cycle due before that: the fallback must ship.
@pytest.mark.slow
def test_agent_continuous_falls_back_and_returns(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """protect --mode continuous: the agent mirrors and takes points; a killed replica alerts within 1 s, snapshot
    cycles take over, continuous mode comes back by itself; status shows mode and mirror state."""
    from tests.test_agent import alerts, stop_agent

    vm = lab_vm(disks=2, tag="contag")
    d = tmp_path / "agent"
    d.mkdir()
    run_dir = Path(tempfile.mkdtemp(prefix="cgt-run-"))  # QEMU's user must traverse it (pytest's tmp dirs are 0700)
    run_dir.chmod(0o711)
    (d / "agent.toml").write_text(
        f'uri = "{URI}"\nconcurrency = 2\nmargin = 1.0\ntick = 0.1\nstate_dir = "{d}"\nspool = "{d / "spool"}"\n'
        f'alerts_file = "{d / "alerts.jsonl"}"\n'
    )
    target = str(tmp_path / "replica")
    cli("protect", vm.name, "--target", target, "--rpo", "10s", "--mode", "continuous", "--interval", "2s", "--keep", "50")
    agent = subprocess.Popen(
        [sys.executable, "-m", "libvirt_cgrep", "agent", "--config", str(d / "agent.toml"), "--only", vm.name],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "agent.log", "ab"),  # noqa: SIM115
        env={**os.environ, "CGREP_RUN_DIR": str(run_dir), "CGREP_CONTINUOUS_RETRY_S": "20"},
    )
    try:
        end = time.monotonic() + 120
        while not (status(d) and status(d)[0]["mirror"] == "in-sync" and status(d)[0]["newest_point"]):
            assert time.monotonic() < end, (d / "agent.log").read_text()[-2000:]
            time.sleep(0.5)
        row = status(d)[0]
        assert row["mode"] == "continuous"
        qsd = subprocess.run(
            ["pgrep", "-f", f"qemu-storage-daemon.*{run_dir}"], capture_output=True, text=True, check=False
        ).stdout.split()
        assert len(qsd) == 1
        t_kill = time.time()
        os.kill(int(qsd[0]), signal.SIGKILL)
        while not any(a["kind"] == "continuous-degraded" for a in alerts(d)):
            assert time.time() < t_kill + 10, alerts(d)
            time.sleep(0.05)
        delay = time.time() - t_kill
        print(f"agent: continuous-degraded alert {delay:.2f} s after the replica was killed")
        assert delay < 1.0 + 0.2  # the poll above adds up to 50 ms
        # snapshot fallback, then continuous again by itself
        end = time.monotonic() + 120
        while not any(a["kind"] == "continuous-restored" for a in alerts(d)):
            assert time.monotonic() < end, (alerts(d), (d / "agent.log").read_text()[-2000:])
            time.sleep(0.5)
        hist = json.loads(cli("history", vm.name, "--state-dir", str(d), "--json").stdout)
        cycles = [(c["ok"], c["bytes"], c.get("point_id"), c.get("error")) for c in hist["cycles"]]
        assert any(ok and (b or 0) > 0 for ok, b, _, _ in cycles), cycles  # a snapshot-mode cycle ran meanwhile
    finally:
        assert stop_agent(agent) == 0
        shutil.rmtree(run_dir, ignore_errors=True)
    assert no_jobs(conn, vm.name)
    assert not subprocess.run(["pgrep", "-f", f"qemu-storage-daemon.*{run_dir}"], capture_output=True, check=False).stdout
    res = verify(target)
    assert res and all(x["ok"] and x["write_order"]["consistent"] for x in res)


@pytest.mark.slow
def test_retention_merges_in_the_daemon(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """--keep 3 while serving: this session's points merge in the daemon (block-commit, exports live); a snapshot-mode
    point from before is merged as usual; every kept point stays consistent and checksummed."""
    vm = lab_vm(disks=2, tag="contkeep")
    target = str(tmp_path / "replica")
    cli("sync", vm.name, "--target", target)  # an older, snapshot-mode point
    out = cli("continuous", vm.name, "--target", target, "--interval", "1s", "--count", "7", "--keep", "3", "--json")
    pts = [e for e in events(out.stdout) if e["event"] == "point"]
    assert sum(len(e["pruned"]) for e in pts) == 5
    res = verify(target)
    assert [r["point_id"] for r in res] == [e["point_id"] for e in pts[-3:]]
    assert all(r["ok"] and r["write_order"]["consistent"] for r in res), res
    first = json.loads(cli("points", target, "--json").stdout)[0]
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", first["disks"][0]["image"]], capture_output=True, check=True).stdout
    )
    assert "backing-filename" not in info  # the oldest kept point became a base
    assert not list(Path(target).glob("*/prune-*")) and not list(Path(target).glob("*/disks/*/*/.staging-*"))


def test_over_ssh_replica_hung(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path, ssh_env: SSHD) -> None:
    """NBD through an OpenSSH unix-socket forwarding; SIGSTOP of the far daemon: the forwarder is killed within
    --replica-timeout, the jobs fail, the guest goes on with no I/O error, committed points stay consistent."""
    vm = lab_vm(disks=2, tag="contsshh")
    target = ssh_env.target(tmp_path / "replica")
    r = Runner(vm.name, "--target", target, "--interval", "1s", "--replica-timeout", "2s")
    pid = 0
    try:
        syncing = r.wait_for("syncing")
        pid = int(syncing["daemon_pid"])  # loopback: the far side is this host
        assert syncing["forwarder_pid"]
        r.wait_for("point", 3)
        t_stop = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        degraded = r.wait_for("degraded", timeout=30)
        blocked = float(degraded["t"]) - t_stop
        print(f"hung replica over ssh: link broken {blocked:.2f} s after SIGSTOP (timeout 2 s)")
        assert blocked < 2.5, degraded
        assert r.proc.wait(timeout=60) == 66
    finally:
        r.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert_guest_writes(vm, 5)
    assert no_jobs(conn, vm.name)
    res = verify(str(tmp_path / "replica"))
    assert len(res) >= 3 and all(x["ok"] and x["write_order"]["consistent"] for x in res)


@pytest.mark.slow
def test_hundred_points_four_disks(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """100 continuous points at 4 disks: 100/100 write-order consistent and fresh (each newer than the last)."""
    vm = lab_vm(disks=4, tag="cont100")
    target = str(tmp_path / "replica")
    cli("continuous", vm.name, "--target", target, "--interval", "1s", "--count", "100", "--json", timeout=1800)
    res = verify(target)
    good = [r for r in res if r["ok"] and r["write_order"]["consistent"]]
    maxes = [int(r["write_order"]["max"]) for r in res]
    fresh = sum(b > a for a, b in itertools.pairwise(maxes)) + 1
    print(f"continuous 4 disks: {len(good)}/{len(res)} consistent, {fresh}/{len(res)} fresh")
    assert len(res) == 100 and len(good) == 100 and fresh == 100


@pytest.mark.slow
def test_hundred_points_two_vm_group(lab_group: GroupFactory, tmp_path: Path) -> None:
    """A 2-VM group (cross-VM dependent writes through the relay) in one daemon: 100/100 group points consistent."""
    grp = lab_group(vms=2, disks=2, tag="contgrp")
    a, b = (m.name for m in grp.members)
    target = str(tmp_path / "replica")
    cli("continuous", a, b, "--set", grp.name, "--target", target, "--interval", "1s", "--count", "100", "--json", timeout=1800)
    res = verify(target)
    good = [r for r in res if r["ok"] and r["write_order"]["consistent"]]
    print(f"continuous 2-VM group: {len(good)}/{len(res)} consistent")
    assert len(res) == 100 and len(good) == 100


@pytest.mark.slow
def test_agent_restarts_mirrors_after_domain_restart(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """A protected domain stopped in sync, then started again: a final point, mirror ``stopped``, an informational
    ``continuous-stopped`` alert (no ``continuous-degraded``); back in sync by itself without a full recopy, with
    ``continuous-restored``. Destroyed while writing: either the same, or (the replica differs) a degraded alert and
    a full resync; continuous mode is back either way."""
    from tests.test_agent import alerts, stop_agent

    vm = lab_vm(disks=2, tag="contrst")
    d = tmp_path / "agent"
    d.mkdir()
    run_dir = Path(tempfile.mkdtemp(prefix="cgt-run-"))
    run_dir.chmod(0o711)
    (d / "agent.toml").write_text(
        f'uri = "{URI}"\nconcurrency = 2\nmargin = 1.0\ntick = 0.1\nstate_dir = "{d}"\nspool = "{d / "spool"}"\n'
        f'alerts_file = "{d / "alerts.jsonl"}"\n'
    )
    target = str(tmp_path / "replica")
    cli("protect", vm.name, "--target", target, "--rpo", "1m", "--mode", "continuous", "--interval", "2s")
    agent = subprocess.Popen(
        [sys.executable, "-m", "libvirt_cgrep", "agent", "--config", str(d / "agent.toml"), "--only", vm.name],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "agent.log", "ab"),  # noqa: SIM115
        env={**os.environ, "CGREP_RUN_DIR": str(run_dir), "CGREP_CONTINUOUS_RETRY_S": "20"},
    )
    try:
        end = time.monotonic() + 120
        while not (status(d) and status(d)[0]["mirror"] == "in-sync" and status(d)[0]["newest_point"]):
            assert time.monotonic() < end, (d / "agent.log").read_text()[-2000:]
            time.sleep(0.5)
        dom = lv.lookup(conn, vm.name)
        _stop_clean(conn, vm.name)
        wait_for("mirror stopped", lambda: sidecar(d).get("mirror") == "stopped", 60)
        final = sidecar(d)["last_point"]
        assert [a["kind"] for a in alerts(d) if a["kind"].startswith("continuous-")] == ["continuous-stopped"], alerts(d)
        dom.create()
        wait_for("a point after the restart", lambda: sidecar(d).get("last_point") not in (None, final), 120)
        assert sidecar(d)["mirror"] == "in-sync" and sidecar(d)["resumed_from"] == final, sidecar(d)
        wait_for("continuous-restored", lambda: "continuous-restored" in [a["kind"] for a in alerts(d)], 10)
        kinds_now = [a["kind"] for a in alerts(d) if a["kind"].startswith("continuous-")]
        assert kinds_now == ["continuous-stopped", "continuous-restored"], alerts(d)
        # destroyed while the guest writes: a final point if both sides still match, else degraded and a full resync
        last = sidecar(d)["last_point"]
        dom.destroy()
        wait_for("mirror stopped or degraded", lambda: sidecar(d).get("mirror") in ("stopped", "degraded"), 60)
        dirty = sidecar(d)["mirror"]
        dom.create()
        wait_for("a point after the second restart", lambda: sidecar(d).get("last_point") not in (None, last), 180)
        # either way it ends with an alert and continuous mode restored by itself
        wait_for("a second continuous-restored", lambda: [a["kind"] for a in alerts(d)].count("continuous-restored") == 2, 180)
        if dirty == "stopped":
            assert sidecar(d)["resumed_from"] is not None, sidecar(d)
        print(
            f"agent: a clean stop resumed without an alert; a destroy while writing ended {dirty}; "
            f"copied {sidecar(d)['copied_bytes']} B at the second restart"
        )
    finally:
        assert stop_agent(agent) == 0
        shutil.rmtree(run_dir, ignore_errors=True)
    assert no_jobs(conn, vm.name)
    res = verify(target)
    assert res and all(x["ok"] and x["write_order"]["consistent"] for x in res)


def test_agent_continuous_libvirtd_restarted(
    private_libvirtd: PrivateLibvirtd, guest: GuestArtifacts, agent_dir: Path, tmp_path: Path
) -> None:
    """libvirtd restarted under a group in continuous mode (a private libvirtd: the machine's one stays up):
    a continuous-degraded alert, no guest I/O error, no corrupt point, continuous mode back in sync by itself and
    new points consistent."""
    from tests.test_agent import alerts, stop_agent

    daemon = private_libvirtd
    pconn = libvirt.open(daemon.uri)
    vm = up_on(pconn, guest, 2, "contlrst")
    run_dir = Path(tempfile.mkdtemp(prefix="cgt-run-"))
    run_dir.chmod(0o711)
    target = tmp_path / "replica"
    fcli = functools.partial(cgrep, uri=daemon.uri)
    fcli("protect", vm.name, "--target", str(target), "--rpo", "1m", "--mode", "continuous", "--interval", "2s")
    agent = launch(agent_dir, vm.name, uri=daemon.uri, env={"CGREP_RUN_DIR": str(run_dir), "CGREP_CONTINUOUS_RETRY_S": "5"})

    def sidecar() -> dict[str, Any]:
        return read_sidecar(agent_dir).get(vm.name, {})

    try:
        wait_for("in sync with a point", lambda: sidecar().get("mirror") == "in-sync" and sidecar().get("last_point"), 120)
        before = point_ids(target)
        t0 = time.monotonic()
        daemon.stop()
        down_s = time.monotonic() - t0
        wait_for("continuous-degraded", lambda: "continuous-degraded" in kinds(agent_dir, vm.name), 60, every=0.05)
        alert_s = time.monotonic() - t0
        up_s = daemon.start()
        pconn.close()
        pconn = libvirt.open(daemon.uri)
        assert is_running(pconn, vm.name)
        wait_for("continuous-restored", lambda: "continuous-restored" in kinds(agent_dir, vm.name), 180, every=0.2)
        restored_s = time.monotonic() - t0
        last = sidecar().get("last_point")
        wait_for("a continuous point after the restart", lambda: sidecar().get("last_point") not in (None, last), 60)
        print(
            f"libvirtd restart under continuous mode: stopped in {down_s:.2f} s, degraded alert {alert_s:.2f} s, "
            f"libvirtd answered {up_s:.2f} s later, in sync again {restored_s:.1f} s after the stop"
        )
    finally:
        rc = stop_agent(agent)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert rc == 0
    degraded = [a for a in alerts(agent_dir) if a["kind"] == "continuous-degraded"]
    assert len(degraded) == 1 and "libvirtd" in degraded[0]["message"], degraded  # none for the agent's own stop
    assert alert_s < 5.0, alert_s  # the connection's close, not the next cut (interval 2 s here, 1 min by default)
    assert is_running(pconn, vm.name)
    assert_guest_writes(vm, 10)
    assert set(before) <= set(point_ids(target)), "a committed point was lost"
    res = verify_all(target)
    assert len(res) > len(before)
    assert not list(target.glob("*/disks/*/*/.staging-*"))
    assert no_jobs(pconn, vm.name)
    assert not subprocess.run(["pgrep", "-f", f"qemu-storage-daemon.*{run_dir}"], capture_output=True, check=False).stdout
    pconn.close()


def test_resync_reports_progress_and_refuses_points(
    conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeding slowed to 8 MiB/s per disk: ``progress`` events (bytes copied of bytes to copy, growing), the set is
    ``syncing`` and a point asked for meanwhile is refused (nothing reaches the target); once in sync, points work
    and are consistent."""
    from libvirt_cgrep.adapters.libvirt import start_event_loop
    from libvirt_cgrep.continuous.session import FAULT_COPY_BANDWIDTH_ENV, Options, Session
    from libvirt_cgrep.errors import StateError
    from libvirt_cgrep.replica.link import parse_target

    vm = lab_vm(disks=2, tag="contprog")
    wait_progress(vm.directory / "console.log", records=10)
    monkeypatch.setenv(FAULT_COPY_BANDWIDTH_ENV, str(8 << 20))
    start_event_loop()  # before the connection: its events need the loop
    c = lv.connect(URI)
    target = tmp_path / "replica"
    evs: list[dict[str, Any]] = []
    s = Session(c, URI, [vm.name], parse_target(str(target)), set_name=None, opts=Options(), emit=evs.append)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            s.start()
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=start)
    th.start()
    try:
        wait_for("two progress events", lambda: sum(e["event"] == "progress" for e in evs) >= 2 or errors, 120, every=0.05)
        assert not errors, errors
        if not any(e["event"] == "in-sync" for e in evs):
            assert s.state() == "syncing"
            with pytest.raises(StateError, match="not in sync"):
                s.point()
            refused = True
        else:
            refused = False
        th.join(timeout=300)
        assert not th.is_alive() and not errors, errors
        prog = [e for e in evs if e["event"] == "progress"]
        dones = [int(e["done"]) for e in prog]
        print(
            f"resync: {len(prog)} progress events, {dones[-1] >> 20} of {int(prog[-1]['total']) >> 20} MiB last; "
            f"point refused while syncing: {refused}"
        )
        assert refused, "the seeding ended before a point could be asked for"
        assert dones == sorted(dones) and dones[-1] > dones[0] and all(int(e["total"]) > 0 for e in prog)
        assert not (target / "cgrep-replica.json").exists() or not point_ids(target)
        pid = s.point()["point_id"]
    finally:
        th.join(timeout=300)
        s.close()
        c.close()
    res = verify(str(target))
    assert [r["point_id"] for r in res] == [pid] and res[0]["ok"] and res[0]["write_order"]["consistent"], res
    assert no_jobs(conn, vm.name)


def sidecar(d: Path) -> dict[str, Any]:
    """The agent's continuous.json row of its only group ({} before it is written)."""
    rows = list(read_sidecar(d).values())
    return rows[0] if rows else {}


def _stop_clean(conn: libvirt.virConnect, name: str) -> None:
    """Stop the domain with no write in flight: paused first (QEMU drains every request), then destroyed."""
    dom = lv.lookup(conn, name)
    dom.suspend()
    time.sleep(0.3)
    dom.destroy()


def _tops(conn: libvirt.virConnect, name: str) -> list[str]:
    return [d.image for d in disks_of(lv.persistent_xml(lv.lookup(conn, name)))]


def test_restart_without_recopy(
    conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path, runs: Callable[..., Runner]
) -> None:
    """A domain stopped in sync restarts without a full recopy, twice (the first overlay folded at the second start);
    a touched base image, or a replica that differs at the stop, means a full copy; every point stays consistent."""
    vm = lab_vm(disks=2, tag="contrs")
    target = str(tmp_path / "replica")
    base_tops = _tops(conn, vm.name)

    def session(env: dict[str, str] | None = None, *extra: str) -> tuple[Runner, dict[str, Any]]:
        r = runs(vm.name, "--target", target, "--interval", "1s", *extra, env=env)
        synced = r.wait_for("in-sync", timeout=180)
        r.wait_for("point", 2)
        return r, synced

    # 1: a full copy, then a clean stop: a final point whose digests match, an overlay on each disk
    r, first = session()
    assert first["resume"] is None and first["copied_bytes"] >= 2 * (64 << 20) * 0.9, first
    _stop_clean(conn, vm.name)
    assert r.proc.wait(timeout=120) == 0, r.proc.stderr.read() if r.proc.stderr else ""
    final1 = r.wait_for("stopped")
    r.stop()
    assert final1["resumable"], final1
    assert [e for e in r.events if e["event"] == "point"][-1]["final"]
    tops = _tops(conn, vm.name)
    assert tops == [cc.overlay_path(t, final1["point_id"]) for t in base_tops]
    for top, pt in zip(tops, json.loads(cli("points", target, "--json").stdout)[-1]["disks"], strict=True):
        # the final point holds exactly the disk's content (the new overlay is empty)
        subprocess.run(["qemu-img", "compare", "-U", top, pt["image"]], check=True, capture_output=True)

    # 2: restart: only what the guest wrote since it booted is copied
    lv.lookup(conn, vm.name).create()
    wait_progress(vm.directory / "console.log", records=20, timeout=90)  # the new top holds the guest's writes
    r, second = session()
    assert second["resume"] == final1["point_id"], (second, r.events[:3])
    assert 2 < second["copied_bytes"] < first["copied_bytes"] / 4, (first, second)
    _stop_clean(conn, vm.name)
    assert r.proc.wait(timeout=120) == 0
    final2 = r.wait_for("stopped")
    r.stop()
    assert final2["resumable"]

    # 3: restart again: the first overlay is folded (the chain stays at depth 2), again no full copy; --keep 3
    # merges every older point, the final one and the first session's full base included, in the daemon
    before = len(json.loads(cli("points", target, "--json").stdout))
    lv.lookup(conn, vm.name).create()
    r, third = session(None, "--keep", "3")
    syncing = r.wait_for("syncing")
    assert third["resume"] == final2["point_id"] and syncing["folded"] == tops, syncing
    r.wait_for("point", 3)
    pruned = [p for e in r.events if e["event"] == "point" for p in e["pruned"]]
    assert before >= 6 and final2["point_id"] in pruned and len(pruned) == before, (before, pruned)
    assert len(disks_of(lv.live_xml(lv.lookup(conn, vm.name)))[0].chain) == 2
    assert not Path(tops[0]).exists()
    _stop_clean(conn, vm.name)
    assert r.proc.wait(timeout=120) == 0
    r.stop()

    # 4: the base touched while the domain is off: the next start copies in full
    top = _tops(conn, vm.name)[0]
    info = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", top], capture_output=True, check=True)
    below = json.loads(info.stdout)[1]["filename"]
    os.utime(below)
    lv.lookup(conn, vm.name).create()
    r, fourth = session(env={"CGREP_FAULT_FINAL_DIGEST": "1"})
    assert fourth["resume"] is None and "changed since the final point" in r.wait_for("syncing")["full_copy_reason"]
    assert fourth["copied_bytes"] >= first["copied_bytes"] * 0.9
    # 5: a replica that differs at the stop: nothing committed, no overlay, degraded (exit 66)
    tops4 = _tops(conn, vm.name)
    _stop_clean(conn, vm.name)
    assert r.proc.wait(timeout=120) == 66
    degraded = r.wait_for("degraded")
    r.stop()
    assert "differ from its disks" in degraded["reason"], degraded
    assert not any(e["event"] == "stopped" for e in r.events)
    assert _tops(conn, vm.name) == tops4
    res = verify(target)
    assert len(res) >= 5 and all(x["ok"] and x["write_order"]["consistent"] for x in res), res
    assert not list(Path(target).glob("*/disks/*/*/.staging-*")) and not list(Path(target).glob("*/prune-*"))
    print(
        f"restart without recopy: full copy {first['copied_bytes']} B; restarts copied {second['copied_bytes']} B and "
        f"{third['copied_bytes']} B; in sync after {second['sync_s']} s / {third['sync_s']} s (full: {first['sync_s']} s)"
    )


@pytest.mark.slow
def test_group_restart_without_recopy(
    conn: libvirt.virConnect, lab_group: GroupFactory, tmp_path: Path, runs: Callable[..., Runner]
) -> None:
    """A 2-VM group stopped one VM after the other: one final point for the group; restarted, no full recopy."""
    grp = lab_group(vms=2, disks=2, tag="contgrs")
    names = [m.name for m in grp.members]
    target = str(tmp_path / "replica")
    r = runs(*names, "--set", grp.name, "--target", target, "--interval", "1s")
    first = r.wait_for("in-sync", timeout=180)
    r.wait_for("point", 2)
    for n in names:
        _stop_clean(conn, n)
        time.sleep(2)  # the first VM is down while the second still writes (mirrored)
    assert r.proc.wait(timeout=120) == 0
    stopped = r.wait_for("stopped")
    r.stop()
    assert stopped["resumable"], stopped
    for n in names:
        lv.lookup(conn, n).create()
    r = runs(*names, "--set", grp.name, "--target", target, "--interval", "1s", "--count", "3")
    again = r.wait_for("in-sync", timeout=180)
    assert again["resume"] == stopped["point_id"] and again["copied_bytes"] < first["copied_bytes"] / 2, (first, again)
    assert r.proc.wait(timeout=120) == 0
    r.stop()
    res = verify(target)
    assert len(res) >= 6 and all(x["ok"] and x["write_order"]["consistent"] for x in res), res


def test_restart_without_recopy_over_ssh(
    conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path, ssh_env: SSHD, runs: Callable[..., Runner]
) -> None:
    """The same over ssh: the replica digests its images on its own host, the restart copies only the new top."""
    vm = lab_vm(disks=2, tag="contrsh")
    target = ssh_env.target(tmp_path / "replica")
    r = runs(vm.name, "--target", target, "--interval", "1s")
    first = r.wait_for("in-sync", timeout=180)
    r.wait_for("point", 2)
    _stop_clean(conn, vm.name)
    assert r.proc.wait(timeout=120) == 0
    stopped = r.wait_for("stopped")
    r.stop()
    assert stopped["resumable"], stopped
    lv.lookup(conn, vm.name).create()
    wait_progress(vm.directory / "console.log", records=10, timeout=90)
    r = runs(vm.name, "--target", target, "--interval", "1s", "--count", "2")
    again = r.wait_for("in-sync", timeout=180)
    assert again["resume"] == stopped["point_id"] and again["copied_bytes"] < first["copied_bytes"] / 4, (first, again)
    assert r.proc.wait(timeout=120) == 0
    r.stop()
    res = verify(str(tmp_path / "replica"))
    assert len(res) >= 4 and all(x["ok"] and x["write_order"]["consistent"] for x in res), res
