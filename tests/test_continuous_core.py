"""Pure parts of continuous mode: replica cut plans, mirror states, export names, protection metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_cgrep.core import continuous as cc
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.errors import UsageError

PID = "20261125T101500.123456Z"


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
