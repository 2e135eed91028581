"""Continuous mode against real libvirt, a real lab guest, a real qemu-storage-daemon, local and over loopback ssh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.engine.libvirt_backend import disks_of
from libvirt_cgrep.lab import domain as labdom
from tests.conftest import SSHD, URI, LabFactory, wait_progress


def cli(*args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
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


def events(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def no_jobs(conn: libvirt.virConnect, name: str) -> bool:
    dom = lv.lookup(conn, name)
    return all(not dom.blockJobInfo(d.target, 0) for d in disks_of(lv.live_xml(dom)))


def verify(target: str, *point_ids: object) -> list[dict[str, object]]:
    res: list[dict[str, object]] = json.loads(cli("verify", target, "--write-order", "--json", check=False).stdout)
    return [r for r in res if not point_ids or r["point_id"] in point_ids]


def test_continuous_points_are_consistent(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """4 disks, 10 points cut on the replica side: every one write-order consistent, chains unchanged, no job left."""
    vm = lab_vm(disks=4, tag="cont")
    wait_progress(vm.directory / "console.log", records=10)
    chains = [d.chain for d in disks_of(lv.live_xml(lv.lookup(conn, vm.name)))]
    target = str(tmp_path / "replica")
    out = cli("continuous", vm.name, "--target", target, "--interval", "1s", "--count", "10", "--json")
    evs = events(out.stdout)
    pts = [e for e in evs if e["event"] == "point"]
    assert [e["event"] for e in evs[:2]] == ["syncing", "in-sync"] and len(pts) == 10
    res = verify(target)
    assert len(res) == 10
    bad = [r for r in res if not (r["ok"] and r["write_order"]["consistent"])]  # type: ignore[index]
    assert not bad, bad
    maxes = [int(r["write_order"]["max"]) for r in res]  # type: ignore[index]
    assert maxes == sorted(maxes) and maxes[-1] > maxes[0]  # fresh: every point newer than the one before
    assert [d.chain for d in disks_of(lv.live_xml(lv.lookup(conn, vm.name)))] == chains
    assert no_jobs(conn, vm.name)
    assert labdom.get(conn, vm.name).state == "running"
    cuts = sorted(float(e["cut_ms"]) for e in pts)  # type: ignore[arg-type]
    print(f"continuous 4 disks: 10/10 consistent; replica cut median {cuts[5]:.1f} ms, max {cuts[-1]:.1f} ms")
    # nothing uncommitted stays on the replica
    assert not list(Path(target).glob("*/disks/*/*/.staging-*"))


def test_negative_control_split_cut_shows_holes(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """The same replica-side cut, but one transaction per disk 50 ms apart: the checker must find holes."""
    vm = lab_vm(disks=4, tag="contneg")
    wait_progress(vm.directory / "console.log", records=10)
    target = str(tmp_path / "replica")
    cli("continuous", vm.name, "--target", target, "--interval", "1s", "--count", "5", "--json", env={"CGREP_FAULT_SPLIT_CUT_MS": "50"})
    res = verify(target)
    assert len(res) == 5
    broken = [r for r in res if not r["write_order"]["consistent"]]  # type: ignore[index]
    print(f"negative control (per-disk transactions 50 ms apart): {len(broken)}/5 NOT consistent")
    assert len(broken) >= 4
