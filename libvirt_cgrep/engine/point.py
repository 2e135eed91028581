"""Take one consistency point: discover -> plan -> prepare -> (fence) -> transaction -> release.

Guarantees:

- every guest is cut by ONE transaction over all its selected disks;
- overlays are created before the hold, so a hold covers only the cut; the
  check that the definitions name the new overlays runs after the resume
  (a failed check still fails the point, with the guests running);
- with ``fence='suspend'`` a guardian process is armed before the first
  pause; every guest is resumed by us when the cut ends or fails, and by the
  guardian when the deadline passes or this process dies;
- on any failure every guest runs on its old chain (what was prepared is
  removed), and the error says what failed;
- bad input and wrong states are refused before anything changes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar

from libvirt_cgrep.adapters import faults
from libvirt_cgrep.core.model import GuestCut, PointResult, Transaction
from libvirt_cgrep.core.plan import plan_cut, point_id, select_disks
from libvirt_cgrep.engine.backend import Backend
from libvirt_cgrep.engine.guardian import Guardian
from libvirt_cgrep.errors import FenceError, StateError, UsageError

T = TypeVar("T")

FENCES = ("none", "suspend")
#: Test-only fault injection (``adapters.faults``): sleep this many ms inside the hold (after the pause).
FAULT_HOLD_SLEEP_ENV = faults.env_name("HOLD_SLEEP_MS")


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
    if len(guests) > 1 and fence == "none":
        raise UsageError("several guests form one consistent cut only while all are held: use --fence suspend")
    selections = [(g, select_disks(g, targets)) for g in guests]
    cut_time = now()
    plan = plan_cut(point_id(cut_time), selections)

    prepared: list[tuple[Backend, Transaction]] = []
    done: dict[int, GuestCut] = {}
    try:
        for b, txn in zip(backends, plan.transactions, strict=True):
            b.prepare(txn)
            prepared.append((b, txn))
        fence_ms = None if fence == "none" else _hold_and_cut(prepared, done, deadline_ms, clock)
        if fence == "none":
            _cut_all(prepared, done)
    except BaseException:
        # Only what was prepared and not cut is removed: a guest that was cut keeps its overlay.
        for i, (b, txn) in enumerate(prepared):
            if i not in done:
                with contextlib.suppress(Exception):
                    b.discard(txn)
        raise
    # after the hold (guests running): every guest's definitions name its new overlays, checked side by side;
    # a cut guest keeps its overlay either way
    _first_error(_each([functools.partial(b.confirm, txn) for b, txn in prepared]))
    cuts = [done[i] for i in sorted(done)]
    total = max(c.cut_ms for c in cuts)
    return PointResult(
        point_id=plan.point_id,
        time_utc=cut_time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        fence=fence,
        backend=backends[0].kind,
        guests=tuple(cuts),
        fence_ms=fence_ms,
        cut_ms=total,
    )


def _each(calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run the calls at once (one thread each; inline for one) and return each result or exception."""
    if len(calls) == 1:
        try:
            return [calls[0]()]
        except BaseException as err:
            return [err]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
    out: list[T | BaseException] = []
    for f in futures:
        exc = f.exception()
        out.append(exc if exc is not None else f.result())
    return out


def _first_error(results: Sequence[object]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _cut_all(prepared: Sequence[tuple[Backend, Transaction]], done: dict[int, GuestCut]) -> None:
    """Cut every guest (in parallel: one transaction each); ``done`` records which succeeded."""
    results = _each([functools.partial(b.cut, txn) for b, txn in prepared])
    for i, r in enumerate(results):
        if isinstance(r, GuestCut):
            done[i] = r
    _first_error(results)


def _hold_and_cut(
    prepared: Sequence[tuple[Backend, Transaction]], done: dict[int, GuestCut], deadline_ms: float, clock: Callable[[], float]
) -> float:
    """Hold every guest under an armed guardian, cut each, resume each; returns the host-measured hold in ms.

    One thread per guest (started before the hold): pause; wait until EVERY
    guest is paused; cut (its one transaction); resume. No guest resumes
    before all are paused, so the cuts all show the guests' state at one
    instant (a group point); a guest does not wait for the others' cuts to
    resume. If a pause fails, the guests already paused are resumed uncut.
    The hold is measured from the first pause to the last resume.
    """
    specs = [s for b, _ in prepared for s in b.guardian_spec()]
    n = len(prepared)
    ready, all_paused = threading.Barrier(n), threading.Barrier(n)
    starts, ends = [0.0] * n, [0.0] * n
    resumed = [False] * n

    def hold_one(i: int) -> None:
        b, txn = prepared[i]
        ready.wait()  # every thread exists: the hold does not include starting threads
        starts[i] = clock()
        try:
            try:
                b.pause()
            except BaseException:
                all_paused.abort()
                raise
            all_paused.wait()  # BrokenBarrierError: another guest could not be paused; resume uncut
            faults.sleep_ms("HOLD_SLEEP_MS")
            done[i] = b.cut(txn)
        finally:
            # Idempotent: resumes a guest whether or not it was paused. If it fails (the guardian may have
            # resumed the guest first), the guardian is told to resume it below: not an error of the cut.
            with contextlib.suppress(Exception):
                b.resume()
                resumed[i] = True
            ends[i] = clock()

    with Guardian(specs, deadline_ms) as guardian:
        guardian.arm()
        results = _each([functools.partial(hold_one, i) for i in range(n)])
        fence_ms = (max(ends) - min(starts)) * 1000.0
        # If we could not resume a guest ourselves, the guardian does it.
        fired = guardian.release() if all(resumed) else guardian.abandon()
    # the first real error (a guest that only saw the broken barrier names no cause)
    errors = [r for r in results if isinstance(r, BaseException)]
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
    if fired:
        raise FenceError(
            f"the hold passed its {deadline_ms:g} ms deadline ({fence_ms:.0f} ms); the guardian resumed the guests. "
            "Each guest was still cut by one transaction, but the hold did not cover the whole cut"
        )
    return fence_ms
