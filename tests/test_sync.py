"""`virt-cgrep sync` against real libvirt, a real guest, and targets local and over a real sshd on loopback."""

from __future__ import annotations

import json
import os
import statistics
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


def cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", URI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def chain_lengths(conn: libvirt.virConnect, name: str) -> list[int]:
    return [len(d.chain) for d in disks_of(lv.live_xml(lv.lookup(conn, name)))]


@pytest.fixture(params=["local", "ssh"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "replica")
    sshd: SSHD = request.getfixturevalue("ssh_env")
    return sshd.target(tmp_path / "replica")


def run_cycles(conn: libvirt.virConnect, vm: labdom.LabDomain, target: str, n: int, *extra: str) -> list[dict[str, object]]:
    results = []
    for _ in range(n):
        acked = wait_progress(vm.directory / "console.log", records=10)
        res = json.loads(cli("sync", vm.name, "--target", target, "--json", *extra).stdout)
        assert max(chain_lengths(conn, vm.name)) <= 3
        res["acked_before"] = acked
        results.append(res)
    return results


def test_sync_cycles_are_consistent_and_incremental(conn: libvirt.virConnect, lab_vm: LabFactory, target: str) -> None:
    vm = lab_vm(disks=4, tag="sync")
    results = run_cycles(conn, vm, target, 10)
    assert all(d["full"] for d in results[0]["disks"])  # type: ignore[attr-defined]
    for r in results[1:]:
        assert not any(d["full"] for d in r["disks"])  # type: ignore[attr-defined]
        changed, shipped = int(r["changed_bytes"]), int(r["bytes_shipped"])  # type: ignore[call-overload]
        assert changed > 0 and shipped / changed <= 1.1
    verify = json.loads(cli("verify", target, "--write-order", "--json").stdout)
    assert len(verify) == 10 and all(v["ok"] and v["write_order"]["consistent"] for v in verify)
    # the newest point holds every write acknowledged before its cycle started
    newest = verify[-1]
    assert newest["point_id"] == results[-1]["point_id"]
    assert newest["write_order"]["max"] >= results[-1]["acked_before"]
    points = json.loads(cli("points", target, "--json").stdout)
    assert [p["id"] for p in points] == [r["point_id"] for r in results]
    assert all(set(d) >= {"target", "image"} for p in points for d in p["disks"])
    assert labdom.get(conn, vm.name).state == "running"


def test_retention_merges_and_keeps_points_bootable(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    vm = lab_vm(disks=2, tag="keep")
    target = str(tmp_path / "replica")
    results = run_cycles(conn, vm, target, 5, "--keep", "2")
    points = json.loads(cli("points", target, "--json").stdout)
    assert [p["id"] for p in points] == [r["point_id"] for r in results[-2:]]
    verify = json.loads(cli("verify", target, "--write-order", "--json").stdout)
    assert all(v["ok"] for v in verify)
    # the oldest kept point is now a self-contained base: readable with stock qemu-img
    base = Path(points[0]["disks"][0]["image"])
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(base)], capture_output=True, check=True).stdout)
    assert "backing-filename" not in info


def test_bad_targets_change_nothing(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    vm = lab_vm(disks=2, tag="badt")
    before = chain_lengths(conn, vm.name)
    for bad in ["relative/path", "/tmp/../etc", "ssh://host", "ftp://x/y", "/tmp/a b", "/tmp/x;reboot"]:
        out = cli("sync", vm.name, "--target", bad, check=False)
        assert out.returncode == 64, (bad, out.stderr)
    nonempty = tmp_path / "occupied"
    nonempty.mkdir()
    (nonempty / "precious").write_text("x")
    out = cli("sync", vm.name, "--target", str(nonempty), check=False)
    assert out.returncode == 64 and (nonempty / "precious").read_text() == "x"
    assert chain_lengths(conn, vm.name) == before
    assert cli("points", str(tmp_path / "none"), check=False).returncode == 65


@pytest.mark.slow
def test_hundred_cycles(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """100 cycles at 4 disks: every committed point passes the write-order checker, the chain never grows."""
    vm = lab_vm(disks=4, tag="c100")
    target = str(tmp_path / "replica")
    consistent = 0
    lengths: list[int] = []
    fulls: list[int] = []
    totals: list[float] = []
    t0 = time.monotonic()
    for i in range(100):
        acked = wait_progress(vm.directory / "console.log", records=10)
        res = json.loads(cli("sync", vm.name, "--target", target, "--keep", "10", "--json").stdout)
        totals.append(res["total_s"])
        if i and any(d["full"] for d in res["disks"]):
            fulls.append(i)
        lengths.append(max(chain_lengths(conn, vm.name)))
        v = json.loads(cli("verify", target, "--point", res["point_id"], "--write-order", "--json").stdout)[0]
        ok = v["ok"] and v["write_order"]["consistent"] and v["write_order"]["max"] >= acked
        if not ok:
            print(f"cycle {i}: NOT consistent and fresh: {v}")
        consistent += ok
    print(
        f"\n100 cycles at 4 disks: {consistent}/100 consistent and fresh; primary chain length max {max(lengths)}, "
        f"last {lengths[-1]}; full resyncs after the seed: {fulls}; cycle median {statistics.median(totals):.2f} s, "
        f"max {max(totals):.2f} s; {time.monotonic() - t0:.0f} s, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    assert consistent == 100 and not fulls
    assert max(lengths) <= 3 and lengths[-1] == lengths[10]
    assert len(json.loads(cli("points", target, "--json").stdout)) == 10


def test_two_targets_alternately_stay_consistent(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    """Folding for one target must not make another target's next delta miss data (fold stamp => full resync)."""
    vm = lab_vm(disks=2, tag="alt")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fulls = []
    for t in (a, b, a, b, a):
        wait_progress(vm.directory / "console.log", records=20)
        res = json.loads(cli("sync", vm.name, "--target", t, "--json").stdout)
        fulls.append(all(d["full"] for d in res["disks"]))
    assert fulls == [True, True, True, True, True]
    for t in (a, b):
        verify = json.loads(cli("verify", t, "--write-order", "--json").stdout)
        assert all(v["ok"] and v["write_order"]["consistent"] for v in verify)
    # the same target again: a delta
    res = json.loads(cli("sync", vm.name, "--target", a, "--json").stdout)
    assert not any(d["full"] for d in res["disks"])


def test_read_order_reads_each_layer_front_to_back() -> None:
    """Pure: zeros first, then data by (layer, host offset); nothing lost or added."""
    from libvirt_cgrep.core.extents import Extent, read_order

    xs = [
        Extent("data", 0, 65536, 0, 9 << 16),
        Extent("zero", 65536, 65536, 0, None),
        Extent("data", 1 << 20, 65536, 1, 2 << 16),
        Extent("data", 2 << 20, 65536, 0, 3 << 16),
    ]
    got = read_order(xs)
    assert sorted(got, key=lambda x: x.start) == sorted(xs, key=lambda x: x.start)
    assert [(x.kind, x.depth, x.offset) for x in got] == [
        ("zero", 0, None),
        ("data", 0, 3 << 16),
        ("data", 0, 9 << 16),
        ("data", 1, 2 << 16),
    ]
