"""The agent's records of each group: cycle and probe results applied, state edges, alerts, the state DB, metrics.

Guarantees:

- alerts are raised on state edges only (``core.rpo.alert_edges``), recorded in the state DB and delivered;
- a failed cycle is counted, recorded and followed by a probe of the target (it may have committed its point);
- a probe that finds no replica target (NotFoundError) means no point yet, not a failure;
- ``group-blocked`` is raised once per blocking and paired with ``group-unblocked``.
"""

from __future__ import annotations

import logging
from datetime import datetime

from libvirt_cgrep.agent.alerts import Alert, AlertSink
from libvirt_cgrep.agent.db import GroupRow, StateDB
from libvirt_cgrep.agent.groups import CycleEnd, Runtime, first_target
from libvirt_cgrep.agent.metrics import Metrics
from libvirt_cgrep.core import rpo
from libvirt_cgrep.errors import NotFoundError

log = logging.getLogger("libvirt_cgrep.agent")


def parse_utc(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


class Records:
    """The bookkeeping half of the agent (mixed into ``scheduler.Agent``)."""

    db: StateDB
    sink: AlertSink
    metrics: Metrics | None
    running_cycles: int

    def _unblocked(self, rt: Runtime, now: datetime) -> None:
        """``group-unblocked``: every member can be cut again (paired with the ``group-blocked`` before it)."""
        if rt.last_error == rt.blocked:  # the failures were the blocking: its cause is gone, start at once
            rt.failures, rt.last_failure, rt.last_error = 0, None, None
        rt.blocked = None
        self._alert(rt, "group-unblocked", f"every member of {rt.spec.name} can be cut again: group cycles resume", now)

    def _blocked_cycle(self, rt: Runtime, blocked: str, now: datetime) -> None:
        """A due cycle of a blocked group fails at once (no child, nothing held): counted, recorded, backed off.

        The first one raises ``group-blocked``.
        """
        if rt.blocked is None:
            self._alert(rt, "group-blocked", blocked, now)
        rt.blocked = blocked
        log.warning("%s: cycle failed (%d in a row): %s", rt.spec.name, rt.failures + 1, blocked)
        rt.failures += 1
        rt.last_failure = now
        rt.last_error = blocked
        t = now.timestamp()
        self.db.add_cycle(
            rt.spec.name, started=t, ended=t, ok=False, point_id=None, nbytes=None, changed=None, hold_ms=None, error=blocked
        )
        self._observe(rt.spec.name, 0.0, 0, ok=False)

    def _alert(self, rt: Runtime, kind: str, msg: str, now: datetime) -> None:
        self.db.add_alert(rt.spec.name, kind, now.timestamp(), msg)
        self.sink.deliver(Alert(kind, rt.spec.name, rt.state, msg, now))

    def _collect(self, rt: Runtime, now: datetime) -> None:
        if rt.probe is not None and rt.probe.done():
            probe = rt.probe.result()
            rt.probe = None
            rt.reprobe, reprobe = False, rt.reprobe
            if probe.ok or (probe.error is not None and issubclass(probe.error, NotFoundError)):
                rt.known = True  # (NotFoundError: not a replica target yet, so no point)
                newest = probe.value if probe.ok else None
                rt.newest_id = newest.point_id if newest else None
                rt.newest_time = parse_utc(newest.time_utc) if newest and newest.time_utc else None
            elif reprobe:
                rt.known = True  # keep what we knew; the failure was counted with its cycle
            else:
                rt.last_error = probe.message or f"exit {probe.status}"
                rt.known = True  # unknown newest: treat as none, cycles will tell
                rt.failures += 1
                rt.last_failure = now
        if rt.future is not None and rt.future.done():
            end = rt.future.result()
            rt.future = None
            rt.running_since = None
            self.running_cycles -= 1
            self._cycle_ended(rt, end, now)

    def _cycle_ended(self, rt: Runtime, end: CycleEnd, now: datetime) -> None:
        duration = end.ended - end.started
        done = end.outcome.value
        if done is not None:
            rt.newest_id = done.point_id
            rt.newest_time = parse_utc(done.time_utc)
            rt.failures = 0
            rt.last_error = None
            rt.last_duration = duration
            rt.last_bytes = done.bytes_shipped
            rt.durations = [*rt.durations[-(rpo.HISTORY - 1) :], duration]
            self.db.add_cycle(
                rt.spec.name,
                started=end.started,
                ended=end.ended,
                ok=True,
                point_id=done.point_id,
                nbytes=done.bytes_shipped,
                changed=done.changed_bytes,
                hold_ms=done.fence_ms,
                error=None,
            )
            self._observe(rt.spec.name, duration, done.bytes_shipped, ok=True)
            return
        error = end.outcome.message or f"exit {end.outcome.status}"
        rt.failures += 1
        rt.last_failure = now
        rt.last_error = error
        log.warning("%s: cycle failed (%d in a row): %s", rt.spec.name, rt.failures, error)
        # it may have failed after committing its point (e.g. while folding): ask the target before going on
        rt.known = False
        rt.reprobe = True
        self.db.add_cycle(
            rt.spec.name,
            started=end.started,
            ended=end.ended,
            ok=False,
            point_id=None,
            nbytes=None,
            changed=None,
            hold_ms=None,
            error=error,
        )
        self._observe(rt.spec.name, duration, 0, ok=False)

    def _transition(self, rt: Runtime, state: str, now: datetime) -> None:
        if state == rt.state:
            return
        for edge in rpo.alert_edges(rt.state, state):
            age = rpo.age(rpo.GroupView(rt.spec.protection.rpo, rt.newest_time), now)
            msg = (
                f"newest point {rt.newest_id or 'none'} is "
                + (f"{age:.1f} s old" if age is not None else "missing")
                + f", RPO {rpo.format_duration(rt.spec.protection.rpo)}"
                + (f"; last error: {rt.last_error}" if rt.last_error and edge.kind != "rpo-restored" else "")
            )
            alert = Alert(edge.kind, rt.spec.name, state, msg, now)
            self.db.add_alert(rt.spec.name, edge.kind, now.timestamp(), msg)
            self.sink.deliver(alert)
            if self.metrics is not None and edge.kind == "rpo-violated":
                self.metrics.violated(rt.spec.name)
        rt.state = state

    def _save(self, rt: Runtime, now: datetime) -> None:
        self.db.upsert_group(
            GroupRow(
                name=rt.spec.name,
                members=rt.spec.members + rt.spec.missing,
                target=first_target(rt.spec),
                rpo=float(rt.spec.protection.rpo),
                state=rt.state,
                newest_point=rt.newest_id,
                newest_time=rt.newest_time.timestamp() if rt.newest_time else None,
                next_run=rt.next_run.timestamp() if rt.next_run else None,
                failures=rt.failures,
                last_error=rt.last_error,
                last_duration=rt.last_duration,
                last_bytes=rt.last_bytes,
                updated=now.timestamp(),
                member_states=rt.spec.member_states + ("missing",) * len(rt.spec.missing),
            )
        )
        if self.metrics is not None:
            self.metrics.group(rt.spec.name, rt.spec.protection.rpo, rt.newest_time, now)

    def _observe(self, group: str, duration: float, nbytes: int, *, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe(group, duration, nbytes, ok=ok)
