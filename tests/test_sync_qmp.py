"""`virt-cgrep sync --backend qmp` against a bare QEMU (no libvirt) running the lab workload.

Cycles are consistent and incremental and keep the primary chains short (the
fold is a QMP ``block-commit``); a point committed but not folded (the sync
was killed) is folded by the next sync, run as a new process with a new
backend that finds the layers from QEMU's queries alone.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters.qmp import QMPConnection
from libvirt_cgrep.engine.qmp_backend import QMPBackend
from tests import test_point_qmp
from tests.test_point_qmp import BareVM, VMFactory

bare_vm = test_point_qmp.bare_vm  # the fixture: bare QEMU processes, killed after each test

TARGETS = ("vda", "vdb", "vdc", "vdd")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "libvirt_cgrep", *args], capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def sync_argv(vm: BareVM, target: str) -> list[str]:
    return ["sync", "--backend", "qmp", "--qmp", vm.qmp, "--guardian-qmp", vm.guardian, "--target", target, "--json"]


def sync(vm: BareVM, target: str) -> dict[str, Any]:
    t0 = time.monotonic()
    res: dict[str, Any] = json.loads(cli(*sync_argv(vm, target)).stdout)
    res["wall_s"] = time.monotonic() - t0
    return res


def chain_lengths(vm: BareVM) -> list[int]:
    """Every disk's live chain length, through the second monitor (the sync owns the first while it runs)."""
    b = QMPBackend(vm.guardian)
    try:
        return [len(b.chain(t)) for t in TARGETS]
    finally:
        b.close()


def running(vm: BareVM) -> bool:
    with QMPConnection(vm.guardian) as q:
        return bool(q.execute("query-status")["running"])


def point_ids(target: str) -> list[str]:
    return [p["id"] for p in json.loads(cli("points", target, "--json").stdout)]


def verify_all(target: str) -> list[dict[str, Any]]:
    out = cli("verify", target, "--write-order", "--json", check=False)
    results: list[dict[str, Any]] = json.loads(out.stdout)
    assert out.returncode == 0 and results, (out.stdout, out.stderr)
    for r in results:
        assert r["ok"] and r["write_order"]["consistent"], r
    return results


def overlay_files(vm: BareVM) -> list[str]:
    return sorted(p.name for p in vm.directory.glob("*.cgrep-*.qcow2"))


def wait_no_receiver(root: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["pgrep", "-f", f"libvirt_cgrep receive {root}"], capture_output=True, text=True, check=False)
        if not out.stdout.split():
            return
        assert time.monotonic() < deadline, f"a receiver of {root} survived: {out.stdout}"
        time.sleep(0.1)


def test_sync_cycles_over_qmp(bare_vm: VMFactory, tmp_path: Path) -> None:
    vm = bare_vm(disks=4, name="qsync")
    target = str(tmp_path / "replica")
    results = []
    for _ in range(10):
        acked = vm.progress(records=10)
        res = sync(vm, target)
        res["acked_before"] = acked
        assert max(chain_lengths(vm)) <= 3
        assert [d["primary_chain_length"] for d in res["disks"]] == [2] * 4
        results.append(res)
    assert [d["target"] for d in results[0]["disks"]] == list(TARGETS)
    assert all(d["full"] for d in results[0]["disks"])
    for r in results[1:]:
        assert not any(d["full"] for d in r["disks"]), r["disks"]
        changed, shipped = int(r["changed_bytes"]), int(r["bytes_shipped"])
        assert changed > 0 and shipped / changed <= 1.1, (changed, shipped)
    verify = verify_all(target)
    assert [v["point_id"] for v in verify] == [r["point_id"] for r in results] == point_ids(target)
    assert verify[-1]["write_order"]["max"] >= results[-1]["acked_before"]
    assert running(vm)
    assert len(overlay_files(vm)) == 4  # only the active overlays: every folded layer's file is gone
    totals = [r["total_s"] for r in results[1:]]
    walls = [r["wall_s"] for r in results[1:]]
    print(
        f"\nsync over QMP, 4 disks, 10 cycles: first {results[0]['total_s']:.2f} s "
        f"({results[0]['bytes_shipped'] >> 10} KiB); then total_s median {statistics.median(totals):.2f} s "
        f"(max {max(totals):.2f}), wall median {statistics.median(walls):.2f} s, "
        f"shipped median {statistics.median(r['bytes_shipped'] for r in results[1:]) / 1024:.0f} KiB"
    )


def test_sync_repairs_an_unfolded_point_from_a_new_process(bare_vm: VMFactory, tmp_path: Path) -> None:
    vm = bare_vm(disks=4, name="qrepair")
    root = tmp_path / "replica"
    target = str(root)
    first = sync(vm, target)
    assert chain_lengths(vm) == [2] * 4
    vm.progress(records=100)

    # A sync that commits its point, then is killed before it folds.
    proc = subprocess.Popen(
        [sys.executable, "-m", "libvirt_cgrep", *sync_argv(vm, target)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CGREP_FAULT_BEFORE_FOLD_MS": "20000"},
    )
    try:
        deadline = time.monotonic() + 60
        while len(ids := point_ids(target)) < 2:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the faulted cycle never committed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    wait_no_receiver(root)
    assert ids[0] == first["point_id"]
    committed = ids[1]
    assert running(vm)
    assert chain_lengths(vm) == [3] * 4  # committed, not folded
    verify_all(target)  # the committed point is whole

    acked = vm.progress(records=10)
    res = sync(vm, target)  # a new process, a new backend: repairs, then its own cycle
    assert res["parent"] == committed
    assert not any(d["full"] for d in res["disks"])
    assert 0 < res["bytes_shipped"] <= 1.1 * res["changed_bytes"]
    assert chain_lengths(vm) == [2] * 4
    assert point_ids(target) == [*ids, res["point_id"]]
    verify = verify_all(target)
    assert verify[-1]["write_order"]["max"] >= acked
    assert len(overlay_files(vm)) == 4
    assert running(vm)
    print(f"\nrepair sync (fold of the committed layer + a cycle), 4 disks: {res['total_s']:.2f} s")
