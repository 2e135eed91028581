"""One continuous-mode session: serve -> (forward) -> mirror -> READY -> points at the interval -> end.

Guarantees:

- no point is taken before every disk's mirror is READY: :meth:`Session.point`
  refuses (StateError) while any mirror is still syncing; the seeding (a
  full resync) reports ``progress`` events (bytes copied of bytes to copy,
  QEMU's job counters) every second until ``in-sync``; each point reports
  the guest's mean write latency on the mirrored disks since the previous
  one (``write_ms``: every acknowledged write waited for the replica);
- a point is committed only if no mirror left READY between the moment the
  jobs were READY and ``grace`` seconds after the replica's cut (a failed
  target write surfaces as a job failure within QEMU's 100 ms job slice):
  so every write acknowledged before the cut is in the point, on every disk;
- the replica flushes the frozen images inside its transaction and fsyncs
  them before the manifest (server/live.py): a committed point is durable;
- libvirtd's connection closing (libvirtd restarted or killed) ends the
  session at once with a ``degraded`` event: without it no job event can be
  seen, so no point may be committed (the jobs themselves end with the
  replica session; a restarted libvirtd finds them concluded and drops them);
- the replica is pinged every 0.5 s; a request unanswered for
  ``replica_timeout`` breaks the link (kills the ssh forwarder, or the local
  daemon), so the jobs fail instead of blocking guest writes any longer;
- every end of the session (point count reached, fault, signal) aborts the
  jobs (never a pivot) and ends the replica session, which discards its
  live images; a fault ends with StateError after a ``degraded`` event.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from libvirt_cgrep.adapters import faults, qemu_img
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters.proc import wait_listening
from libvirt_cgrep.continuous import restart
from libvirt_cgrep.continuous.mirror import Mirrors
from libvirt_cgrep.core import continuous as cc
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.core.plan import point_id as make_point_id
from libvirt_cgrep.core.plan import select_disks
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.engine.libvirt_backend import LibvirtBackend
from libvirt_cgrep.errors import CgrepError, NotFoundError, StateError, UsageError
from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.client import Client
from libvirt_cgrep.replica.link import Target, ssh_argv

Emit = Callable[[dict[str, Any]], None]
R = TypeVar("R")
PING_S = 0.5
#: Seconds between two ``progress`` events while syncing.
PROGRESS_S = 1.0
#: Limits each copy job's background copy to this many bytes/s (tests: a seeding that lasts).
FAULT_COPY_BANDWIDTH_ENV = faults.env_name("COPY_BANDWIDTH")
#: After one domain of a set stopped, how long the others have to stop too (then: a final point, no recopy).
STOP_WAIT_S = 30.0
#: Deadline of requests that do real work on the replica (start, commit: checksums; prune: merges).
LONG_S = 600.0


@dataclass(frozen=True)
class Options:
    interval: float = 60.0
    count: int | None = None
    replica_timeout: float = 5.0
    writethrough: bool = False
    policy: Policy | None = None
    grace: float = 0.3
    ready_timeout: float = 600.0


class _Broken(Exception):
    """The link was broken on purpose (a replica that did not answer in time)."""


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    a = b = 0
    for x, y in pairs:
        a, b = a + x, b + y
    return a, b


class Session:
    def __init__(
        self,
        conn: lv.Connection,
        uri: str,
        names: Sequence[str],
        target: Target,
        *,
        set_name: str | None,
        opts: Options,
        emit: Emit,
    ) -> None:
        if not names:
            raise UsageError("name at least one domain")
        if len(names) > 1 and not set_name:
            raise UsageError("several domains form one set: name it with --set NAME")
        self.conn = conn
        self.target = target
        self.opts = opts
        self.emit = emit
        self.set_name = validate_name(set_name or names[0], "set name")
        self.backends = [LibvirtBackend(conn, n, uri) for n in names]
        self.link: Client | None = None
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.fwd_dir: Path | None = None
        self.daemon_pid: int | None = None
        self.mirrors: list[Mirrors] = []
        self.wake = threading.Event()
        self.broke: str | None = None
        self.lost: str | None = None
        self.points = 0
        self.last_point: float | None = None
        self._last_progress = 0.0
        self._wstats = (0, 0)

    # ------------------------------------------------------------ plumbing
    def _on_change(self, domain: str, target: str, state: str) -> None:
        self.wake.set()

    def _conn_closed(self, reason: int) -> None:
        self.lost = f"the connection to libvirtd closed (reason {reason}): job events can no longer be seen"
        self.wake.set()

    def _check_conn(self) -> None:
        if self.lost:
            raise StateError(self.lost)

    @contextlib.contextmanager
    def _deadline(self, what: str, seconds: float | None = None) -> Iterator[None]:
        """Break the link if the body does not finish within ``seconds`` (default: the replica timeout less a ping)."""
        limit = self.opts.replica_timeout - PING_S if seconds is None else seconds
        timer = threading.Timer(max(0.1, limit), self._break_link, (what,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
        if self.broke:
            raise _Broken(self.broke)

    def _break_link(self, why: str) -> None:
        """Make every NBD connection fail now: kill the ssh forwarder, or the local daemon; then the session."""
        self.broke = f"the replica did not answer {why} within {self.opts.replica_timeout:g} s: link broken"
        if self.forwarder is not None:
            if self.forwarder.poll() is None:
                self.forwarder.kill()
            if self.link is not None and self.link.proc.poll() is None:
                self.link.proc.kill()  # the far receiver sees the end of its stream and cleans up by itself
        elif self.daemon_pid is not None:
            # Local: the receiver is healthy (its daemon hung); it reports the lost daemon and cleans up on 'bye'.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.daemon_pid, signal.SIGKILL)
        self.wake.set()

    def _request(self, req: proto.Request[R], seconds: float | None = None) -> R:
        """A request under a deadline: pings and cuts get the replica timeout; long work (start, commit) ``seconds``."""
        assert self.link is not None
        with self._deadline(req.OP, seconds):
            return self.link.request(req)

    def _states(self) -> tuple[dict[str, str], int]:
        states: dict[str, str] = {}
        failures = 0
        for m in self.mirrors:
            s, f = m.snapshot()
            states.update({f"{m.name}/{t}": v for t, v in s.items()})
            failures += f
        return states, failures

    def state(self) -> str:
        return cc.mirror_state(self._states()[0])

    # ------------------------------------------------------------ phases
    def _forward(self, remote: str) -> str:
        """``ssh -N -L local:remote`` (strict host keys, argv); the local socket handed to QEMU's user."""
        self.fwd_dir = Path(tempfile.mkdtemp(prefix="cgrep-fwd-", dir=os.environ.get("CGREP_RUN_DIR") or None))
        os.chmod(self.fwd_dir, 0o711)
        local = str(self.fwd_dir / "nbd.sock")
        argv = ssh_argv(
            self.target, "-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes", "-L", f"{local}:{remote}"
        )
        self.forwarder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # QEMU connects to it later: wait until ssh listens, not only until the file exists.
        wait_listening([local], self.forwarder, what=f"the ssh forwarding to {self.target}", timeout=15.0)
        owner = lv.qemu_owner()
        if owner is not None:
            with contextlib.suppress(PermissionError):
                os.chown(local, *owner)
        os.chmod(local, 0o660)
        return local

    def start(self) -> None:
        for b in self.backends:
            b.require_running()
        lv.on_close(self.conn, self._conn_closed)  # one close callback per connection: the session owns it
        disks: list[tuple[str, str, int]] = []
        per_dom: dict[str, list[str]] = {}
        for b in self.backends:
            for d in select_disks(b.discover()):
                size = int(lv.call(f"{b.name}/{d.target}: reading the disk's size", b.dom.blockInfo, d.target)[0])
                disks.append((b.name, d.target, size))
                per_dom.setdefault(b.name, []).append(d.target)
        self.link = Client(self.target, serve=True)
        resume, why = self._resume_plan(per_dom)
        # A previous restart's overlay below the active image is folded down first (libvirt's block commit;
        # the guest keeps writing): a disk's chain grows by at most one overlay per restart.
        folded = [f for b in self.backends for t in per_dom[b.name] if (f := restart.fold_previous(b.dom, t))]
        start = proto.Start(self.set_name, tuple(disks), self.opts.writethrough)
        reply: proto.StartReply | None = None
        if resume is not None:
            try:
                reply = self._request(dataclasses.replace(start, resume=resume), LONG_S)
            except _Broken:
                raise
            except CgrepError as exc:
                resume, why = None, f"the replica cannot restart from {resume}: {exc}"
        if reply is None:
            reply = self._request(start, LONG_S)
        socket = reply.socket
        if self.target.host is None:
            self.daemon_pid = reply.pid
        else:
            socket = self._forward(socket)
        exports = {(d, t): e for d, t, e in reply.exports}
        self.emit(
            {
                "event": "syncing",
                "set": self.set_name,
                "disks": len(disks),
                "writethrough": self.opts.writethrough,
                "daemon_pid": reply.pid,  # on the replica host
                "forwarder_pid": self.forwarder.pid if self.forwarder else None,
                "resume": resume,  # the final point the replica restarts from: only the disks' new tops are copied
                "full_copy_reason": why,
                "folded": folded,
            }
        )
        t0 = time.monotonic()
        bandwidth = int(faults.number("COPY_BANDWIDTH")) or None
        for b in self.backends:
            m = Mirrors(self.conn, b.dom, per_dom[b.name], self._on_change)
            self.mirrors.append(m)
            m.start(socket, {t: exports[(b.name, t)] for t in per_dom[b.name]}, bandwidth, shallow=resume is not None)
        self._last_progress = 0.0
        for m in self.mirrors:
            m.wait_ready(self.opts.ready_timeout, self._syncing_tick)
        self._wstats = self.write_stats()
        copied = self.progress()[1]
        self.emit(
            {
                "event": "in-sync",
                "set": self.set_name,
                "sync_s": round(time.monotonic() - t0, 3),
                "copied_bytes": copied,
                "resume": resume,
            }
        )

    def _resume_plan(self, per_dom: dict[str, list[str]]) -> tuple[str | None, str | None]:
        """(final point to restart from, None) if every disk may skip the full copy, else (None, why not)."""
        try:
            pts = self._request(proto.Points(self.set_name), LONG_S).points
        except _Broken:
            raise
        except CgrepError as exc:
            return None, f"the replica's points are not readable: {exc}"
        if not pts:
            return None, "the replica holds no point of the set yet"
        newest = pts[-1]
        record = cc.resume_from_dict((newest.extra or {}).get("resume"))
        chains = self._chains(per_dom)
        ids = {p: restart.file_id(p) for c in chains.values() for p in c[1:]}
        why = cc.check_resume(record, chains, ids)
        return (None, why) if why else (newest.point_id, None)

    def _chains(self, per_dom: dict[str, list[str]]) -> dict[tuple[str, str], tuple[str, ...]]:
        """Each protected disk's chain, active image first, as real paths: {(domain, target): chain}."""
        return {(b.name, t): c for b in self.backends for t, c in restart.chains(b.dom, per_dom[b.name]).items()}

    def _stopped(self) -> bool:
        """True once every domain of the set stopped (its jobs ended with it) and is shut off.

        After the first domain's stop, the others get STOP_WAIT_S to stop too (a
        host shutting its guests down one by one); meanwhile their writes are
        still mirrored, and the replica is pinged.
        """
        if not self.mirrors or not any(m.stopped for m in self.mirrors):
            return False
        end = time.monotonic() + STOP_WAIT_S
        while not all(m.stopped for m in self.mirrors) or any(b.dom.isActive() for b in self.backends):
            if time.monotonic() > end:
                return False
            self._ping()
            time.sleep(0.1)
        return True

    def _end_if_stopped(self) -> bool:
        """If the set's domains stopped (:meth:`_stopped`), take the final point (:meth:`_final`) and say so."""
        if not self._stopped():
            return False
        self._final()
        return True

    def _final(self) -> None:
        """Every domain stopped: commit the replica's images as a final point if they equal the disks; add overlays.

        The identities of the disks' images are taken before their digests, so a
        write after the digest changes what the next start compares. A digest
        that differs raises StateError (the next start copies everything).
        """
        now = datetime.now(UTC)
        pid = make_point_id(now)
        chains = self._chains({m.name: list(m.states) for m in self.mirrors})
        ids = {p: restart.file_id(p) for c in chains.values() for p in c}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            mine_f = pool.submit(lambda: {f"{d}/{t}": qemu_img.content_digest(Path(c[0])) for (d, t), c in chains.items()})
            final = self._request(proto.Final(pid), LONG_S)
            mine = mine_f.result()
            digest_s = time.monotonic() - t0
        theirs = final.digests
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise StateError(
                f"the domain stopped, but the replica's {', '.join(differ)} differ from its disks: "
                "nothing committed, the next start copies them in full"
            )
        gone = [p for p, f in ids.items() if f is None]
        if gone:
            raise StateError(f"the domain stopped, but {', '.join(gone)} vanished: the next start copies in full")
        records = [
            cc.ResumeDisk(d, t, cc.overlay_path(c[0], pid), tuple(f for p in c if (f := ids[p]) is not None), mine[f"{d}/{t}"])
            for (d, t), c in chains.items()
        ]
        draft = self._manifest(pid, now, {"mode": "continuous", "final": True, "resume": cc.resume_to_dict(records)})
        committed = self._request(proto.Commit(draft), LONG_S)
        self.points += 1
        self.emit(
            {
                "event": "point",
                "set": self.set_name,
                "point_id": pid,
                "time_utc": draft.time_utc,
                "cut_ms": 0.0,
                "commit_ms": committed.commit_ms,
                "final": True,
                "digest_s": round(digest_s, 3),
                "pruned": [],
            }
        )
        reason = None
        try:
            for b in self.backends:
                restart.add_overlays(b.dom, {r.target: r.top for r in records if r.domain == b.name})
        except CgrepError as exc:
            reason = f"no restart overlay: {exc}"
        self.emit({"event": "stopped", "set": self.set_name, "point_id": pid, "resumable": reason is None, "reason": reason})

    def write_stats(self) -> tuple[int, int]:
        """(write operations, total ns) over the set's mirrored disks, asked now."""
        return _sum_pairs(m.write_stats() for m in self.mirrors)

    def progress(self) -> tuple[int, int]:
        """(bytes copied, bytes to copy) of the set's jobs, asked now."""
        return _sum_pairs(m.progress() for m in self.mirrors)

    def _syncing_tick(self) -> None:
        """While seeding: pings, and a ``progress`` event every PROGRESS_S."""
        self._ping()
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_S:
            self._last_progress = now
            done, total = self.progress()
            self.emit({"event": "progress", "set": self.set_name, "done": done, "total": total})

    def _ping(self) -> None:
        self._check_conn()
        now = time.monotonic()
        if now - getattr(self, "_last_ping", 0.0) >= PING_S:
            self._last_ping = now
            self._request(proto.Ping(self.opts.replica_timeout))

    def keepalive(self) -> None:
        """Ping the replica (at most every PING_S): a caller driving :meth:`point` itself calls this meanwhile.

        The run loop does it; the replica ends a session idle for ``live.IDLE_S`` seconds.
        """
        self._ping()

    def point(self) -> dict[str, Any]:
        """One point: cut on the replica, prove the mirrors stayed in sync across it, commit."""
        states, failures = self._states()
        if cc.mirror_state(states) != "in-sync":
            raise StateError(f"no point while the mirrors are not in sync: {states}")
        # The point's time is taken before its overlays are prepared: the point holds at least every write
        # acknowledged until then (conservative for the RPO).
        now = datetime.now(UTC)
        pid = make_point_id(now)
        prep = self._request(proto.Prepare(pid), LONG_S)  # qemu-img only: slow under load, no daemon
        cut = self._request(proto.Cut(pid))  # the daemon: replica timeout
        time.sleep(self.opts.grace)
        states2, failures2 = self._states()
        bad = [t for m in self.mirrors for t in m.check_jobs()]
        self._check_conn()
        if failures2 != failures or cc.mirror_state(states2) != "in-sync" or bad:
            raise StateError(f"a mirror left READY around the cut of {pid}: point not committed ({states2}, gone: {bad})")
        draft = self._manifest(pid, now, {"mode": "continuous", "cut_ms": cut.cut_ms, "prepare_ms": prep.prepare_ms})
        reply = self._request(proto.Commit(draft), LONG_S)
        pruned: list[str] = []
        if self.opts.policy is not None:
            pol = self.opts.policy
            pruned = list(self._request(proto.Prune(pol, now=now.isoformat()), LONG_S).deleted)
        self.points += 1
        self.last_point = time.monotonic()
        wstats = self.write_stats()
        write_ms = cc.mean_write_ms(self._wstats, wstats)
        self._wstats = wstats
        return {
            "event": "point",
            "set": self.set_name,
            "point_id": pid,
            "time_utc": draft.time_utc,
            "cut_ms": cut.cut_ms,
            "prepare_ms": prep.prepare_ms,
            "preflush_ms": cut.preflush_ms,
            "commit_ms": reply.commit_ms,
            "write_ms": None if write_ms is None else round(write_ms, 3),
            "pruned": pruned,
        }

    def _manifest(self, pid: str, now: datetime, extra: dict[str, Any]) -> mf.Manifest:
        """A point's draft manifest (the replica fills in each disk's image, size and checksum)."""
        return mf.Manifest(
            point_id=pid,
            time_utc=now.isoformat().replace("+00:00", "Z"),
            set_name=self.set_name,
            group=self.set_name if len(self.backends) > 1 else None,
            parent=None,
            fence="none",
            consistency="crash",
            domains=tuple(mf.DomainRecord(*b.record()) for b in self.backends),
            disks=tuple(
                mf.DiskRecord(b.name, t, "", None, 0, 0, "", "", "")
                for b, m in zip(self.backends, self.mirrors, strict=True)
                for t in m.states
            ),
            extra=extra,
        )

    def run(self, stop: threading.Event) -> int:
        """Start, then take points every interval until ``count`` points or ``stop``; StateError on a fault."""
        try:
            try:
                self.start()
                next_at = time.monotonic()
                while not stop.is_set():
                    self._check_conn()
                    states, _ = self._states()
                    if cc.mirror_state(states) != "in-sync":
                        if self._end_if_stopped():
                            return 0
                        raise StateError(f"mirror left READY: {', '.join(f'{k} {v}' for k, v in states.items() if v != 'ready')}")
                    if time.monotonic() >= next_at:
                        try:
                            ev = self.point()
                        except StateError:
                            if self._end_if_stopped():  # the domains stopped around this cut
                                return 0
                            raise
                        self.emit(ev)
                        next_at += self.opts.interval
                        next_at = max(next_at, time.monotonic())
                        if self.opts.count is not None and self.points >= self.opts.count:
                            return 0
                    self._ping()
                    self.wake.wait(min(PING_S, max(0.0, next_at - time.monotonic())))
                    self.wake.clear()
                return 0
            except _Broken as exc:
                raise StateError(str(exc)) from None
            except CgrepError as exc:
                if self.broke:
                    raise StateError(self.broke) from exc
                raise
        except CgrepError as exc:
            self.emit(
                {
                    "event": "degraded",
                    "set": self.set_name,
                    "reason": str(exc),
                    "states": self._states()[0],
                    "points": self.points,
                }
            )
            if isinstance(exc, UsageError | StateError | NotFoundError):
                raise
            raise StateError(f"continuous mode degraded: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        """Abort the jobs (no pivot), end the replica session (it discards the live images), stop the forwarder."""
        for m in self.mirrors:
            m.abort()
            m.close()
        lv.clear_on_close(self.conn)
        if self.link is not None:
            if self.link.proc.poll() is None:
                self.link.close()  # 'bye': the receiver stops its daemon and discards the live images (killed after 30 s)
            else:
                self.link.kill()
            self.link = None
        if self.forwarder is not None:
            if self.forwarder.poll() is None:
                self.forwarder.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.forwarder.wait(timeout=5)
            if self.forwarder.poll() is None:
                self.forwarder.kill()
                self.forwarder.wait()
            if self.forwarder.stderr is not None:
                self.forwarder.stderr.close()
            self.forwarder = None
        if self.fwd_dir is not None:
            shutil.rmtree(self.fwd_dir, ignore_errors=True)
            self.fwd_dir = None
