"""Consistency groups as a protected unit: protect --group, the agent's group cycles, blocked members, faults.

Real libvirtd, lab groups (the cross-VM dependent-write chain through the host
relay), the agent as a process, targets checked with ``verify --write-order``
(the union of every member's images of a point must hold records 0..max).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.agent.db import GroupRow
from libvirt_cgrep.agent.scheduler import GroupSpec
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.core.model import Transaction
from libvirt_cgrep.engine.libvirt_backend import LibvirtBackend, disks_of
from libvirt_cgrep.engine.point import FAULT_HOLD_SLEEP_ENV
from libvirt_cgrep.engine.sync import sync
from libvirt_cgrep.errors import CutError
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.check import check_images
from libvirt_cgrep.replica.link import parse_target
from tests.conftest import URI, GroupFactory
from tests.test_agent import agent_dir, alerts, stop_agent
from tests.test_agent_faults import cgrep_processes, kinds, launch, point_ids, row, wait_for
from tests.test_lab_group import done_max, wait_chain

__all__ = ["agent_dir"]  # the fixture, re-exported for pytest

#: a generous deadline for syncs by hand: a loaded host must not turn a slow hold into a failed cycle of a test
#: about something else (the deadline itself is tested in test_point_libvirt.py)
LONG = ("--deadline", "10000")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", URI, *args], capture_output=True, text=True, timeout=600, check=False
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def points(target: Path, group: str) -> list[dict[str, Any]]:
    if not (target / "cgrep-replica.json").exists():
        return []
    pts: list[dict[str, Any]] = json.loads(cli("points", str(target), "--set", group, "--json").stdout)
    return pts


def members_of(conn: libvirt.virConnect, name: str) -> tuple[str | None, tuple[str, ...]]:
    xml = lv.lookup(conn, name).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, prot.NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    p = prot.from_xml(xml)
    return p.group, p.members


def tops(conn: libvirt.virConnect, name: str, persistent: bool = False) -> dict[str, str]:
    dom = lv.lookup(conn, name)
    return {d.target: d.image for d in disks_of(lv.persistent_xml(dom) if persistent else lv.live_xml(dom))}


# ---------------------------------------------------------------------------- pure


def test_group_spec_blocked_reasons() -> None:
    p = prot.Protection(target="/r", rpo=60, group="g", members=("a", "b"), fence="suspend")
    ok = GroupSpec("g", ("a", "b"), p, ("running", "running"))
    assert ok.blocked() is None
    down = GroupSpec("g", ("a", "b"), p, ("running", "shutoff"))
    assert down.blocked() == "member b is shutoff: no partial group point"
    assert GroupSpec("g", ("a", "b"), p, ("shutoff", "shutoff")).blocked() is None  # the whole group is off: paused
    gone = GroupSpec("g", ("a",), p, ("running",), missing=("b",))
    assert "member b of group g is missing" in str(gone.blocked())
    assert GroupSpec("g", ("a",), p, ("running",), problem="members disagree").blocked() == "members disagree"
    assert prot.from_xml(p.to_xml()) == p
    with pytest.raises(Exception, match="only for a group"):
        prot.Protection(target="/r", rpo=60, members=("a",))


def test_state_db_reads_old_and_new_member_columns(tmp_path: Path) -> None:
    from libvirt_cgrep.agent.db import StateDB

    db = StateDB(tmp_path / "agent.db")
    row_ = GroupRow("g", ("a", "b"), "/r", 60.0, "ok", None, None, None, 0, None, None, None, 1.0, ("running", "missing"))
    db.upsert_group(row_)
    assert db.groups() == [row_]
    db.conn.execute("UPDATE groups SET members = ?", (json.dumps(["a", "b"]),))  # written by an older agent
    assert db.groups()[0].members == ("a", "b") and db.groups()[0].member_states == ()
    db.close()


# ---------------------------------------------------------------------------- the agent: one group, one unit


def test_agent_protects_a_group_as_one_unit(
    conn: libvirt.virConnect, lab_group: GroupFactory, agent_dir: Path, tmp_path: Path
) -> None:
    """protect A B --group G; the agent commits 10 group points, all consistent across VMs on the target; retention per group."""
    grp = lab_group(vms=2, disks=1, tag="agrp")
    a, b = (m.name for m in grp.members)
    g = grp.name + "-set"
    target = tmp_path / "replica"
    # refusals first: nothing is written
    assert cli("protect", a, b, "--target", str(target), "--rpo", "10s", check=False).returncode == 64
    bad = cli("protect", a, b, "--group", g, "--target", str(target), "--rpo", "10s", "--fence", "none", check=False)
    assert bad.returncode == 64 and bad.stderr.count("\n") == 1
    with pytest.raises(libvirt.libvirtError):
        members_of(conn, a)
    cli("protect", a, b, "--group", g, "--target", str(target), "--rpo", "10s", "--keep", "10")
    assert members_of(conn, a) == members_of(conn, b) == (g, (a, b))
    # a member's settings must agree with the group's
    other = cli("protect", a, "--group", g, "--target", str(target), "--rpo", "1m", check=False)
    assert other.returncode == 64 and "one target, RPO and fence" in other.stderr
    agent = launch(agent_dir, g)
    seen_rows: list[dict[str, Any]] = []
    try:

        def enough() -> bool:
            r = row(agent_dir, g)
            return bool(r and sum(c["ok"] for c in r["cycles"]) >= 10)

        wait_for("10 group cycles", enough, 150, every=1.0)
        st = json.loads(cli("status", "--state-dir", str(agent_dir), "--json").stdout)
        seen_rows = [r for r in st if r["group"] == g]
        table = cli("status", "--state-dir", str(agent_dir)).stdout
    finally:
        rc = stop_agent(agent)
    assert rc == 0
    assert len(seen_rows) == 1
    r = seen_rows[0]
    held = ("running", "paused")  # "paused" while the agent's own cycle holds them
    assert r["members"] == [a, b] and [m["domain"] for m in r["member_rows"]] == [a, b]
    assert all(m["state"] in held for m in r["member_rows"]), r
    lines = table.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith(g))
    rows = [lines[at + 1].split(), lines[at + 2].split()]
    assert [x[0] for x in rows] == [a, b] and all(x[1] in held and len(x) == 2 for x in rows), table
    assert all(grp_m.state == "running" for grp_m in labdom.get_group(conn, grp.name).members)
    assert not [k for k in kinds(agent_dir, g) if k.startswith("group-")], "the agent's own hold blocked its group"
    pts = points(target, g)
    assert len(pts) == 10 and all(p["domains"] == [a, b] and p["fence"] == "suspend" for p in pts)
    res = json.loads(cli("verify", str(target), "--set", g, "--write-order", "--json").stdout)
    assert len(res) == 10 and all(v["ok"] and v["write_order"]["consistent"] for v in res), res
    # retention per group: one more group cycle by hand (sync --group) keeps the newest 10
    cli("sync", "--group", g, "--target", str(target), "--fence", "suspend", "--keep", "10", *LONG)
    after = points(target, g)
    assert len(after) == 10 and after[0]["id"] == pts[1]["id"] and after[-2]["id"] == pts[-1]["id"]
    assert json.loads(cli("verify", str(target), "--set", g, "--point", after[0]["id"], "--write-order", "--json").stdout)[0][
        "ok"
    ]
    pts = after
    # `lab check` of the newest point's images on the target (the union of both VMs)
    newest = [d["image"] for d in pts[-1]["disks"]]
    assert cli("lab", "check", *newest).returncode == 0
    alone = [d["image"] for d in pts[-1]["disks"] if d["domain"] == a]
    assert cli("lab", "check", *alone, check=False).returncode != 0  # one VM alone has every other record only
    hist = json.loads(cli("history", g, "--state-dir", str(agent_dir), "--json").stdout)["cycles"]
    holds = sorted(c["hold_ms"] for c in hist if c["ok"] and c["hold_ms"] is not None)
    print(f"agent group {a}+{b}: {len(hist)} cycles, group hold median {holds[len(holds) // 2]:.0f} ms; load {os.getloadavg()}")
    assert kinds(agent_dir, g)[:2] == ["rpo-violated", "rpo-restored"]


def test_member_down_blocks_the_group_until_unprotected(
    conn: libvirt.virConnect, lab_group: GroupFactory, agent_dir: Path, tmp_path: Path
) -> None:
    """A shut-off member fails the group's cycles (error + group-blocked alert, no partial point); unprotect takes it out.

    Also: a member whose protection vanished behind our back is "missing": point/sync --group refuse.
    """
    grp = lab_group(vms=2, disks=1, tag="bgrp")
    a, b = (m.name for m in grp.members)
    g = grp.name + "-set"
    target = tmp_path / "replica"
    cli("protect", a, b, "--group", g, "--target", str(target), "--rpo", "5s")
    # b's element removed behind our back: the group is incomplete, a point of it is refused
    lv.lookup(conn, b).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        None,
        None,
        prot.NS,
        libvirt.VIR_DOMAIN_AFFECT_CONFIG | libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    refused = cli("point", "--group", g, "--fence", "suspend", check=False)
    assert refused.returncode == 66 and f"member {b} of group '{g}' is missing" in refused.stderr, refused.stderr
    refused = cli("sync", "--group", g, "--target", str(target), "--fence", "suspend", check=False)
    assert refused.returncode == 66 and not points(target, g)
    cli("protect", b, "--group", g, "--target", str(target), "--rpo", "5s")
    assert members_of(conn, a) == (g, (a, b))
    agent = launch(agent_dir, g)
    try:
        wait_for("a first group point", lambda: points(target, g), 90, every=0.5)
        lv.lookup(conn, b).destroy()  # b is shut off
        t_down = time.time()
        wait_for("a group-blocked alert", lambda: "group-blocked" in kinds(agent_dir, g), 30)
        n_before = len(points(target, g))

        def failed_cycle() -> dict[str, Any] | None:
            r = row(agent_dir, g)
            return next((c for c in (r or {}).get("cycles", []) if not c["ok"] and c["started"] > t_down), None)

        failure = wait_for("a failed group cycle", failed_cycle, 40)
        assert f"member {b} is shutoff: no partial group point" in failure["error"]
        st = next(r for r in json.loads(cli("status", "--state-dir", str(agent_dir), "--json").stdout) if r["group"] == g)
        assert st["member_rows"] == [{"domain": a, "state": "running"}, {"domain": b, "state": "shutoff"}]
        assert st["state"] in ("error", "at-risk", "violated") and "shutoff" in st["last_error"]
        assert len(points(target, g)) == n_before, "a group point was committed without a member"
        assert all(p["domains"] == [a, b] for p in points(target, g))
        # a restarted agent keeps the open group-blocked: its blocked cycles raise no second one
        assert stop_agent(agent) == 0
        t_restart = time.time()
        agent = launch(agent_dir, g)

        def failed_after_restart() -> bool:
            r = row(agent_dir, g)
            return any(not c["ok"] and c["started"] > t_restart for c in (r or {}).get("cycles", []))

        wait_for("a failed group cycle after the restart", failed_after_restart, 60)
        # the operator takes b out of the group: a goes on alone
        out = cli("unprotect", b)
        assert "left group" in out.stdout and members_of(conn, a) == (g, (a,))
        wait_for("a group-unblocked alert", lambda: "group-unblocked" in kinds(agent_dir, g), 30)
        wait_for("a point of the remaining member", lambda: points(target, g)[-1]["domains"] == [a], 60, every=0.5)
    finally:
        rc = stop_agent(agent)
    assert rc == 0
    k = kinds(agent_dir, g)
    blocked = [x for x in k if x.startswith("group-")]
    assert blocked == ["group-blocked", "group-unblocked"], k
    msg = next(x["message"] for x in alerts(agent_dir) if x["kind"] == "group-blocked")
    assert b in msg and "shutoff" in msg
    res = json.loads(cli("verify", str(target), "--set", g, "--json").stdout)
    assert all(v["ok"] for v in res)
    assert labdom.get(conn, a).state == "running"


# ---------------------------------------------------------------------------- faults


def test_agent_sigkilled_during_a_group_hold(
    conn: libvirt.virConnect, lab_group: GroupFactory, agent_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL of the agent while its cycle holds both members: both run again within the deadline + 1 s; nothing committed."""
    grp = lab_group(vms=2, disks=1, tag="kgrp")
    names = [m.name for m in grp.members]
    g = grp.name + "-set"
    target = tmp_path / "replica"
    cli("protect", *names, "--group", g, "--target", str(target), "--rpo", "20s")
    doms = [lv.lookup(conn, n) for n in names]
    deadline_s = 2.0  # the sync default the agent uses
    agent = launch(agent_dir, g, env={FAULT_HOLD_SLEEP_ENV: "1000"})  # every hold lasts over 1 s
    try:
        t_end = time.monotonic() + 120
        while not all(d.state()[0] == libvirt.VIR_DOMAIN_PAUSED for d in doms):
            assert time.monotonic() < t_end, "the agent's group cycle never held both members"
            assert agent.poll() is None, "the agent died"
            time.sleep(0.005)
        paused_at = time.monotonic()
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        while not all(d.state()[0] == libvirt.VIR_DOMAIN_RUNNING for d in doms):
            assert time.monotonic() - paused_at < deadline_s + 1, "a member still paused past the deadline + 1 s"
            time.sleep(0.005)
        resumed_ms = 1000 * (time.monotonic() - paused_at)

        def left() -> list[str]:
            return [p for n in names for p in cgrep_processes(n) if "lab.relay" not in p]

        t_end = time.monotonic() + 60
        while left():
            assert time.monotonic() < t_end, f"the orphaned cycle still runs 60 s after the agent died: {left()}"
            time.sleep(0.1)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    print(f"SIGKILL in a group hold: both members running {resumed_ms:.0f} ms after both were paused")
    assert point_ids(target) == [], "the cycle interrupted in its hold must not commit"
    wait_chain(labdom.get_group(conn, grp.name), records=20)


class CorruptingBackend(LibvirtBackend):
    """The real backend, with one overlay truncated after it was prepared: this member's transaction must fail."""

    def prepare(self, txn: Transaction) -> None:
        super().prepare(txn)
        os.truncate(txn.actions[-1].overlay, 0)


def test_one_members_transaction_fails(conn: libvirt.virConnect, lab_group: GroupFactory, tmp_path: Path) -> None:
    """One member's cut fails inside the group hold: no group point, every member runs on a valid chain, nothing lost."""
    grp = lab_group(vms=2, disks=1, tag="fgrp")
    a, b = (m.name for m in grp.members)
    target = tmp_path / "replica"
    g = grp.name + "-set"
    cli("sync", a, b, "--set", g, "--target", str(target), "--fence", "suspend", *LONG)  # a first point
    before = point_ids(target)
    b_live, b_conf = tops(conn, b), tops(conn, b, persistent=True)
    acked = done_max(grp)
    backends = [LibvirtBackend(lv.connect(URI), a, URI), CorruptingBackend(lv.connect(URI), b, URI)]
    try:
        with pytest.raises(CutError):
            sync(backends, parse_target(str(target)), set_name=g, fence="suspend", deadline_ms=10_000)
    finally:
        for be in backends:
            be.close()
    assert point_ids(target) == before, "a group point was committed although a member's transaction failed"
    for n in (a, b):
        assert lv.state(lv.lookup(conn, n)) == "running"
        assert tops(conn, n) == tops(conn, n, persistent=True), f"{n}: live and persistent definitions disagree"
    assert tops(conn, b) == b_live and tops(conn, b, persistent=True) == b_conf, "the failed member's chain changed"
    wait_chain(labdom.get_group(conn, grp.name), records=20)
    # nothing acknowledged is lost: the next group point (on these chains) holds every record DONE before the fault
    cli("sync", a, b, "--set", g, "--target", str(target), "--fence", "suspend", *LONG)
    res = json.loads(cli("verify", str(target), "--set", g, "--write-order", "--json").stdout)
    assert all(v["ok"] for v in res), res
    newest = points(target, g)[-1]
    verdict = check_images([Path(d["image"]) for d in newest["disks"]])
    assert verdict.consistent and verdict.max >= acked


# ---------------------------------------------------------------------------- 100 group points (slow)


@pytest.mark.slow
@pytest.mark.parametrize(("vms", "disks"), [(2, 4), (3, 2)])
def test_hundred_group_points_on_the_target(lab_group: GroupFactory, tmp_path: Path, vms: int, disks: int) -> None:
    """100 group syncs (one suspend fence over every member) into a target: 100/100 consistent across VMs there.

    A cycle whose hold passed its deadline (exit 73: the guardian resumed the guests, nothing was committed) is
    retried and counted: it says the host was overloaded, not that a point was wrong.
    """
    grp = lab_group(vms=vms, disks=disks, tag=f"h{vms}{disks}")
    names = [m.name for m in grp.members]
    target = tmp_path / "replica"
    g = grp.name + "-set"
    holds: list[float] = []
    overruns = 0
    while len(holds) < 100:
        wait_chain(grp, records=5)
        argv = ["sync", *names, "--set", g, "--target", str(target), "--fence", "suspend", "--keep", "100", *LONG, "--json"]
        out = cli(*argv, check=False)
        if out.returncode == 73 and overruns < 20:
            overruns += 1
            continue
        assert out.returncode == 0, out.stderr
        holds.append(float(json.loads(out.stdout).get("fence_ms") or 0))
    res = json.loads(cli("verify", str(target), "--set", g, "--write-order", "--json").stdout)
    consistent = sum(1 for v in res if v["ok"] and v["write_order"]["consistent"])
    holds.sort()
    print(
        f"{vms} VMs x {disks} disks: {consistent}/{len(res)} group points consistent on target; "
        f"hold median {holds[50]:.0f} ms; {overruns} holds past the deadline retried; load {os.getloadavg()}"
    )
    assert len(res) == 100 and consistent == 100
