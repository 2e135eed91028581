"""Retention: which recovery points to keep. Pure (the I/O is in replica/store.py).

Borg-like rules, applied together (a point kept by any rule is kept):

- ``keep_last``: the newest N points;
- ``keep_hourly``/``keep_daily``: the newest point of each of the newest N
  distinct hours/days (UTC) that have points;
- the newest point is always kept, and so is any point newer than ``now``
  (a clock step must never delete fresh data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from libvirt_cgrep.errors import UsageError


@dataclass(frozen=True)
class Policy:
    keep_last: int = 24
    keep_hourly: int = 0
    keep_daily: int = 0

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_hourly", "keep_daily"):
            v = getattr(self, name)
            if not 0 <= v <= 100_000:
                raise UsageError(f"--{name.replace('_', '-')} {v} out of range (0-100000)")
        if self.keep_last < 1 and not (self.keep_hourly or self.keep_daily):
            raise UsageError("retention must keep at least one point")


@dataclass(frozen=True)
class PointTime:
    point_id: str
    time: datetime


def _bucketed(points: Sequence[PointTime], n: int, key: Callable[[datetime], str]) -> set[str]:
    keep: set[str] = set()
    seen: set[str] = set()
    for p in points:  # newest first
        if len(seen) >= n:
            break
        k = key(p.time)
        if k not in seen:
            seen.add(k)
            keep.add(p.point_id)
    return keep


def prune(points: Sequence[PointTime], now: datetime, policy: Policy) -> tuple[str, ...]:
    """Ids of the points to delete, oldest first."""
    newest_first = sorted(points, key=lambda p: (p.time, p.point_id), reverse=True)
    if not newest_first:
        return ()
    keep = {newest_first[0].point_id}
    keep |= {p.point_id for p in newest_first[: policy.keep_last]}
    keep |= _bucketed(newest_first, policy.keep_hourly, lambda t: t.strftime("%Y%m%d%H"))
    keep |= _bucketed(newest_first, policy.keep_daily, lambda t: t.strftime("%Y%m%d"))
    keep |= {p.point_id for p in newest_first if p.time > now}
    return tuple(p.point_id for p in reversed(newest_first) if p.point_id not in keep)
