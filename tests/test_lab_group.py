"""Cross-VM proof in the lab: a dependent-write chain that spans VMs through a host relay.

Record n is written by member n mod V, and only after the relay saw record n-1
acknowledged on the previous member's console. A group point (all members held
by one fence) must give a consistent union of images; cutting the members one
after the other without a group fence must show holes. Real libvirtd, QEMU, guests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.cli import run
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab import relay
from libvirt_cgrep.lab.check import check_images
from tests.conftest import URI, GroupFactory, unique_name

TRIALS = 10


def done_max(grp: labdom.LabGroup) -> int:
    """The highest record any member reported DONE (-1 before the first)."""
    done = [labdom.read_console(m.directory / "console.log").done for m in grp.members]
    return max((d for d in done if d is not None), default=-1)


def wait_chain(grp: labdom.LabGroup, records: int = 10, timeout: float = 60.0) -> int:
    """Wait until the chain advanced ``records`` records; return the highest DONE then."""
    start = done_max(grp)
    deadline = time.monotonic() + timeout
    while True:
        now = done_max(grp)
        if now >= start + records:
            return now
        assert time.monotonic() < deadline, f"the chain of {grp.name} did not advance {records} records in {timeout:.0f} s"
        time.sleep(0.02)


def chain_rate(grp: labdom.LabGroup, seconds: float = 5.0) -> float:
    """DONE records per second across the group, measured from the consoles."""
    t0, d0 = time.monotonic(), done_max(grp)
    time.sleep(seconds)
    return (done_max(grp) - d0) / (time.monotonic() - t0)


def point(*names: str, fence: str | None = None) -> dict[str, object]:
    extra = ["--fence", fence] if fence else []
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", URI, "point", *names, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    res: dict[str, object] = json.loads(out.stdout)
    return res


def frozen(res: dict[str, object], domain: str | None = None) -> list[Path]:
    disks = res["disks"]
    assert isinstance(disks, list)
    return [Path(d["frozen_image"]) for d in disks if domain is None or d["domain"] == domain]


def pty_of(conn: libvirt.virConnect, name: str) -> str:
    root = etree.fromstring(lv.live_xml(lv.lookup(conn, name)).encode())
    src = root.find("devices/serial[@type='pty']/source")
    assert src is not None
    return str(src.get("path"))


def wait_console(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not on {path} within {timeout:.0f} s"
        time.sleep(0.05)


def relay_running(name: str) -> bool:
    out = subprocess.run(["pgrep", "-f", f"lab.relay .*--group {name} "], capture_output=True, check=False)
    return bool(out.stdout.strip())


@pytest.mark.parametrize(("iothreads", "want"), [(0, [None, None, None]), (1, ["1", "1", "1"]), (2, ["1", "2", "1"])])
def test_lab_disks_spread_over_iothreads(iothreads: int, want: list[str | None]) -> None:
    spec = labdom.LabSpec(
        name="x", disks=3, size=1 << 20, kernel=Path("/k"), initrd=Path("/i"), directory=Path("/d/x"), iothreads=iothreads
    )
    root = etree.fromstring(labdom.domain_xml(spec, "00000000-0000-0000-0000-000000000001").encode())
    assert root.findtext("iothreads") == (str(iothreads) if iothreads else None)
    assert [d.get("iothread") for d in root.iterfind("devices/disk/driver")] == want


def test_go_line_is_two_uart_trigger_levels() -> None:
    assert relay.go_line(7) == b"GO 000000000007\n" and len(relay.go_line(10**12 - 1)) == 16


@pytest.mark.parametrize(
    "args",
    [
        ["--group", "g1", "--vms", "1"],
        ["--group", "g1", "--vms", "17"],
        ["--group", "g1", "--vms", "two"],
        ["n1", "--group", "g1"],
        ["n1", "--vms", "2"],
        ["--group", "../g1"],
        ["--group", "g1", "--rate", "100"],
        [],
    ],
)
def test_group_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    def ours() -> set[Path]:
        return {*labdom.lab_root().glob("g1*"), *labdom.lab_root().glob("n1*")}

    before = ours()
    assert run(["lab", "up", *args]) == 64
    assert capsys.readouterr().err.count("\n") == 1
    assert ours() == before


def test_group_up_status_check_and_down_by_cli(conn: libvirt.virConnect, capsys: pytest.CaptureFixture[str]) -> None:
    """`lab up --group G --vms 3`: the chain runs across all three VMs; a paused member holds it; `lab down G-1` removes all."""
    name = unique_name("g3")
    members = [f"{name}-{i}" for i in range(3)]
    try:
        assert run(["-c", URI, "lab", "up", "--group", name, "--vms", "3", "--disks", "2", "--size", "16M"]) == 0
        grp = labdom.get_group(conn, name)
        assert [m.name for m in grp.members] == members and not grp.missing
        assert [(m.group, m.vm, m.vms, m.state) for m in grp.members] == [(name, i, 3, "running") for i in range(3)]
        assert grp.relay.running and relay_running(name)
        rate = chain_rate(grp)
        with capsys.disabled():
            print(f"3 VMs x 2 disks: relay chain {rate:.0f} records/s")
        assert rate > 1
        dones = [labdom.read_console(m.directory / "console.log").done for m in grp.members]
        assert all(d is not None and d % 3 == i for i, d in enumerate(dones)), dones

        capsys.readouterr()
        assert run(["-c", URI, "lab", "status", name, "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["group"] == name and [m["name"] for m in st["members"]] == members and st["relay"]["running"]
        assert run(["-c", URI, "lab", "list", "--json"]) == 0
        listed = {d["name"]: d["group"] for d in json.loads(capsys.readouterr().out)}
        assert all(listed[m] == name for m in members)
        assert run(["-c", URI, "lab", "check", "--group", name, "--domain", members[0]]) == 64

        # A paused member holds the chain (the relay just waits), and it goes on after resume.
        dom = lv.lookup(conn, members[1])
        dom.suspend()
        try:
            time.sleep(1.0)
            held = done_max(grp)
            time.sleep(3.0)
            assert done_max(grp) == held, "the chain went on while a member was paused"
        finally:
            dom.resume()
        wait_chain(grp, records=30)
        assert "again" not in (grp.directory / relay.LOG_FILE).read_text(), "the relay re-sent a GO to a paused VM"

        # The guest writes only what it is told, and only its own records.
        log0 = grp.members[0].directory / "console.log"
        fd = os.open(pty_of(conn, members[0]), os.O_WRONLY | os.O_NOCTTY)
        try:
            foreign = done_max(grp) + 300
            os.write(fd, relay.go_line(foreign - foreign % 3 + 1))  # member 1's record
            wait_console(log0, "belongs to vm 1, this is vm 0")
            os.write(fd, relay.go_line(0))  # older than member 0's last record
            wait_console(log0, "is older than the last acknowledged record")
        finally:
            os.close(fd)
        wait_chain(grp, records=30)

        assert run(["-c", URI, "lab", "down", members[1]]) == 0
        for m in [name, *members]:
            with pytest.raises(Exception, match="not found"):
                lv.lookup(conn, m)
            assert not (labdom.lab_root() / m).exists()
        assert not relay_running(name)
        assert run(["-c", URI, "lab", "down", name]) == 65
    finally:
        if labdom.group_dir(name).exists() or any(d.group == name for d in labdom.list_all(conn)):
            labdom.group_down(conn, name)
    assert not relay_running(name)


def test_group_point_is_consistent_across_vms(lab_group: GroupFactory) -> None:
    """10 group points (one suspend fence over both VMs): the union of the frozen images is always consistent."""
    grp = lab_group(vms=2, disks=2)
    a, b = (m.name for m in grp.members)
    print(f"2 VMs x 2 disks: relay chain {chain_rate(grp):.0f} records/s")
    consistent = 0
    holds = []
    for trial in range(TRIALS):
        before = wait_chain(grp, records=10)
        res = point(a, b, fence="suspend")
        assert isinstance(res["fence_ms"], int | float)
        holds.append(float(res["fence_ms"]))
        verdict = check_images(frozen(res))
        assert verdict.max >= before, f"the cut lost record {before}, DONE before the point started"
        consistent += verdict.consistent
        if trial == 0:
            # one VM's images alone hold every other record only: the checker needs the whole group
            alone = check_images(frozen(res, a))
            assert not alone.consistent and alone.holes > 0
    holds.sort()
    print(f"group points: {consistent}/{TRIALS} consistent; group hold median {holds[len(holds) // 2]:.0f} ms")
    assert consistent == TRIALS


def test_vm_by_vm_points_show_holes(lab_group: GroupFactory) -> None:
    """Negative control: each VM cut alone, one after the other, without a group fence: the union has holes."""
    grp = lab_group(vms=2, disks=2, tag="neg")
    a, b = (m.name for m in grp.members)
    broken = 0
    gaps = []
    for _ in range(TRIALS):
        wait_chain(grp, records=10)
        res_a = point(a)
        res_b = point(b)
        verdict = check_images(frozen(res_a) + frozen(res_b))
        broken += not verdict.consistent
        gaps.append(verdict.holes)
    print(f"VM-by-VM cuts without a group fence: {broken}/{TRIALS} broken (holes per cut: {gaps})")
    assert broken >= 8, f"negative control: only {broken}/{TRIALS} VM-by-VM cuts showed holes"
