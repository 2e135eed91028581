"""Pure parts of continuous mode: replica cut plans, mirror states, export names, protection metadata."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from libvirt_cgrep.core import continuous as cc
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.errors import UsageError

PID = "20261125T101500.123456Z"
NOW = datetime(2026, 11, 25, 10, 16, tzinfo=UTC)


def test_first_live_images_are_bases_with_staging_names() -> None:
    live = cc.first_live([("db1", "vda", 1 << 20), ("db2", "vdb", 2 << 20)], 1)
    assert [d.backing for d in live] == [None, None]
    assert live[0].image == "disks/db1/vda/.staging-live1.qcow2"
    assert len({d.node for d in live}) == 2 and all(len(d.node) <= 31 for d in live)


def test_plan_cut_is_one_transaction_over_every_disk() -> None:
    live = cc.first_live([("a", "vda", 1), ("a", "vdb", 1), ("b", "vda", 1)], 1)
    plan = cc.plan_cut(PID, live, 2)
    assert len(plan.pairs()) == 3 and [p[0] for p in plan.pairs()] == [d.node for d in live]
    for s in plan.steps:
        assert s.final == f"disks/{s.old.domain}/{s.old.target}/{PID}.qcow2"
        assert s.new.backing == f"{PID}.qcow2" and s.new.image.endswith(".staging-live2.qcow2")
        assert s.new.node != s.old.node
    with pytest.raises(ValueError):
        cc.plan_cut(PID, live, 1)  # same generation: names would collide
    with pytest.raises(ValueError):
        cc.plan_cut("not-an-id", live, 2)
    with pytest.raises(ValueError):
        cc.plan_cut(PID, (), 2)


def test_mirror_state() -> None:
    assert cc.mirror_state({"a/vda": "ready", "a/vdb": "ready"}) == "in-sync"
    assert cc.mirror_state({"a/vda": "ready", "a/vdb": "syncing"}) == "syncing"
    assert cc.mirror_state({"a/vda": "ready", "a/vdb": "failed"}) == "degraded"
    assert cc.mirror_state({"a/vda": "gone"}) == "degraded"
    assert cc.mirror_state({}) == "degraded"


def test_export_names_are_validated() -> None:
    assert cc.export_name("db1", "vda") == "db1.vda"
    with pytest.raises(UsageError):
        cc.export_name("a/b", "vda")


def test_protection_continuous_round_trip() -> None:
    p = prot.Protection(target="/srv/r", rpo=300, mode="continuous", interval=60, replica_timeout=5)
    assert prot.from_xml(p.to_xml()) == p
    assert prot.from_xml(prot.Protection(target="/srv/r", rpo=300).to_xml()).mode == "snapshot"
    with pytest.raises(UsageError):
        prot.Protection(target="/srv/r", rpo=300, mode="continuous", interval=0)
    with pytest.raises(UsageError):
        prot.Protection(target="/srv/r", rpo=300, mode="mirror")


def test_metrics_expose_mirror_state_and_point_age() -> None:
    """The agent's continuous collector: one series per state (1 for the current one) and the last point's age."""
    import time
    from types import SimpleNamespace
    from typing import Any, cast

    import prometheus_client as pc

    from libvirt_cgrep.agent.continuous import Continuous, _Group

    c = Continuous(cast(Any, SimpleNamespace()), None)
    c.groups["g1"] = _Group(mirror="in-sync", last_point_time=time.time() - 3)
    reg = pc.CollectorRegistry()
    c.metrics(reg)
    text = pc.generate_latest(reg).decode()
    assert 'cgrep_continuous_mirror_state{group="g1",state="in-sync"} 1.0' in text
    assert 'cgrep_continuous_mirror_state{group="g1",state="degraded"} 0.0' in text
    age = next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("cgrep_continuous_point_age_seconds{"))
    assert 2.5 < age < 60


def test_resync_progress_and_mode_label() -> None:
    """status's MODE column shows a resync's percent while syncing, never above 100 % (QEMU's total may grow)."""
    assert cc.resync_percent(None, None) is None and cc.resync_percent(5, 0) is None
    assert cc.resync_percent(50, 200) == 25.0 and cc.resync_percent(300, 200) == 100.0
    assert cc.mode_label("snapshot", None) == "snapshot"
    assert cc.mode_label("continuous", "syncing", 1 << 20, 4 << 20) == "continuous/syncing 25%"
    assert cc.mode_label("continuous", "syncing") == "continuous/syncing"
    assert cc.mode_label("continuous", "in-sync", 1, 2) == "continuous/in-sync"


def test_metrics_and_sidecar_carry_resync_progress(tmp_path: Path) -> None:
    """progress events of a syncing child reach Prometheus and status's sidecar; in-sync clears them."""
    from types import SimpleNamespace
    from typing import Any, cast

    import prometheus_client as pc

    from libvirt_cgrep.agent.continuous import Continuous, _Group, read_sidecar

    c = Continuous(cast(Any, SimpleNamespace()), tmp_path / "continuous.json")
    g = c.groups["g1"] = _Group(mirror="syncing")
    rt = cast(Any, SimpleNamespace())
    c._event(rt, g, {"event": "progress", "done": 3 << 20, "total": 8 << 20}, cast(Any, None))
    c._write()
    assert read_sidecar(tmp_path)["g1"]["resync_done"] == 3 << 20
    reg = pc.CollectorRegistry()
    c.metrics(reg)
    text = pc.generate_latest(reg).decode()
    assert 'cgrep_continuous_resync_done_bytes{group="g1"} 3.145728e+06' in text
    assert 'cgrep_continuous_resync_total_bytes{group="g1"} 8.388608e+06' in text
    g.degraded = False
    c._event(rt, g, {"event": "in-sync"}, cast(Any, None))
    c.agent = cast(Any, SimpleNamespace(db=SimpleNamespace(add_cycle=lambda *a, **k: None)))
    point = {"event": "point", "point_id": PID, "time_utc": "2026-11-25T10:15:00.123456Z", "cut_ms": 3.0, "write_ms": 1.5}
    c._event(cast(Any, SimpleNamespace(spec=SimpleNamespace(name="g1"))), g, point, cast(Any, None))
    c._write()
    assert read_sidecar(tmp_path)["g1"]["write_ms"] == 1.5
    assert 'cgrep_continuous_write_latency_seconds{group="g1"} 0.0015' in pc.generate_latest(reg).decode()
    assert g.resync_done is None and g.resync_total is None
    assert "cgrep_continuous_resync_done_bytes{" not in pc.generate_latest(reg).decode()


def test_mean_write_ms() -> None:
    """The mean latency between two (operations, ns) samples; None without writes or after a counter reset."""
    assert cc.mean_write_ms((10, 1_000_000), (20, 21_000_000)) == 2.0
    assert cc.mean_write_ms((10, 5), (10, 5)) is None
    assert cc.mean_write_ms((10, 5_000_000), (3, 1_000)) is None


# ---------------------------------------------------------------- restart without a recopy
def _ids(*paths: str) -> dict[str, cc.FileId]:
    return {p: cc.FileId(p, 1 << 20, 8, 100 + i, 1_700_000_000_000_000_000 + i) for i, p in enumerate(paths)}


def test_overlay_names_are_ours_and_do_not_grow() -> None:
    o1 = cc.overlay_path("/v/db-vda.qcow2", PID)
    assert o1 == f"/v/db-vda.cgrep-{PID}.qcow2" and cc.is_overlay(o1)
    later = "20261126T101500.000001Z"
    assert cc.overlay_path(o1, later) == f"/v/db-vda.cgrep-{later}.qcow2"
    assert not cc.is_overlay("/v/db-vda.qcow2") and not cc.is_overlay("/v/x.cgrep-notapoint.qcow2")
    assert cc.fold_plan([o1, "/v/db-vda.qcow2"]) is None  # the overlay is the active image: nothing to fold
    o2 = cc.overlay_path(o1, later)
    assert cc.fold_plan([o2, o1, "/v/db-vda.qcow2", "/t/template.qcow2"]) == ("/v/db-vda.qcow2", o1)
    assert cc.fold_plan([o2, "/v/db-vda.qcow2", "/t/template.qcow2"]) is None  # never the operator's own layers


def test_check_resume_needs_the_same_chain_with_unchanged_images() -> None:
    ids = _ids("/v/a.qcow2", "/v/b.qcow2")
    top_a, top_b = cc.overlay_path("/v/a.qcow2", PID), cc.overlay_path("/v/b.qcow2", PID)
    rec = (
        cc.ResumeDisk("db", "vda", top_a, (ids["/v/a.qcow2"],), "d1"),
        cc.ResumeDisk("db", "vdb", top_b, (ids["/v/b.qcow2"],), "d2"),
    )
    assert cc.resume_from_dict(cc.resume_to_dict(rec)) == rec
    chains = {("db", "vda"): (top_a, "/v/a.qcow2"), ("db", "vdb"): (top_b, "/v/b.qcow2")}
    assert cc.check_resume(rec, chains, ids) is None
    assert "not the final point" in str(cc.check_resume(None, chains, ids))
    touched = {**ids, "/v/a.qcow2": cc.FileId("/v/a.qcow2", 1 << 20, 8, 100, 1)}
    assert "changed since the final point" in str(cc.check_resume(rec, chains, touched))
    gone = {"/v/b.qcow2": ids["/v/b.qcow2"]}
    assert "changed since" in str(cc.check_resume(rec, chains, gone))
    other_top = {**chains, ("db", "vda"): ("/v/a-snap.qcow2", "/v/a.qcow2")}
    assert "not the overlay" in str(cc.check_resume(rec, other_top, ids))
    deeper = {**chains, ("db", "vda"): (top_a, "/v/a.qcow2", "/t/template.qcow2")}
    assert "images below" in str(cc.check_resume(rec, deeper, {**ids, **_ids("/t/template.qcow2")}))
    assert "disks differ" in str(cc.check_resume(rec, {("db", "vda"): chains[("db", "vda")]}, ids))
    assert cc.resume_from_dict({"version": 99, "disks": []}) is None
    assert cc.resume_from_dict({"version": cc.RESUME_VERSION, "disks": [{"domain": "db"}]}) is None


def test_resumed_first_live_images_are_overlays_of_the_final_point() -> None:
    live = cc.first_live([("db", "vda", 1 << 20)], 1, over=PID)
    assert live[0].backing == f"{PID}.qcow2" and live[0].image == "disks/db/vda/.staging-live1.qcow2"


def test_agent_clean_stop_is_no_fault(tmp_path: Path) -> None:
    """A child's ``stopped`` event (a final point committed) and its exit 0: mirror ``stopped``, an informational
    ``continuous-stopped`` alert (no ``continuous-degraded``), then ``continuous-restored`` once in sync again."""
    from types import SimpleNamespace
    from typing import Any, cast

    from libvirt_cgrep.agent.continuous import Continuous, _Group, read_sidecar

    alerts: list[str] = []
    agent = SimpleNamespace(
        stopping=False,
        db=SimpleNamespace(add_alert=lambda group, kind, *a: alerts.append(kind)),
        sink=SimpleNamespace(deliver=lambda a: None),
    )
    c = Continuous(cast(Any, agent), tmp_path / "continuous.json")
    g = c.groups["g1"] = _Group(mirror="in-sync")
    rt = cast(Any, SimpleNamespace(spec=SimpleNamespace(name="g1"), state="ok"))
    c._event(rt, g, {"event": "stopped", "point_id": PID, "resumable": True, "reason": None}, NOW)
    c._event(rt, g, {"event": "exit", "code": 0, "stderr": [""]}, NOW)
    c._write()
    assert g.mirror == "stopped" and not g.degraded and alerts == ["continuous-stopped"]
    assert read_sidecar(tmp_path)["g1"]["mirror"] == "stopped"
    c._event(rt, g, {"event": "in-sync", "resume": PID, "copied_bytes": 4096}, NOW)
    assert g.mirror == "in-sync" and g.resumed_from == PID and g.copied_bytes == 4096
    assert alerts == ["continuous-stopped", "continuous-restored"]
