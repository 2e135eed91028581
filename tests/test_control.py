"""The proof that the checker can fail: disk-by-disk snapshots break write order,
libvirt's atomic snapshot does not. Real libvirtd, real QEMU, real guest."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.check import check_images
from tests.conftest import LabFactory, wait_progress

TRIALS = 10
DISKS = 4


def active_tops(conn: libvirt.virConnect, name: str) -> dict[str, Path]:
    dom = lv.lookup(conn, name)
    return {d.target: Path(d.path) for d in lv.disks_from_xml(lv.live_xml(dom)) if d.path and d.device == "disk"}


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True, capture_output=True, timeout=60)


def test_disk_by_disk_snapshots_show_holes(conn: libvirt.virConnect, lab_vm: LabFactory) -> None:
    vm = lab_vm(disks=DISKS, tag="naive")
    broken = 0
    for trial in range(TRIALS):
        wait_progress(vm.directory / "console.log", records=20)
        frozen = active_tops(conn, vm.name)
        for target in frozen:
            specs = [
                f"{t},snapshot=external,file={vm.directory / f'{t}.n{trial}.qcow2'}" if t == target else f"{t},snapshot=no"
                for t in frozen
            ]
            virsh("snapshot-create-as", vm.name, "--disk-only", "--no-metadata", *[a for s in specs for a in ("--diskspec", s)])
        verdict = check_images(list(frozen.values()))
        broken += not verdict.consistent
    print(f"naive disk-by-disk cut: {broken}/{TRIALS} broken")
    assert broken >= 8, f"negative control: only {broken}/{TRIALS} naive cuts showed holes"


def test_atomic_snapshots_are_consistent(conn: libvirt.virConnect, lab_vm: LabFactory) -> None:
    vm = lab_vm(disks=DISKS, tag="atomic")
    consistent = 0
    for trial in range(TRIALS):
        acked = wait_progress(vm.directory / "console.log", records=20)
        frozen = active_tops(conn, vm.name)
        specs = [f"{t},snapshot=external,file={vm.directory / f'{t}.a{trial}.qcow2'}" for t in frozen]
        virsh(
            "snapshot-create-as",
            vm.name,
            "--disk-only",
            "--atomic",
            "--no-metadata",
            *[a for s in specs for a in ("--diskspec", s)],
        )
        verdict = check_images(list(frozen.values()))
        assert verdict.max >= acked, "the cut lost a record acknowledged before it started"
        consistent += verdict.consistent
    print(f"atomic cut: {consistent}/{TRIALS} consistent")
    assert consistent == TRIALS
    assert labdom.get(conn, vm.name).state == "running"
