"""RPO maths: when to start a cycle, what state a group is in, which alerts to raise. Pure.

The promise: the newest committed point is never older than the RPO. A
cycle's point is as old as its cut, which happens near the cycle's start, but
a point counts only once committed, at the end of its cycle, so the whole
cycle must fit between the start and the deadline. A group's next cycle starts
``lead`` seconds before the deadline (``newest cut + RPO``)::

    lead = max(SAFETY x predicted, SPIKE x slowest recent) + headroom + margin

``predicted`` is a high quantile (p90) of the recent durations (never the
mean: the tail is what misses deadlines), ``slowest recent`` covers a spike
(a loaded host makes a cycle take twice its usual time), ``headroom`` is a
fraction of the RPO (``HEADROOM`` x RPO, at most ``HEADROOM_MAX`` s) for what
no history shows, ``margin`` the operator's. When the lead is longer than the
RPO allows, cycles run back to back (each starts as soon as the last ends):
then the smallest RPO held is about the time from one cut to its commit plus
the next whole cycle, and only shorter cycles make it smaller.
A failing group
retries with exponential backoff whose cap never exceeds the RPO unless the
failure persists (``PERSIST`` failures in a row), and one group's schedule
never depends on another's.

Alerts are edges, not levels: ``rpo-violated`` once when the newest point
becomes older than the RPO, ``rpo-restored`` once when it is young enough
again (always paired), ``rpo-at-risk`` once when a running or due cycle is
predicted to finish past the deadline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from libvirt_cgrep.errors import UsageError

_DUR = re.compile(r"([0-9]+)(s|m|h|d)")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_RPO = 1
MAX_RPO = 7 * 86400
DEFAULT_PREDICTION = 5.0
#: Recent successful cycle durations the prediction looks at.
HISTORY = 20
#: The prediction's quantile of the recent durations.
QUANTILE = 0.9
BACKOFF_BASE = 1.0
PERSIST = 6
PERSISTENT_CAP = 3600.0
SAFETY = 1.5
#: Lead over the slowest recent cycle (a spike of 2x the usual is covered by SAFETY x p90 + SPIKE x max).
SPIKE = 1.25
#: Headroom as a fraction of the RPO, and its cap in seconds.
HEADROOM = 0.15
HEADROOM_MAX = 600.0


def parse_duration(text: str, what: str = "RPO", lo: int = MIN_RPO, hi: int = MAX_RPO) -> int:
    """Parse ``30s``, ``5m``, ``1h``, ``1d`` (or compounds like ``1h30m``) strictly into seconds."""
    t = text.strip()
    pos, total = 0, 0
    for m in _DUR.finditer(t):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise UsageError(f"invalid {what} {text!r}: expected a duration like 30s, 5m, 1h or 1d")
    if not lo <= total <= hi:
        raise UsageError(f"{what} {text!r} out of range: must be between {format_duration(lo)} and {format_duration(hi)}")
    return total


def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 86400 and s % 86400 == 0:
        return f"{s // 86400}d"
    if s >= 3600 and s % 3600 == 0:
        return f"{s // 3600}h"
    if s >= 60 and s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


@dataclass(frozen=True)
class GroupView:
    """What the scheduler knows about one group, as plain data."""

    rpo: float
    newest: datetime | None
    durations: tuple[float, ...] = ()
    failures: int = 0
    last_failure: datetime | None = None
    running_since: datetime | None = None
    paused: bool = False


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (``q`` in 0..1) of a non-empty sequence."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def predict(durations: Sequence[float]) -> float:
    """Predicted cycle duration: the p90 of the recent ones, and at least 5 s until 3 are known.

    (The first cycles are unrepresentative: the seed ships little of what a
    later cycle ships, so a young history must not make the schedule late.)
    """
    recent = list(durations)[-HISTORY:]
    if len(recent) < 3:
        return max([DEFAULT_PREDICTION, *recent])
    return quantile(recent, QUANTILE)


def headroom(rpo: float) -> float:
    """Seconds kept free before the deadline for what no history shows: a fraction of the RPO, capped."""
    return min(HEADROOM * rpo, HEADROOM_MAX)


def lead(durations: Sequence[float], rpo: float, margin: float) -> float:
    """How long before the deadline a cycle starts (may exceed the RPO: then cycles run back to back)."""
    recent = list(durations)[-HISTORY:]
    slowest = max(recent, default=0.0)
    return max(SAFETY * predict(recent), SPIKE * slowest) + headroom(rpo) + margin


def backoff(failures: int, rpo: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures."""
    if failures <= 0:
        return 0.0
    cap = rpo if failures < PERSIST else max(rpo, PERSISTENT_CAP)
    return float(min(BACKOFF_BASE * 2 ** (failures - 1), cap))


def deadline(g: GroupView) -> datetime | None:
    return None if g.newest is None else g.newest + timedelta(seconds=g.rpo)


def next_start(g: GroupView, now: datetime, margin: float) -> datetime:
    """When the group's next cycle should start (may be in the past: start now)."""
    start = now if g.newest is None else g.newest + timedelta(seconds=g.rpo - lead(g.durations, g.rpo, margin))
    if g.failures and g.last_failure is not None:
        start = max(start, g.last_failure + timedelta(seconds=backoff(g.failures, g.rpo)))
    return start


def age(g: GroupView, now: datetime) -> float | None:
    return None if g.newest is None else (now - g.newest).total_seconds()


def classify(g: GroupView, now: datetime) -> str:
    """ok | at-risk | violated | paused | error."""
    if g.paused:
        return "paused"
    a = age(g, now)
    if a is None or a > g.rpo:
        return "violated"
    dl = deadline(g)
    assert dl is not None
    begin = g.running_since or now
    if begin + timedelta(seconds=predict(g.durations)) > dl:
        return "at-risk"
    if g.failures:
        return "error"
    return "ok"


@dataclass(frozen=True)
class AlertEdge:
    kind: str  # rpo-violated | rpo-restored | rpo-at-risk
    state: str


def alert_edges(prev: str, cur: str) -> tuple[AlertEdge, ...]:
    """Alerts to raise when a group goes from state ``prev`` to ``cur`` (deduplicated, paired)."""
    out: list[AlertEdge] = []
    was_violated, is_violated = prev == "violated", cur == "violated"
    if is_violated and not was_violated:
        out.append(AlertEdge("rpo-violated", cur))
    if was_violated and not is_violated:
        out.append(AlertEdge("rpo-restored", cur))
    if cur == "at-risk" and prev not in ("at-risk", "violated"):
        out.append(AlertEdge("rpo-at-risk", cur))
    return tuple(out)
