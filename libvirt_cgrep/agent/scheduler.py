"""The agent's scheduler: keeps every protected group's newest point within its RPO.

Guarantees:

- it acts only on domains carrying our protection metadata;
- each group's next cycle is started by the RPO maths of ``core.rpo``; at
  most ``concurrency`` cycles run at once and one group's failure or slowness
  never delays another's schedule (each group is scheduled independently);
- every cycle is a child process (``agent.worker``) running ``agent.tasks.cycle``: if the agent dies or is
  stopped, the child dies too and its guardian resumes any held guest, and
  the target's commit rule keeps every point whole;
- alerts are raised on state edges only (``rpo-violated``/``rpo-restored``
  always paired, ``rpo-at-risk``), recorded in the state DB and delivered;
- a group is one unit: its cycle cuts every member under one fence, and a
  member that is shut off, paused or missing (declared in the members'
  metadata but not found) fails the group's cycle with a clear error and a
  ``group-blocked`` alert (paired with ``group-unblocked``): never a partial
  group point. ``virt-cgrep unprotect MEMBER`` takes a member out;
- it reconnects to libvirtd by itself and learns changes from domain and
  metadata events, from the hooks' spool, and from a periodic rescan.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from libvirt_cgrep import hooks
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.agent import tasks, worker
from libvirt_cgrep.agent.alerts import AlertSink
from libvirt_cgrep.agent.config import AgentConfig
from libvirt_cgrep.agent.continuous import SIDECAR, Continuous
from libvirt_cgrep.agent.db import StateDB, state_dir
from libvirt_cgrep.agent.groups import CycleEnd, GroupSpec, Runtime, first_target, form
from libvirt_cgrep.agent.metrics import Metrics
from libvirt_cgrep.agent.records import Records
from libvirt_cgrep.core import rpo
from libvirt_cgrep.engine import protection
from libvirt_cgrep.errors import CgrepError

__all__ = ["Agent", "GroupSpec", "Runtime", "first_target"]

log = logging.getLogger("libvirt_cgrep.agent")


def _now() -> datetime:
    return datetime.now(UTC)


class Agent(Records):
    def __init__(
        self, cfg: AgentConfig, db: StateDB, sink: AlertSink, reload: Callable[[], tuple[AgentConfig, AlertSink]] | None = None
    ) -> None:
        self.cfg = cfg
        self.reloader = reload
        self.db = db
        self.sink = sink
        self.groups: dict[str, Runtime] = {}
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency + 2, thread_name_prefix="cycle")
        self.running_cycles = 0
        self.runner = worker.Runner()
        self.conn: lv.Connection | None = None
        self.disconnected_since: float | None = None
        self.wake = threading.Event()  # the loop's sleep ends early: a cycle or probe ended, or a rescan is due
        self.dirty = _Flag(self.wake)
        self.stopping = False
        self.reload = False
        self.last_scan = 0.0
        self.watched: frozenset[str] = frozenset()  # members of protected groups (their lifecycle events rescan)
        # A violation an earlier run raised (then was killed or stopped) stays open: its rpo-restored is still owed.
        self.open_violations = {g.name for g in db.groups() if g.state == "violated"}
        self.metrics: Metrics | None = None
        self.continuous = Continuous(self, (Path(cfg.state_dir) if cfg.state_dir else state_dir()) / SIDECAR)

    # ------------------------------------------------------------ libvirt
    def _connect(self) -> bool:
        if self.conn is not None:
            if lv.alive(self.conn):
                return True
            lv.close(self.conn)
            self.conn = None
        try:
            conn = lv.connect_watched(self.cfg.uri, self._on_lifecycle, self.dirty.set)
        except CgrepError as exc:
            if self.disconnected_since is None:  # once per outage, not once per tick
                self.disconnected_since = time.monotonic()
                log.warning("cannot connect to %s: %s (retrying)", self.cfg.uri, exc)
            return False
        self.conn = conn
        if self.disconnected_since is not None:
            log.info("connected to %s (after %.1f s without)", self.cfg.uri, time.monotonic() - self.disconnected_since)
            self.disconnected_since = None
        else:
            log.info("connected to %s", self.cfg.uri)
        self.dirty.set()
        return True

    def _scan(self) -> None:
        """Learn the protected domains and their states; form groups."""
        assert self.conn is not None
        found = protection.scan(self.conn, states=True)
        specs = form(found, self.cfg.only)
        for gname, spec in specs.items():
            rt = self.groups.get(gname)
            if rt is None:
                self.groups[gname] = Runtime(
                    spec,
                    state="violated" if gname in self.open_violations else "unknown",
                    durations=self.db.durations(gname, rpo.HISTORY),  # a restarted agent predicts from its history
                    # a group-blocked raised before a restart stays open: not raised twice, cleared when it clears
                    blocked=self.db.open_alert(gname, "group-blocked", "group-unblocked"),
                )
                self.open_violations.discard(gname)
                log.info(
                    "protecting %s: %s -> %s, RPO %s",
                    gname,
                    ",".join(spec.members),
                    first_target(spec),
                    rpo.format_duration(spec.protection.rpo),
                )
            else:
                if first_target(rt.spec) != first_target(spec) or rt.spec.members != spec.members:
                    rt.known = False  # target or membership changed: learn the newest point again
                rt.spec = spec
        for gname in list(self.groups):
            if gname not in specs and self.groups[gname].future is None:
                log.info("no longer protected: %s", gname)
                del self.groups[gname]
        self.db.drop_groups_except(list(self.groups))
        for name, why in found.problems.items():
            log.warning("%s: %s", name, why)
        self.last_scan = time.monotonic()
        self.watched = frozenset(m for rt in self.groups.values() for m in rt.spec.members)

    def _on_lifecycle(self, name: str, defined_or_undefined: bool) -> None:
        """Rescan for a domain defined or undefined, or a protected one changing state: not for other guests' starts
        and stops (on a busy host a full rescan per event kept the loop from starting cycles for seconds)."""
        if defined_or_undefined or name in self.watched:
            self.dirty.set()

    # ------------------------------------------------------------ children
    def _probe(self, spec: GroupSpec) -> worker.Outcome[tasks.Newest]:
        return self.runner.invoke(tasks.newest, (first_target(spec), spec.name), 120)

    def _cycle(self, spec: GroupSpec) -> CycleEnd:
        p = spec.protection
        req = tasks.CycleRequest(self.cfg.uri, spec.members, p.target, spec.name, p.fence, p.keep, p.keep_hourly, p.keep_daily)
        started = time.time()
        outcome = self.runner.invoke(tasks.cycle, (req,), max(600.0, 10 * p.rpo))
        return CycleEnd(outcome, started, time.time())

    # ------------------------------------------------------------ the loop
    def tick(self) -> None:
        now = _now()
        for rt in self.groups.values():
            self._collect(rt, now)
            spec = rt.spec
            owned = spec.protection.mode == "continuous" and rt.known and self.continuous.owns(rt, now)
            paused = all(s == "shutoff" for s in spec.member_states) and not spec.missing
            view = rpo.GroupView(
                rpo=spec.protection.rpo,
                newest=rt.newest_time,
                durations=tuple(rt.durations),
                failures=rt.failures,
                last_failure=rt.last_failure,
                running_since=rt.running_since,
                paused=paused,
            )
            if not rt.known and rt.probe is None and not self.stopping:
                rt.probe = self.pool.submit(self._probe, spec)
                rt.probe.add_done_callback(lambda f: self.wake.set())
            state = rpo.classify(view, now) if rt.known else "unknown"
            if rt.known and state not in ("violated", "paused") and rt.failures:
                state = "error" if state == "ok" else state
            if rt.known:  # no edge out of an inherited state before the newest point is known
                self._transition(rt, state, now)
            rt.next_run = rpo.next_start(view, now, self.cfg.margin)
            due = rt.known and not paused and rt.future is None and rt.next_run <= now and not self.stopping and not owned
            # (judged only between cycles: our own cycle pauses the members during its hold)
            blocked = None if paused else spec.blocked()
            if rt.future is None and blocked is None and rt.blocked is not None:
                self._unblocked(rt, now)
            if due and blocked:
                self._blocked_cycle(rt, blocked, now)
                due = False
            if due and self.running_cycles < self.cfg.concurrency:
                self.running_cycles += 1
                rt.running_since = now
                rt.future = self.pool.submit(self._cycle, spec)
                rt.future.add_done_callback(lambda f: self.wake.set())  # the next cycle may start at once
            self._save(rt, now)

    def start_metrics(self) -> None:
        if self.cfg.metrics:
            self.metrics = Metrics()
            self.metrics.serve(self.cfg.metrics, self.continuous.metrics)

    def _spool(self) -> None:
        spool = Path(self.cfg.spool)
        if not spool.is_dir():
            return
        events = hooks.read_spool(spool)
        if events:
            for e in events:
                log.info("hook: %s %s", e.domain, e.op)
            hooks.consume(spool, events)
            self.dirty.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP rescans (and the caller reloads the config)."""
        lv.start_event_loop()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.start_metrics()
        self.runner.start_server()
        while not self.stopping:
            if self._connect() and (self.dirty.is_set() or time.monotonic() - self.last_scan > self.cfg.rescan):
                self.dirty.clear()
                try:
                    self._scan()
                except CgrepError as exc:
                    log.warning("scan failed: %s", exc)
                    self.conn = None
            if self.reload and self.reloader is not None:
                self.reload = False
                try:
                    cfg, self.sink = self.reloader()
                    self.cfg = replace(cfg, concurrency=self.cfg.concurrency, metrics=self.cfg.metrics)
                    log.info("configuration reloaded (concurrency and metrics apply at restart)")
                except CgrepError as exc:
                    log.error("reload failed, keeping the old configuration: %s", exc)
            self._spool()
            self.tick()
            if self.conn is None:
                self.dirty.clear()  # no rescan without libvirtd (reconnecting marks it again): do not spin
            self.wake.wait(self._sleep_s())
            self.wake.clear()
        return self._shutdown()

    def _sleep_s(self) -> float:
        """Until the next tick, or the earliest scheduled cycle start if sooner."""
        now = _now()
        due = [(rt.next_run - now).total_seconds() for rt in self.groups.values() if rt.next_run and rt.future is None]
        return max(0.0, min([self.cfg.tick, *[d for d in due if d > 0]]))

    def _on_stop(self, signum: int, frame: object) -> None:
        log.info("signal %d: finishing running cycles (up to %.0f s), then stopping", signum, self.cfg.stop_timeout)
        self.stopping = True
        self.dirty.set()

    def _on_hup(self, signum: int, frame: object) -> None:
        log.info("SIGHUP: reloading the configuration and rescanning")
        self.reload = True
        self.dirty.set()

    def _shutdown(self) -> int:
        self.continuous.stop()
        end = time.monotonic() + self.cfg.stop_timeout
        while any(rt.future is not None for rt in self.groups.values()) and time.monotonic() < end:
            time.sleep(0.1)
            for rt in self.groups.values():
                self._collect(rt, _now())
        self.tick()  # the finished cycles' edges (rpo-restored) and states, before going: nothing new starts now
        for proc in self.runner.live():
            log.warning("abandoning a running cycle (pid %d): its guardian resumes any held guest", proc.pid)
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
        self.pool.shutdown(wait=True, cancel_futures=True)
        return 0


class _Flag(threading.Event):
    """An event that also wakes the agent's loop when set."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake.set()
