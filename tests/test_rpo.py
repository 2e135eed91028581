"""Unit tests of the pure RPO maths, retention and protection metadata (no QEMU)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.core import rpo
from libvirt_cgrep.core.retention import PointTime, Policy, prune
from libvirt_cgrep.errors import UsageError

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "secs"), [("30s", 30), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1h30m", 5400)])
def test_parse_duration(text: str, secs: int) -> None:
    assert rpo.parse_duration(text) == secs


@pytest.mark.parametrize("bad", ["", "5", "5x", "m5", "-5s", "5 s", "0s", "8d", "1.5m", "5s;rm", "5m5"])
def test_parse_duration_is_strict(bad: str) -> None:
    with pytest.raises(UsageError):
        rpo.parse_duration(bad)


def test_next_start_leaves_room_for_the_whole_cycle() -> None:
    assert rpo.predict(()) == rpo.predict((1.0,)) == rpo.DEFAULT_PREDICTION
    g = rpo.GroupView(rpo=60, newest=T0, durations=(4.0, 10.0, 6.0))
    start = rpo.next_start(g, T0, margin=2.0)
    assert start == T0 + timedelta(seconds=60 - rpo.SAFETY * 10.0 - 2.0)
    assert rpo.next_start(rpo.GroupView(rpo=60, newest=None), T0, 2.0) == T0


def test_backoff_never_exceeds_rpo_unless_failure_persists() -> None:
    waits = [rpo.backoff(n, 30) for n in range(1, rpo.PERSIST)]
    assert waits == sorted(waits) and max(waits) <= 30
    assert rpo.backoff(rpo.PERSIST + 5, 30) > 30
    assert rpo.backoff(0, 30) == 0


def test_classify() -> None:
    fresh = rpo.GroupView(rpo=60, newest=T0, durations=(5.0,))
    assert rpo.classify(fresh, T0 + timedelta(seconds=10)) == "ok"
    assert rpo.classify(fresh, T0 + timedelta(seconds=58)) == "at-risk"
    assert rpo.classify(fresh, T0 + timedelta(seconds=61)) == "violated"
    assert rpo.classify(rpo.GroupView(rpo=60, newest=None), T0) == "violated"
    assert rpo.classify(rpo.GroupView(rpo=60, newest=T0, paused=True), T0 + timedelta(days=1)) == "paused"
    failing = rpo.GroupView(rpo=60, newest=T0, durations=(5.0,), failures=2, last_failure=T0)
    assert rpo.classify(failing, T0 + timedelta(seconds=1)) == "error"


def test_alerts_are_paired_edges() -> None:
    seq = ["unknown", "violated", "violated", "ok", "at-risk", "at-risk", "violated", "paused", "ok"]
    kinds = [e.kind for a, b in itertools.pairwise(seq) for e in rpo.alert_edges(a, b)]
    assert kinds == ["rpo-violated", "rpo-restored", "rpo-at-risk", "rpo-violated", "rpo-restored"]
    assert kinds.count("rpo-violated") == kinds.count("rpo-restored")


def pts(hours: list[float]) -> list[PointTime]:
    return [PointTime(f"p{i}", T0 + timedelta(hours=h)) for i, h in enumerate(hours)]


def test_prune_keep_last_keeps_newest() -> None:
    points = pts([0, 1, 2, 3, 4])
    assert prune(points, T0 + timedelta(hours=5), Policy(keep_last=2)) == ("p0", "p1", "p2")
    assert prune(points[:1], T0, Policy(keep_last=1)) == ()


def test_prune_tiers_and_future_points() -> None:
    points = pts([0, 0.5, 1, 1.5, 2, 26, 26.5])
    doomed = prune(points, T0 + timedelta(hours=27), Policy(keep_last=1, keep_hourly=2, keep_daily=2))
    # hourly keeps p6 (hour 26) and p5 (hour 26 is shared: next distinct hour 2 -> p4); daily keeps p4's day too
    assert "p6" not in doomed and "p4" not in doomed and "p0" in doomed
    # a point newer than now is never pruned
    assert "p6" not in prune(points, T0, Policy(keep_last=1))


def test_policy_must_keep_something() -> None:
    with pytest.raises(UsageError):
        Policy(keep_last=0)


def test_protection_roundtrip_and_validation() -> None:
    p = prot.Protection(target="ssh://root@replica:22/srv/r", rpo=300, group="app1", keep=5, fence="suspend")
    xml = p.to_xml()
    assert prot.from_xml(xml) == p
    dom = f"<domain><metadata><cgrep:protection xmlns:cgrep='{prot.NS}' {xml[len('<protection ') : -2]}/></metadata></domain>"
    assert prot.from_domain_xml(dom) == p
    assert prot.from_domain_xml("<domain><metadata/></domain>") is None
    for bad in ({"rpo": 0}, {"group": "a/b"}, {"fence": "freeze"}, {"keep": 0}):
        with pytest.raises(UsageError):
            prot.Protection(**{"target": "/x", "rpo": 60, **bad})  # type: ignore[arg-type]
