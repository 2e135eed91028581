"""The agent's scheduler: keeps every protected group's newest point within its RPO.

Guarantees:

- it acts only on domains carrying our protection metadata;
- each group's next cycle is started by the RPO maths of ``core.rpo``; at
  most ``concurrency`` cycles run at once and one group's failure or slowness
  never delays another's schedule (each group is scheduled independently);
- every cycle is a ``virt-cgrep sync`` child process (``agent.worker``): if the agent dies or is
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
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt

from libvirt_cgrep.agent import worker
from libvirt_cgrep.agent.alerts import Alert, AlertSink
from libvirt_cgrep.agent.config import AgentConfig
from libvirt_cgrep.agent.db import GroupRow, StateDB
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.core import rpo
from libvirt_cgrep.errors import CgrepError

log = logging.getLogger("libvirt_cgrep.agent")

_EVENT_LOOP = threading.Event()


def _start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread (needed for domain events and keepalive)."""
    if _EVENT_LOOP.is_set():
        return
    _EVENT_LOOP.set()
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_utc(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


@dataclass(frozen=True)
class GroupSpec:
    name: str
    members: tuple[str, ...]
    protection: prot.Protection
    member_states: tuple[str, ...]
    problem: str | None = None
    #: declared members (protect --group) whose domain or protection is not found
    missing: tuple[str, ...] = ()

    def blocked(self) -> str | None:
        """Why a cycle of this group cannot run now (None: it can)."""
        if self.problem:
            return self.problem
        if self.missing:
            return (
                f"member {', '.join(self.missing)} of group {self.name} is missing (undefined, or its protection "
                "was removed other than by 'virt-cgrep unprotect'): no partial group point"
            )
        down = [f"{m} is {s}" for m, s in zip(self.members, self.member_states, strict=True) if s != "running"]
        if down and not all(s == "shutoff" for s in self.member_states):
            return f"member {', '.join(down)}: no partial group point"
        return None


@dataclass
class Runtime:
    spec: GroupSpec
    newest_id: str | None = None
    newest_time: datetime | None = None
    known: bool = False
    failures: int = 0
    last_failure: datetime | None = None
    last_error: str | None = None
    last_duration: float | None = None
    last_bytes: int | None = None
    running_since: datetime | None = None
    future: Future[dict[str, Any]] | None = None
    probe: Future[dict[str, Any]] | None = None
    state: str = "unknown"
    durations: list[float] = field(default_factory=list)
    next_run: datetime | None = None
    reprobe: bool = False
    blocked: str | None = None


class Agent:
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
        self.conn: libvirt.virConnect | None = None
        self.disconnected_since: float | None = None
        self.wake = threading.Event()  # the loop's sleep ends early: a cycle or probe ended, or a rescan is due
        self.dirty = _Flag(self.wake)
        self.stopping = False
        self.reload = False
        self.last_scan = 0.0
        self.watched: frozenset[str] = frozenset()  # members of protected groups (their lifecycle events rescan)
        # A violation an earlier run raised (then was killed or stopped) stays open: its rpo-restored is still owed.
        self.open_violations = {g.name for g in db.groups() if g.state == "violated"}
        self.metrics: Any = None
        from libvirt_cgrep.agent.continuous import SIDECAR, Continuous
        from libvirt_cgrep.agent.db import state_dir

        self.continuous = Continuous(self, (Path(cfg.state_dir) if cfg.state_dir else state_dir()) / SIDECAR)

    # ------------------------------------------------------------ libvirt
    def _connect(self) -> bool:
        if self.conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self.conn.isAlive():
                    return True
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()
            self.conn = None
        try:
            conn = libvirt.open(self.cfg.uri)
        except libvirt.libvirtError as exc:
            if self.disconnected_since is None:  # once per outage, not once per tick
                self.disconnected_since = time.monotonic()
                log.warning("cannot connect to %s: %s (retrying)", self.cfg.uri, exc.get_error_message())
            return False
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(2, 3)
        mark = lambda *a: self.dirty.set()  # noqa: E731
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, mark, None)
        conn.registerCloseCallback(lambda *a: self.dirty.set(), None)
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
        members: dict[str, list[tuple[str, prot.Protection, str]]] = {}
        problems: dict[str, str] = {}
        for dom in self.conn.listAllDomains(0):
            try:
                xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, prot.NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            except libvirt.libvirtError:
                continue
            name = dom.name()
            try:
                p = prot.from_xml(xml)
            except CgrepError as exc:
                problems[name] = str(exc)
                continue
            try:
                st = dom.state()[0]
            except libvirt.libvirtError:  # undefined since the listing: not a broken connection, skip it
                continue
            state = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused"}.get(st, "shutoff")
            gname = p.group or name
            if self.cfg.only and gname not in self.cfg.only:
                continue
            members.setdefault(gname, []).append((name, p, state))
        specs: dict[str, GroupSpec] = {}
        for gname, ms in members.items():
            ms.sort()
            first = ms[0][1]
            problem = None
            if any((m[1].target, m[1].rpo, m[1].fence) != (first.target, first.rpo, first.fence) for m in ms):
                problem = "members disagree on target, RPO or fence"
            elif len(ms) > 1 and first.fence != "suspend":
                problem = "a group of several domains needs fence suspend"
            found = tuple(m[0] for m in ms)
            declared = {d for m in ms for d in m[1].members} if first.group else set()
            missing = tuple(sorted(declared - set(found)))
            specs[gname] = GroupSpec(gname, found, first, tuple(m[2] for m in ms), problem, missing)
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
        for name, why in problems.items():
            log.warning("%s: %s", name, why)
        self.last_scan = time.monotonic()
        self.watched = frozenset(m for rt in self.groups.values() for m in rt.spec.members)

    def _on_lifecycle(self, conn: object, dom: libvirt.virDomain, event: int, detail: int, opaque: object) -> None:
        """Rescan for a domain defined or undefined, or a protected one changing state: not for other guests' starts
        and stops (on a busy host a full rescan per event kept the loop from starting cycles for seconds)."""
        if event in (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED) or dom.name() in self.watched:
            self.dirty.set()

    # ------------------------------------------------------------ children
    def _child(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        return self.runner.run(argv, timeout)  # see agent.worker: pre-imported, dies with the agent

    def _cli(self) -> list[str]:
        return ["-c", self.cfg.uri]

    def _probe(self, spec: GroupSpec) -> dict[str, Any]:
        rc, out, err = self._child([*self._cli(), "points", first_target(spec), "--set", spec.name, "--json"], 120)
        if rc == 0:
            pts = json.loads(out)
            return {"ok": True, "newest": pts[-1] if pts else None}
        if rc == 65 and "not a libvirt-cgrep replica target" in err:
            return {"ok": True, "newest": None}
        return {"ok": False, "error": _last_line(err) or f"exit {rc}"}

    def _cycle(self, spec: GroupSpec) -> dict[str, Any]:
        p = spec.protection
        argv = [
            *self._cli(),
            "sync",
            *spec.members,
            "--target",
            p.target,
            "--set",
            spec.name,
            "--fence",
            p.fence,
            "--keep",
            str(p.keep),
            "--json",
        ]
        if p.keep_hourly:
            argv += ["--keep-hourly", str(p.keep_hourly)]
        if p.keep_daily:
            argv += ["--keep-daily", str(p.keep_daily)]
        started = time.time()
        rc, out, err = self._child(argv, max(600.0, 10 * p.rpo))
        ended = time.time()
        if rc == 0:
            return {"ok": True, "result": json.loads(out), "started": started, "ended": ended}
        return {"ok": False, "error": _last_line(err) or f"exit {rc}", "started": started, "ended": ended}

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
            res = rt.probe.result()
            rt.probe = None
            rt.reprobe, reprobe = False, rt.reprobe
            if res["ok"]:
                rt.known = True
                newest = res["newest"]
                rt.newest_id = newest["id"] if newest else None
                rt.newest_time = _parse_utc(newest["time_utc"]) if newest else None
            elif reprobe:
                rt.known = True  # keep what we knew; the failure was counted with its cycle
            else:
                rt.last_error = res["error"]
                rt.known = True  # unknown newest: treat as none, cycles will tell
                rt.failures += 1
                rt.last_failure = now
        if rt.future is not None and rt.future.done():
            res = rt.future.result()
            rt.future = None
            rt.running_since = None
            self.running_cycles -= 1
            duration = res["ended"] - res["started"]
            if res["ok"]:
                r = res["result"]
                rt.newest_id = r["point_id"]
                rt.newest_time = _parse_utc(r["time_utc"])
                rt.failures = 0
                rt.last_error = None
                rt.last_duration = duration
                rt.last_bytes = int(r["bytes_shipped"])
                rt.durations = [*rt.durations[-(rpo.HISTORY - 1) :], duration]
                self.db.add_cycle(
                    rt.spec.name,
                    started=res["started"],
                    ended=res["ended"],
                    ok=True,
                    point_id=r["point_id"],
                    nbytes=r["bytes_shipped"],
                    changed=r["changed_bytes"],
                    hold_ms=r.get("fence_ms"),
                    error=None,
                )
                self._observe(rt.spec.name, duration, int(r["bytes_shipped"]), ok=True)
            else:
                rt.failures += 1
                rt.last_failure = now
                rt.last_error = res["error"]
                log.warning("%s: cycle failed (%d in a row): %s", rt.spec.name, rt.failures, res["error"])
                # it may have failed after committing its point (e.g. while folding): ask the target before going on
                rt.known = False
                rt.reprobe = True
                self.db.add_cycle(
                    rt.spec.name,
                    started=res["started"],
                    ended=res["ended"],
                    ok=False,
                    point_id=None,
                    nbytes=None,
                    changed=None,
                    hold_ms=None,
                    error=res["error"],
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
                self.metrics["violations"].labels(rt.spec.name).inc()
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
            m = self.metrics
            for family in ("duration", "bytes", "violations", "failures"):
                m[family].labels(rt.spec.name)  # every group's series exists from the start (at 0)
            m["rpo"].labels(rt.spec.name).set(rt.spec.protection.rpo)
            if rt.newest_time is not None:
                m["age"].labels(rt.spec.name).set((now - rt.newest_time).total_seconds())

    def _observe(self, group: str, duration: float, nbytes: int, *, ok: bool) -> None:
        if self.metrics is None:
            return
        self.metrics["duration"].labels(group).observe(duration)
        if ok:
            self.metrics["bytes"].labels(group).inc(nbytes)
        else:
            self.metrics["failures"].labels(group).inc()

    def start_metrics(self) -> None:
        if not self.cfg.metrics:
            return
        import prometheus_client as pc

        host, _, port = self.cfg.metrics.rpartition(":")
        reg = pc.CollectorRegistry()
        self.metrics = {
            "age": pc.Gauge("cgrep_newest_point_age_seconds", "Age of the newest committed point", ["group"], registry=reg),
            "rpo": pc.Gauge("cgrep_rpo_seconds", "Recovery point objective", ["group"], registry=reg),
            "duration": pc.Histogram(
                "cgrep_cycle_duration_seconds",
                "Cycle duration",
                ["group"],
                registry=reg,
                buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
            ),
            "bytes": pc.Counter("cgrep_bytes_shipped", "Bytes shipped", ["group"], registry=reg),
            "violations": pc.Counter("cgrep_rpo_violations", "RPO violations", ["group"], registry=reg),
            "failures": pc.Counter("cgrep_cycle_failures", "Failed cycles", ["group"], registry=reg),
        }
        self.continuous.metrics(reg)
        pc.start_http_server(int(port), addr=host or "127.0.0.1", registry=reg)
        log.info("metrics on http://%s:%s/metrics", host or "127.0.0.1", port)

    def _spool(self) -> None:
        spool = Path(self.cfg.spool)
        if not spool.is_dir():
            return
        try:
            from libvirt_cgrep import hooks
        except ImportError:
            return
        events = hooks.read_spool(spool)
        if events:
            for e in events:
                log.info("hook: %s %s", e.domain, e.op)
            hooks.consume(spool, events)
            self.dirty.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP rescans (and the caller reloads the config)."""
        _start_event_loop()
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
                except libvirt.libvirtError as exc:
                    log.warning("scan failed: %s", exc.get_error_message())
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


def first_target(spec: GroupSpec) -> str:
    return spec.protection.target


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("{")]
    return lines[-1].removeprefix("virt-cgrep: error: ") if lines else ""
