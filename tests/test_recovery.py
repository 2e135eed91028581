"""Recovery against real libvirtd, QEMU and lab guests: test failover beside live replication, cleanup, failover of a group.

The replica target lives under the lab root (QEMU's user must reach it). Each test removes what it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab import relay
from libvirt_cgrep.lab.check import check_images
from tests.conftest import PREFIX, URI, GroupFactory, LabFactory, unique_name, wait_progress


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", URI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def cli_json(*args: str) -> object:
    return json.loads(cli(*args, "--json").stdout)


@pytest.fixture
def target() -> Iterator[Path]:
    """A replica target QEMU can reach (under the lab root); removed afterwards."""
    root = labdom.lab_root() / unique_name("rcvtarget")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def tree(root: Path) -> dict[str, int]:
    """Every path under root with its mode."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def host_listing(conn: libvirt.virConnect) -> tuple[set[str], set[str]]:
    """Domains of this test session and every network (other engineers' domains come and go meanwhile)."""
    return {d.name() for d in conn.listAllDomains(0) if d.name().startswith(PREFIX)}, {n.name() for n in conn.listAllNetworks(0)}


def wait_scan(log: Path, timeout: float = 120.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        if log.exists():
            st = labdom.read_console(log)
            if st.scan is not None:
                return st.scan
        assert time.monotonic() < deadline, f"no SCAN line on {log}"
        time.sleep(0.1)


def test_failover_refusals_test_failover_beside_replication_and_cleanup(
    conn: libvirt.virConnect, lab_vm: LabFactory, target: Path
) -> None:
    vm = lab_vm(disks=2, size=16 << 20, tag="tfo")
    dom = lv.lookup(conn, vm.name)
    missing_net = unique_name("nonet")
    dom.attachDeviceFlags(
        f"<interface type='network'><source network='{missing_net}'/><model type='virtio'/></interface>",
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    log = vm.directory / "console.log"
    cli("sync", vm.name, "--target", str(target))
    acked = wait_progress(log, records=10)
    first = cli_json("sync", vm.name, "--target", str(target))
    assert isinstance(first, dict)
    before_tree, before_host = tree(target), host_listing(conn)

    # Refusals change nothing: the original runs here; a NIC's network is missing here; bad names; remote target.
    out = cli("failover", vm.name, "--target", str(target), check=False)
    assert out.returncode == 66 and out.stderr.count("\n") == 1 and "--force" in out.stderr
    out = cli("failover", vm.name, "--target", str(target), "--force", check=False)
    assert out.returncode == 66 and missing_net in out.stderr and "--network" in out.stderr, out.stderr
    assert cli("failover", "no-such-set", "--target", str(target), check=False).returncode == 65
    assert cli("failover", "../x", "--target", str(target), check=False).returncode == 64
    assert cli("failover", vm.name, "--target", "ssh://h/x", check=False).returncode == 64
    assert cli("failover", vm.name, "--target", str(target), "--point", "20200101T000000.000000Z", check=False).returncode == 65
    assert cli("test-cleanup", vm.name, "--target", str(target), check=False).returncode == 65
    assert tree(target) == before_tree and host_listing(conn) == before_host

    # Test failover: a renamed copy with a new UUID, its NIC on an isolated network, beside the running original.
    t0 = time.monotonic()
    part = cli_json("test-failover", vm.name, "--target", str(target), "--no-start")  # an interrupted run, in effect
    assert isinstance(part, dict) and [d["step"] for d in part["domains"]] == ["defined"]
    assert not lv.lookup(conn, f"{vm.name}-test").isActive()
    res = cli_json("test-failover", vm.name, "--target", str(target))  # the same command finishes it
    assert isinstance(res, dict) and res["resumed"] and res["run"] == part["run"]
    assert res["state"] == "active" and res["point_id"] == first["point_id"]
    assert [d["step"] for d in res["domains"]] == ["started"]
    (copy,) = res["domains"]
    assert copy["name"] == f"{vm.name}-test" and copy["uuid"] != dom.UUIDString()
    test_dom = lv.lookup(conn, copy["name"])
    xml = etree.fromstring(lv.live_xml(test_dom).encode())
    nets = [s.get("network") for s in xml.iterfind("devices/interface/source")]
    assert nets == [res["networks"][0]] and res["networks"][0] not in before_host[1]
    sources = [s.get("file") for s in xml.iterfind("devices/disk/source")]
    assert sources == list(copy["disks"].values()) and all(s and str(target) in s for s in sources)
    scan = wait_scan(Path(copy["disks"]["vda"]).parent / "serial0.log")
    recover_s = time.monotonic() - t0
    assert int(scan["max"]) >= acked and scan["holes"] == "0" and scan["bad"] == "0", (scan, acked)
    print(f"test failover of 1 VM x 2 disks: workload running after {recover_s:.1f} s (load {os.getloadavg()[0]:.1f})")
    assert lv.state(dom) == "running"

    # Replication keeps committing meanwhile; retention never prunes the test's point or older ones.
    ids = []
    for _ in range(2):
        wait_progress(log, records=10)
        r = cli_json("sync", vm.name, "--target", str(target), "--keep", "1")
        assert isinstance(r, dict)
        ids.append(r["point_id"])
    points = [p["id"] for p in cli_json("points", str(target))]  # type: ignore[attr-defined]
    assert first["point_id"] in points and points[-1] == ids[-1]
    runs = cli_json("recovery", str(target))
    assert isinstance(runs, list) and [(r["kind"], r["state"]) for r in runs] == [("test-failover", "active")]

    # A second test-failover finishes the same run (idempotent), never a second copy.
    again = cli_json("test-failover", vm.name, "--target", str(target))
    assert isinstance(again, dict) and again["resumed"] and again["run"] == res["run"]

    out = cli("test-cleanup", vm.name, "--target", str(target))
    assert res["run"] in out.stdout
    assert host_listing(conn) == before_host
    new_points = {p for p in tree(target) if any(i in p for i in ids)}
    after = {k: v for k, v in tree(target).items() if k not in new_points}
    assert after == {k: v for k, v in before_tree.items() if k in after} and set(before_tree) - set(after) <= {
        k for k in before_tree if "points/" in k or "/disks/" in k or k.startswith(vm.name + "/disks")
    }
    verify = cli_json("verify", str(target), "--write-order")
    assert isinstance(verify, list) and all(v["ok"] for v in verify)
    assert lv.state(dom) == "running"

    # A real failover (forced next to the running original: a NAME-failover copy), then rolled back.
    nic = etree.fromstring(lv.persistent_xml(dom).encode()).find("devices/interface")
    assert nic is not None
    dom.detachDeviceFlags(etree.tostring(nic, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    acked = wait_progress(log, records=10)
    cli("sync", vm.name, "--target", str(target))
    before_tree, before_host = tree(target), host_listing(conn)
    fo = cli_json("failover", vm.name, "--target", str(target), "--force")
    assert isinstance(fo, dict) and [d["name"] for d in fo["domains"]] == [f"{vm.name}-failover"]
    scan = wait_scan(Path(fo["domains"][0]["disks"]["vda"]).parent / "serial0.log")
    assert int(scan["max"]) >= acked and scan["holes"] == "0" and scan["bad"] == "0", (scan, acked)
    cli("failover", vm.name, "--target", str(target), "--rollback")
    assert tree(target) == before_tree and host_listing(conn) == before_host


@contextlib.contextmanager
def restored(conn: libvirt.virConnect, names: list[str]) -> Iterator[None]:
    """Put the originals back (definitions and running) whatever the test did."""
    saved = {n: lv.persistent_xml(lv.lookup(conn, n)) for n in names}
    try:
        yield
    finally:
        for n, xml in saved.items():
            with contextlib.suppress(Exception):
                d = lv.lookup(conn, n)
                if d.isActive():
                    d.destroy()
            with contextlib.suppress(Exception):
                conn.defineXML(xml)


@pytest.mark.slow
def test_group_failover_boots_consistent_and_rolls_back(conn: libvirt.virConnect, lab_group: GroupFactory, target: Path) -> None:
    """2 VMs x 4 disks: the originals die, the group fails over from its newest point; every member boots and scans."""
    grp = lab_group(vms=2, disks=4, size=16 << 20, tag="rfo")
    names = [m.name for m in grp.members]
    logs = [m.directory / "console.log" for m in grp.members]
    for _ in range(2):
        done = labdom.wait_for_done(logs, after=(grp.last_done or 0) + 10)
        cli("sync", *names, "--set", grp.name, "--target", str(target), "--fence", "suspend", "--deadline", "15000")
    with restored(conn, names):
        relay.stop(grp.directory, grp.name)  # the disaster: the site's relay and VMs die
        for n in names:
            lv.lookup(conn, n).destroy()
        out = cli("failover", grp.name, "--target", str(target), check=False)
        assert out.returncode == 67 and "--force" in out.stderr, out.stderr  # defined here, shut off
        t0 = time.monotonic()
        res = cli_json("failover", grp.name, "--target", str(target), "--force")
        assert isinstance(res, dict)
        scans = [wait_scan(Path(d["disks"]["vda"]).parent / "serial0.log") for d in res["domains"]]
        recover_s = time.monotonic() - t0
        print(f"failover of 2 VMs x 4 disks: workload running on both after {recover_s:.1f} s (load {os.getloadavg()[0]:.1f})")
        assert [d["name"] for d in res["domains"]] == names  # same names and UUIDs: the originals' definitions replaced
        assert all(s["holes"] == "0" and s["bad"] == "0" for s in scans), scans
        overlays = [Path(p) for d in res["domains"] for p in d["disks"].values()]
        verdict = check_images(overlays)
        assert verdict.consistent and verdict.max >= done, (verdict, done)
        assert max(int(s["max"]) for s in scans) == verdict.max
        out = cli("failover", grp.name, "--target", str(target), "--rollback")
        assert "rolled back" in out.stdout
        for n in names:
            assert labdom.get(conn, n).group == grp.name  # the original (lab) definition is back
        assert not (target / grp.name / "recovery").exists()


def serial_logs(res: dict[str, object]) -> list[Path]:
    doms = res["domains"]
    assert isinstance(doms, list)
    return [Path(next(iter(d["disks"].values()))).parent / "serial0.log" for d in doms]


@pytest.mark.slow
def test_failover_reverse_failback_story(conn: libvirt.virConnect, lab_group: GroupFactory, target: Path) -> None:
    """2 VMs x 4 disks: disaster, failover (time to recover), reverse (ratio), failback; write order in both directions."""
    grp = lab_group(vms=2, disks=4, size=16 << 20, tag="story")
    names = [m.name for m in grp.members]
    logs = [m.directory / "console.log" for m in grp.members]
    home = labdom.lab_root() / unique_name("rcvhome")
    try:
        for _ in range(2):
            done = labdom.wait_for_done(logs, after=(grp.last_done or 0) + 10)
            cli("sync", *names, "--set", grp.name, "--target", str(target), "--fence", "suspend", "--deadline", "15000")
        with restored(conn, names):
            relay.stop(grp.directory, grp.name)
            for n in names:
                lv.lookup(conn, n).destroy()
            t0 = time.monotonic()
            fo = cli_json("failover", grp.name, "--target", str(target), "--force")
            assert isinstance(fo, dict)
            scans = [wait_scan(p) for p in serial_logs(fo)]
            recover_s = time.monotonic() - t0
            overlays = [Path(p) for d in fo["domains"] for p in d["disks"].values()]
            verdict = check_images(overlays)
            assert verdict.consistent and verdict.max >= done and all(s["holes"] == "0" for s in scans)
            # the workload goes on at the replica site
            relay.start(grp.directory, grp.name, names, uri=URI)
            labdom.wait_for_done(serial_logs(fo), after=verdict.max + 30, timeout=120)
            rev = cli_json("reverse", grp.name, "--target", str(target), "--to", str(home), "--deadline", "15000")
            assert isinstance(rev, dict) and rev["seeded"] and rev["seed_bytes_shipped"] == 0 and not rev["seed_full"]
            ratio = rev["shipped_over_changed"]
            assert rev["changed_bytes"] > 0 and ratio is not None and ratio <= 1.1
            assert rev["bytes_shipped"] < rev["disk_bytes"] / 4
            labdom.wait_for_done(serial_logs(fo), after=labdom.wait_for_done(serial_logs(fo)) + 20, timeout=120)
            cli("sync", *names, "--set", grp.name, "--target", str(home), "--fence", "suspend", "--deadline", "15000")
            relay.stop(grp.directory, grp.name)
            last = max(d for p in serial_logs(fo) if (d := labdom.read_console(p).done) is not None)
            # killed between retiring the failover run and starting the originals: run again, it finishes
            argv = [sys.executable, "-m", "libvirt_cgrep", "-c", URI, "failback", grp.name, "--target", str(target)]
            env = {**os.environ, "CGREP_FAULT_FAILBACK": "after-retire"}
            cut = subprocess.run([*argv, "--to", str(home)], env=env, capture_output=True, timeout=600, check=False)
            assert cut.returncode == 99 and cli_json("recovery", str(target)) == [], cut.stderr
            assert not any(lv.lookup(conn, n).isActive() for n in names)
            fb = cli_json("failback", grp.name, "--target", str(target), "--to", str(home))
            assert isinstance(fb, dict) and fb["originals"] == names
            assert all(lv.state(lv.lookup(conn, n)) == "running" for n in names)
            runs = cli_json("recovery", str(home))
            assert isinstance(runs, list) and [r["kind"] for r in runs] == ["failback"]
            assert cli_json("recovery", str(target)) == []
            home_logs = [Path(str(p).replace(str(target), str(home))) for p in serial_logs(fo)]
            home_logs = sorted((home / grp.name / "recovery").glob("failback-*/*/serial0.log"))
            home_scans = [wait_scan(p) for p in home_logs]
            assert all(s["holes"] == "0" and s["bad"] == "0" for s in home_scans)
            assert max(int(s["max"]) for s in home_scans) >= last
            # protection in the original direction resumes with deltas
            relay.start(grp.directory, grp.name, names, uri=URI)
            labdom.wait_for_done(home_logs, after=last + 20, timeout=120)
            back = cli_json(
                "sync", *names, "--set", grp.name, "--target", str(target), "--fence", "suspend", "--deadline", "15000"
            )
            assert isinstance(back, dict) and not any(d["full"] for d in back["disks"])
            for t in (target, home):
                newest = cli_json("points", str(t))[-1]["id"]  # type: ignore[index]
                v = cli_json("verify", str(t), "--point", newest, "--write-order")
                assert isinstance(v, list) and v[0]["ok"] and v[0]["write_order"]["consistent"], (t, v)
            print(
                f"2 VMs x 4 disks: time to recover {recover_s:.1f} s (failover command {fo['seconds']:.1f} s); "
                f"reverse shipped {rev['bytes_shipped']} B for "
                f"{rev['changed_bytes']} B changed (ratio {ratio}, disks {rev['disk_bytes']} B, seed shipped 0 B); "
                f"failback {fb['seconds']:.1f} s, final point {fb['final_bytes_shipped']} B; "
                f"first cycle home->replica shipped {back['bytes_shipped']} B for {back['changed_bytes']} B "
                f"(load {os.getloadavg()[0]:.1f})"
            )
            relay.stop(grp.directory, grp.name)
    finally:
        shutil.rmtree(home, ignore_errors=True)
