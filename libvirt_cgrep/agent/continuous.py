"""The agent's continuous mode: one continuous-session child (``agent.session_child``) per group, its events drive the group.

Guarantees:

- snapshot mode and continuous mode never run on one group at once: the
  child starts only when no snapshot cycle runs, and no snapshot cycle
  starts while the child runs (:meth:`Continuous.owns`);
- a child that ends after its domains stopped in sync (a ``stopped`` event:
  its final point committed) is no fault: a ``continuous-stopped`` alert
  (informational), the mirror state ``stopped``, and continuous mode starts
  again, without a full recopy when the disks allow it, as soon as the
  domains run again (then ``continuous-restored``);
- a child that ends otherwise (replica killed or hung, link cut, a domain
  stopped out of sync) raises
  a ``continuous-degraded`` alert as soon as its ``degraded`` event (or its
  exit) is read, which wakes the scheduler at once; the group then falls
  back to snapshot-mode cycles to the same target, and continuous mode is
  retried after ``RETRY_S`` (a full resync by the mirror), with
  ``continuous-restored`` when it is in sync again; a child ended by the
  agent's own stop raises nothing;
- the mode, mirror state (syncing, in-sync, degraded), the resync's
  progress (bytes copied of bytes to copy, while syncing), the guests' mean
  write latency on the mirrored disks (over the last interval) and last point are
  written to ``continuous.json`` beside the state DB for ``status``, and
  exported to Prometheus.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from prometheus_client.core import GaugeMetricFamily

from libvirt_cgrep.adapters.fs import save_file
from libvirt_cgrep.agent import session_child, worker
from libvirt_cgrep.agent.alerts import Alert, AlertSink
from libvirt_cgrep.agent.config import AgentConfig
from libvirt_cgrep.agent.db import StateDB
from libvirt_cgrep.agent.groups import Runtime

log = logging.getLogger("libvirt_cgrep.agent")

#: Seconds between a degraded continuous mode and the next attempt (snapshot cycles meanwhile).
RETRY_S = 30.0
#: Overrides RETRY_S (tests).
RETRY_ENV = "CGREP_CONTINUOUS_RETRY_S"
SIDECAR = "continuous.json"


@dataclass
class _Child:
    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False


@dataclass
class _Group:
    child: _Child | None = None
    mirror: str = "off"
    retry_at: float = 0.0
    degraded: bool = False
    last_point: str | None = None
    last_point_time: float | None = None
    last_cut_ms: float | None = None
    reason: str | None = None
    resync_done: int | None = None
    resync_total: int | None = None
    write_ms: float | None = None
    #: a ``continuous-stopped`` alert was raised (its ``continuous-restored`` is due)
    stopped: bool = False
    #: the last sync: the final point it restarted from (None: a full copy) and the bytes it copied
    resumed_from: str | None = None
    copied_bytes: int | None = None


class Host(Protocol):
    """What continuous mode needs of the agent that drives it."""

    cfg: AgentConfig
    db: StateDB
    sink: AlertSink
    runner: worker.Runner
    stopping: bool

    @property
    def dirty(self) -> threading.Event:
        """Set to wake the agent's loop."""


class Continuous:
    def __init__(self, agent: Host, state_file: Path | None = None) -> None:
        self.agent = agent
        self.groups: dict[str, _Group] = {}
        self.state_file = state_file
        self.retry_s = float(os.environ.get(RETRY_ENV) or RETRY_S)
        self._written = ""

    # ------------------------------------------------------------ children
    def _spawn(self, rt: Runtime) -> _Child:
        spec = rt.spec
        p = spec.protection
        req = session_child.SessionRequest(
            self.agent.cfg.uri,
            spec.members,
            p.target,
            spec.name,
            float(p.interval),
            float(p.replica_timeout),
            max(1, p.keep),
        )
        proc = subprocess.Popen(  # stopped by stop(); SIGTERMed if the agent dies (it then ends its mirrors)
            [sys.executable, "-c", session_child.COMMAND],  # a fresh interpreter: a long-lived session, not a forked cycle
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=functools.partial(worker.set_pdeathsig, signal.SIGTERM),  # noqa: PLW1509 - prctl only
        )
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # a child that died at once is seen by its reader (its exit)
            cast(io.TextIOWrapper, proc.stdin).buffer.write(pickle.dumps(req))
            proc.stdin.close()
        child = _Child(proc)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    with child.lock:
                        child.events.append(ev)
                    self.agent.dirty.set()  # wake the scheduler now: alerts within the second
            err = proc.stderr.read() if proc.stderr else ""
            proc.wait()
            with child.lock:
                child.events.append({"event": "exit", "code": proc.returncode, "stderr": err.strip().splitlines()[-1:] or [""]})
                child.done = True
            self.agent.dirty.set()

        threading.Thread(target=read, name=f"continuous-{spec.name}", daemon=True).start()
        log.info("%s: continuous mode starting (pid %d)", spec.name, proc.pid)
        return child

    def _alert(self, rt: Runtime, kind: str, message: str, now: datetime) -> None:
        self.agent.db.add_alert(rt.spec.name, kind, now.timestamp(), message)
        self.agent.sink.deliver(Alert(kind, rt.spec.name, rt.state, message, now))

    # ------------------------------------------------------------ the hook
    def owns(self, rt: Runtime, now: datetime) -> bool:
        """Drive the group's continuous mode; True while it runs (then no snapshot cycle may start)."""
        spec = rt.spec
        g = self.groups.setdefault(spec.name, _Group())
        if g.child is not None:
            with g.child.lock:
                evs, g.child.events = g.child.events, []
                done = g.child.done
            for ev in evs:
                self._event(rt, g, ev, now)
            if done:
                g.child = None
                # after a clean stop (a final point), mirroring starts again as soon as the domain runs
                g.retry_at = 0.0 if g.mirror == "stopped" else time.monotonic() + self.retry_s
        running = all(s == "running" for s in spec.member_states)
        if g.child is None and running and rt.future is None and not self.agent.stopping and time.monotonic() >= g.retry_at:
            g.child = self._spawn(rt)
            g.mirror = "syncing"
            g.resync_done = g.resync_total = None
        self._write()
        return g.child is not None

    def _event(self, rt: Runtime, g: _Group, ev: dict[str, Any], now: datetime) -> None:
        kind = ev.get("event")
        if kind == "syncing":
            g.mirror = "syncing"
            g.resync_done = g.resync_total = None
        elif kind == "progress":
            g.resync_done, g.resync_total = int(ev["done"]), int(ev["total"])
        elif kind == "in-sync":
            g.mirror = "in-sync"
            g.resync_done = g.resync_total = None
            g.resumed_from = ev.get("resume")
            g.copied_bytes = ev.get("copied_bytes")
            how = (
                "after a full resync"
                if g.resumed_from is None
                else f"restarted from final point {g.resumed_from}, {g.copied_bytes} bytes copied"
            )
            if g.degraded or g.stopped:
                g.degraded = g.stopped = False
                self._alert(rt, "continuous-restored", f"mirrors in sync again ({how})", now)
        elif kind == "point":
            pid, t = str(ev["point_id"]), str(ev["time_utc"])
            rt.newest_id = pid
            rt.newest_time = datetime.fromisoformat(t.replace("Z", "+00:00"))
            rt.failures = 0
            rt.last_error = None
            g.last_point, g.last_point_time, g.last_cut_ms = pid, rt.newest_time.timestamp(), float(ev["cut_ms"])
            if ev.get("write_ms") is not None:
                g.write_ms = float(ev["write_ms"])
            ts = rt.newest_time.timestamp()
            self.agent.db.add_cycle(
                rt.spec.name,
                started=ts,
                ended=time.time(),
                ok=True,
                point_id=pid,
                nbytes=0,
                changed=None,
                hold_ms=0.0,
                error=None,
            )
        elif kind == "stopped":
            g.mirror = "stopped"  # the domains stopped in sync: a final point, not a fault
            g.reason = None if ev.get("resumable") else str(ev.get("reason"))
            if not g.stopped and not g.degraded:
                g.stopped = True
                then = "without a full recopy" if ev.get("resumable") else f"with a full copy ({g.reason})"
                self._alert(
                    rt,
                    "continuous-stopped",
                    f"the domains stopped in sync: final point {ev.get('point_id')}; continuous mode restarts {then} "
                    "when they run again",
                    now,
                )
        elif kind == "exit" and g.mirror == "stopped" and ev.get("code") == 0:
            pass
        elif kind == "exit" and self.agent.stopping and g.mirror != "degraded":
            g.mirror = "off"  # ended by the agent's own stop: not a fault, no alert
        elif kind in ("degraded", "exit") and g.mirror != "degraded":
            reason = str(ev.get("reason") or (ev.get("stderr") or [""])[0] or f"exit {ev.get('code')}")
            g.mirror, g.reason = "degraded", reason
            rt.last_error = f"continuous: {reason}"
            if not g.degraded:
                g.degraded = True
                self._alert(
                    rt, "continuous-degraded", f"{reason}; falling back to snapshot mode, retrying in {self.retry_s:.0f} s", now
                )

    def stop(self) -> None:
        """Stop every child (SIGTERM: it aborts its mirrors and ends its replica session)."""
        for g in self.groups.values():
            if g.child is not None and g.child.proc.poll() is None:
                g.child.proc.terminate()
        for g in self.groups.values():
            if g.child is not None:
                try:
                    g.child.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    g.child.proc.kill()

    def _write(self) -> None:
        if self.state_file is None:
            return
        data = {
            name: {
                "mode": "continuous",
                "mirror": g.mirror,
                "last_point": g.last_point,
                "last_point_time": g.last_point_time,
                "last_cut_ms": g.last_cut_ms,
                "reason": g.reason,
                "resync_done": g.resync_done,
                "resync_total": g.resync_total,
                "write_ms": g.write_ms,
                "resumed_from": g.resumed_from,
                "copied_bytes": g.copied_bytes,
            }
            for name, g in self.groups.items()
        }
        text = json.dumps(data, sort_keys=True)
        if text == self._written:
            return
        with contextlib.suppress(OSError):
            save_file(self.state_file, text.encode(), 0o644)
            self._written = text

    def metrics(self, registry: Any) -> None:
        """Prometheus: mirror state (1 for the current one), seconds since the last point, resync bytes, write latency."""
        agent = self

        class Collector:
            def collect(self) -> Any:
                st = GaugeMetricFamily(
                    "cgrep_continuous_mirror_state", "Mirror state of continuous mode", labels=["group", "state"]
                )
                age = GaugeMetricFamily(
                    "cgrep_continuous_point_age_seconds", "Seconds since the last continuous point", labels=["group"]
                )
                done = GaugeMetricFamily(
                    "cgrep_continuous_resync_done_bytes", "Bytes the running resync has copied", labels=["group"]
                )
                total = GaugeMetricFamily(
                    "cgrep_continuous_resync_total_bytes", "Bytes the running resync has to copy", labels=["group"]
                )
                lat = GaugeMetricFamily(
                    "cgrep_continuous_write_latency_seconds",
                    "Guests' mean write latency on the mirrored disks over the last interval (each write waits for the replica)",
                    labels=["group"],
                )
                now = datetime.now(UTC).timestamp()
                for name, g in agent.groups.items():
                    if g.write_ms is not None and g.mirror == "in-sync":
                        lat.add_metric([name], g.write_ms / 1000.0)
                    for s in ("syncing", "in-sync", "degraded", "stopped"):
                        st.add_metric([name, s], 1.0 if g.mirror == s else 0.0)
                    if g.last_point_time is not None:
                        age.add_metric([name], now - g.last_point_time)
                    if g.resync_total is not None and g.resync_done is not None:
                        done.add_metric([name], float(g.resync_done))
                        total.add_metric([name], float(g.resync_total))
                yield st
                yield age
                yield done
                yield total
                yield lat

        registry.register(Collector())


def read_sidecar(state_dir: Path) -> dict[str, dict[str, Any]]:
    """What the agent last wrote about its continuous groups ({} if none)."""
    try:
        data: dict[str, dict[str, Any]] = json.loads((state_dir / SIDECAR).read_bytes())
        return data
    except (OSError, ValueError):
        return {}
