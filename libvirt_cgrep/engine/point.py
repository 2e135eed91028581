"""Take one consistency point: discover -> plan -> prepare -> (fence) -> transaction -> release.

Guarantees:

- every guest is cut by ONE transaction over all its selected disks;
- overlays are created before the hold, so a hold covers only the cut;
- with ``fence='suspend'`` a guardian process is armed before the first
  pause; every guest is resumed by us when the cut ends or fails, and by the
  guardian when the deadline passes or this process dies;
- on any failure every guest runs on its old chain (what was prepared is
  removed), and the error says what failed;
- bad input and wrong states are refused before anything changes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from libvirt_cgrep.core.model import GuestCut, PointResult, Transaction
from libvirt_cgrep.core.plan import plan_cut, point_id, select_disks
from libvirt_cgrep.engine.backend import Backend
from libvirt_cgrep.engine.guardian import Guardian
from libvirt_cgrep.errors import FenceError, StateError, UsageError

FENCES = ("none", "suspend")
#: Test-only fault injection: sleep this long inside the hold (after the pause).
FAULT_HOLD_SLEEP_ENV = "CGREP_FAULT_HOLD_SLEEP_MS"


def take_point(
    backends: Sequence[Backend],
    *,
    targets: Sequence[str] | None = None,
    fence: str = "none",
    deadline_ms: float = 2000.0,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Callable[[], float] = time.monotonic,
) -> PointResult:
    """Cut every backend's guest once; see the module docstring for the guarantees."""
    if fence not in FENCES:
        raise UsageError(f"invalid fence {fence!r}: expected one of {', '.join(FENCES)}")
    if not 10 <= deadline_ms <= 60_000:
        raise UsageError(f"deadline {deadline_ms:g} ms out of range: must be between 10 and 60000 ms")
    if not backends:
        raise UsageError("no guest to cut")
    guests = [b.discover() for b in backends]
    for g in guests:
        if g.state != "running":
            raise StateError(f"{g.kind} guest {g.name!r} is {g.state}; a point needs a running guest")
    if targets and len(guests) > 1:
        raise UsageError("--disks selects disks of one domain; give one domain")
    selections = [(g, select_disks(g, targets)) for g in guests]
    cut_time = now()
    plan = plan_cut(point_id(cut_time), selections)

    prepared: list[tuple[Backend, Transaction]] = []
    cuts: list[GuestCut] = []
    try:
        for b, txn in zip(backends, plan.transactions, strict=True):
            b.prepare(txn)
            prepared.append((b, txn))
        fence_ms = None if fence == "none" else _hold_and_cut(prepared, cuts, deadline_ms, clock)
        if fence == "none":
            _cut_all(prepared, cuts)
    except BaseException:
        # Only what was prepared and not cut is removed: a guest that was cut keeps its overlay.
        for b, txn in prepared[len(cuts) :]:
            with contextlib.suppress(Exception):
                b.discard(txn)
        raise
    total = sum(c.cut_ms for c in cuts)
    return PointResult(
        point_id=plan.point_id,
        time_utc=cut_time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        fence=fence,
        backend=backends[0].kind,
        guests=tuple(cuts),
        fence_ms=fence_ms,
        cut_ms=total,
    )


def _cut_all(prepared: Sequence[tuple[Backend, Transaction]], cuts: list[GuestCut]) -> None:
    """Cut each guest in order, appending to ``cuts`` (so the caller knows how far it got)."""
    for b, txn in prepared:
        cuts.append(b.cut(txn))


def _hold_and_cut(
    prepared: Sequence[tuple[Backend, Transaction]], cuts: list[GuestCut], deadline_ms: float, clock: Callable[[], float]
) -> float:
    """Pause every guest under an armed guardian, cut, resume; return the host-measured hold in ms."""
    specs = [s for b, _ in prepared for s in b.guardian_spec()]
    fault_ms = float(os.environ.get(FAULT_HOLD_SLEEP_ENV, "0") or 0)
    with Guardian(specs, deadline_ms) as guardian:
        guardian.arm()
        t0 = clock()
        paused: list[Backend] = []
        try:
            for b, _ in prepared:
                paused.append(b)
                b.pause()
            if fault_ms:
                time.sleep(fault_ms / 1000.0)
            _cut_all(prepared, cuts)
        finally:
            resumed = True
            for b in paused:
                try:
                    b.resume()
                except Exception:
                    resumed = False
            fence_ms = (clock() - t0) * 1000.0
            # If we could not resume a guest ourselves, the guardian does it.
            fired = guardian.release() if resumed else guardian.abandon()
    if fired:
        raise FenceError(
            f"the hold passed its {deadline_ms:g} ms deadline ({fence_ms:.0f} ms); the guardian resumed the guests. "
            "Each guest was still cut by one transaction, but the hold did not cover the whole cut"
        )
    return fence_ms
