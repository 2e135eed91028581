"""``virt-cgrep receive PATH``: the replica side of the stream, on stdin/stdout.

The receiver owns the target (it holds its lock for the whole session) and
applies the commit rule of :mod:`libvirt_cgrep.replica.store`: a point
becomes visible only when its manifest is durable. If the link breaks or
anything fails mid-point, the staged images are discarded and nothing of
that point remains.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from libvirt_cgrep.adapters import nbd, qemu_img
from libvirt_cgrep.adapters.stamps import read_stamp
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.errors import CgrepError, InternalError, StateError, UsageError
from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.store import StagedDisk, StagedWriter, Store
from libvirt_cgrep.replica.verify import verify_settled


def points_reply(store: Store, set_name: str) -> dict[str, Any]:
    """The answer to a ``points`` request: each committed point's manifest and its listing row."""
    pts = store.points(set_name)
    return proto.PointsReply(tuple(pts), tuple(point_listing(store, m) for m in pts)).to_wire()


def point_listing(store: Store, m: mf.Manifest) -> dict[str, Any]:
    sdir = store.set_dir(m.set_name)
    return {
        "id": m.point_id,
        "set": m.set_name,
        "time_utc": m.time_utc,
        "parent": m.parent,
        "fence": m.fence,
        "consistency": m.consistency,
        "domains": [d.name for d in m.domains],
        "disks": [
            {"domain": d.domain, "target": d.target, "image": str(sdir / d.image), "bytes_shipped": d.bytes_shipped}
            for d in m.disks
        ],
    }


_Writer = contextlib.AbstractContextManager[StagedWriter]
#: starts a failback's originals: (target root, set, the HomeStart as a dict or None) -> (point, run, domains)
FailbackStart = Callable[[Path, str, "dict[str, Any] | None"], tuple[str, str, tuple[str, ...]]]


def _no_failback(root: Path, set_name: str, start: dict[str, Any] | None) -> tuple[str, str, tuple[str, ...]]:
    raise UsageError("this receiver does not offer failback-start")


#: copyv: ranges are copied in pieces of at most this many bytes, the source read up to PREFETCH ahead
COPY_PIECE = 4 << 20
PREFETCH = 32 << 20


def _enter(cm: _Writer) -> tuple[_Writer, StagedWriter]:
    return cm, cm.__enter__()


class _Aborted(Exception):
    """Thrown into the open writers when a session is abandoned."""


class _Session:
    def __init__(self, store: Store, *, local: bool = False, failback: FailbackStart | None = None) -> None:
        self.store = store
        self.failback = failback or _no_failback
        self.local = local
        self.sources: dict[str, int] = {}  # copyv: the files named, open read-only
        self.staged: list[StagedDisk] = []
        self.set_name: str | None = None
        self.writers: dict[tuple[str, str], StagedWriter] = {}
        self.stack = contextlib.ExitStack()
        # copyv: each disk's copies run on worker threads (disks side by side), in message order per disk
        self.copier: ThreadPoolExecutor | None = None
        self.copies: dict[tuple[str, str], Future[None]] = {}
        self.done = False  # after failback-start: no further request

    def writer(self, domain: str, target: str) -> StagedWriter:
        """The disk's writer, once every copy sent before for that disk is done (its error raised here)."""
        key = (domain, target)
        pending = self.copies.pop(key, None)
        if pending is not None:
            pending.result()
        try:
            return self.writers[key]
        except KeyError:
            raise StateError(f"no disk {domain}/{target} is being received") from None

    def applied(self) -> None:
        """Every copy sent so far is done (the first error raised)."""
        pending, self.copies = self.copies, {}
        for fut in pending.values():
            fut.result()

    def abort(self) -> None:
        # copies still running first (they write into the writers), then closed as if by an exception: the
        # writers skip their final flush (the images are discarded, and a connection left mid-payload by a
        # broken link would never answer one)
        if self.copier is not None:
            self.copier.shutdown(wait=True, cancel_futures=True)
            self.copier = None
        self.copies = {}
        with contextlib.suppress(Exception):
            self.stack.__exit__(_Aborted, _Aborted(), None)
        self.stack = contextlib.ExitStack()
        self.writers = {}
        self.store.discard(self.staged)
        self.staged = []
        self.close_sources()

    def close_sources(self) -> None:
        for fd in self.sources.values():
            os.close(fd)
        self.sources = {}

    def copyv(self, req: proto.CopyV) -> None:
        """A ``copyv`` message: ranges of a file on this host copied into the image (local sessions only)."""
        path = req.path
        fd = self.sources.get(path)
        if fd is None:
            if not os.path.isabs(path) or not os.path.isfile(path):
                raise StateError(f"copyv source {path!r} is not a file on the receiving host")
            fd = self.sources[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        key = (req.domain, req.target)
        w = self.writers.get(key)
        if w is None:
            raise StateError(f"no disk {req.domain}/{req.target} is being received")
        pieces = [
            (offset + i, src + i, min(COPY_PIECE, length - i))
            for offset, src, length in req.ext
            for i in range(0, length, COPY_PIECE)
        ]
        before = self.copies.get(key)

        def run() -> None:
            if before is not None:
                before.result()  # this disk's earlier copies first (their error is this one's too)
            # pieces of at most COPY_PIECE; the source asked for up to PREFETCH ahead of the copy (WILLNEED: the
            # reads run side by side, not one readahead window at a time)
            ahead = asked = 0
            for offset, src, length in pieces:
                while asked < len(pieces) and ahead < PREFETCH:
                    os.posix_fadvise(fd, pieces[asked][1], pieces[asked][2], os.POSIX_FADV_WILLNEED)
                    ahead += pieces[asked][2]
                    asked += 1
                w.copy_from(offset, fd, src, length)
                ahead -= length

        if self.copier is None:
            self.copier = ThreadPoolExecutor(max_workers=4, thread_name_prefix="copyv")
        self.copies[key] = self.copier.submit(run)

    def splice_data(self, req: proto.Data, fd: int) -> None:
        """An uncompressed ``data`` message whose payload is still in the pipe ``fd``: spliced into the image."""
        self.writer(req.domain, req.target).write_from(req.offset, fd, req.n)

    def splice_datav(self, req: proto.DataV, fd: int) -> None:
        """A ``datav`` message whose payload is still in the pipe ``fd``: each extent spliced into the image."""
        w = self.writer(req.domain, req.target)
        for offset, length in req.ext:
            w.write_from(offset, fd, length)

    def handle(self, msg: dict[str, Any], payload: bytes) -> dict[str, Any] | None:
        """Parse one request and run its handler (:attr:`HANDLERS`); the reply to send, or None for none."""
        op = msg.get("op")
        if self.done:
            raise StateError(f"request {op!r} after failback-start: this session has ended")
        if op == "copyv" and not self.local:  # refused before it is even parsed: it names a file of this host
            raise UsageError("copyv is offered only to a sender on the receiver's own host")
        req = proto.parse_request(msg)
        handler = self.HANDLERS.get(type(req))
        if handler is None:
            raise UsageError(f"unknown request {op!r}")
        return handler(self, req, payload)

    # ------------------------------------------------------------ handlers
    def _datav(self, req: proto.DataV, payload: bytes) -> None:
        w = self.writer(req.domain, req.target)
        view, pos = memoryview(payload), 0
        for offset, length in req.ext:
            w.write(offset, view[pos : pos + length])
            pos += length

    def _data(self, req: proto.Data, payload: bytes) -> None:
        self.writer(req.domain, req.target).write(req.offset, proto.decompress(payload, req.z))

    def _copyv(self, req: proto.CopyV, payload: bytes) -> None:
        self.copyv(req)

    def _applied(self, req: proto.Applied, payload: bytes) -> dict[str, Any]:
        self.applied()
        return proto.Ok().to_wire()

    def _zero(self, req: proto.Zero, payload: bytes) -> None:
        self.writer(req.domain, req.target).write_zeroes(req.offset, req.length)

    def _sets(self, req: proto.Sets, payload: bytes) -> dict[str, Any]:
        return proto.SetsReply(tuple(self.store.sets())).to_wire()

    def _points(self, req: proto.Points, payload: bytes) -> dict[str, Any]:
        return points_reply(self.store, req.set_name)

    def _begin(self, req: proto.Begin, payload: bytes) -> dict[str, Any]:
        if self.staged:
            raise StateError("a point is already being received")
        self.set_name = req.set_name
        parent = self.store.point(req.set_name, req.parent) if req.parent else None
        seeds = {(d, t): _seed_path(p) for d, t, p in req.seed or ()}
        self.staged = self.store.stage(req.set_name, req.point_id, parent, list(req.disks), seeds)
        # one writer per image, started side by side; each registered for closing as soon as it runs
        with ThreadPoolExecutor(max_workers=4) as pool:
            started = [pool.submit(_enter, self.store.writer(s)) for s in self.staged]
        for s, fut in zip(self.staged, started, strict=True):
            exc = fut.exception()
            if exc is None:
                cm, client = fut.result()
                self.stack.push(cm)
                self.writers[(s.domain, s.target)] = client
        failed = next((e for e in (f.exception() for f in started) if e is not None), None)
        if failed is not None:
            raise failed
        return proto.BeginReply(tuple((s.domain, s.target, s.backing) for s in self.staged)).to_wire()

    def _commit(self, req: proto.Commit, payload: bytes) -> dict[str, Any]:
        if not self.staged or self.set_name is None:
            raise StateError("commit without a point")
        if req.shipped is None:
            raise UsageError("a commit request without 'shipped'")
        self.applied()
        # flush every image at once (a qemu-nbd fsyncs its own), then finish them (metadata written, closed)
        for w in self.writers.values():
            w.send_flush()
        for w in self.writers.values():
            w.wait()
        self.stack.close()
        self.writers = {}
        self.close_sources()
        shipped = {(d, t): n for d, t, n in req.shipped}
        final = self.store.commit(self.set_name, req.manifest, self.staged, shipped)
        self.staged = []
        return proto.CommitReply(final).to_wire()

    def _probe(self, req: proto.Probe, payload: bytes) -> dict[str, Any]:
        return proto.ProbeReply(tuple(_probe(p) for p in req.paths), tuple(_exists(p) for p in req.exists)).to_wire()

    def _abort(self, req: proto.Abort, payload: bytes) -> dict[str, Any]:
        self.abort()
        return proto.Ok().to_wire()

    def _verify(self, req: proto.Verify, payload: bytes) -> dict[str, Any]:
        pts = self.store.points(req.set_name)
        if req.point:
            pts = [self.store.point(req.set_name, req.point)]
        results = [r for m in pts if (r := verify_settled(self.store, m, write_order=req.write_order)) is not None]
        return proto.VerifyReply(tuple(results)).to_wire()

    def _failback_start(self, req: proto.FailbackStart, payload: bytes) -> dict[str, Any]:
        if self.staged:
            raise StateError("a point is being received")
        # The recovery takes the target's writer lock itself (to hold its point): this session lets it go and ends.
        self.store.close()
        self.done = True
        point, run, names = self.failback(self.store.root, req.set_name, req.start)
        return proto.FailbackStartReply(point, run, names).to_wire()

    def _prune(self, req: proto.Prune, payload: bytes) -> dict[str, Any]:
        if req.set_name is None:
            raise UsageError("a prune request without 'set'")
        now = datetime.fromisoformat(req.now) if req.now else datetime.now(UTC)
        return proto.PruneReply(tuple(self.store.prune(req.set_name, req.policy, now))).to_wire()

    #: op -> handler: every request this session answers (a handler returns the reply, or None for none)
    HANDLERS: ClassVar[Mapping[type[Any], Callable[..., dict[str, Any] | None]]] = {
        proto.DataV: _datav,
        proto.Data: _data,
        proto.CopyV: _copyv,
        proto.Applied: _applied,
        proto.Zero: _zero,
        proto.Sets: _sets,
        proto.Points: _points,
        proto.Begin: _begin,
        proto.Commit: _commit,
        proto.Probe: _probe,
        proto.Abort: _abort,
        proto.Verify: _verify,
        proto.FailbackStart: _failback_start,
        proto.Prune: _prune,
    }


def _seed_path(path: str) -> Path:
    p = Path(path)
    if not p.is_absolute() or not p.is_file():
        raise StateError(f"seed image {path!r} does not exist on the receiving side")
    return p


def _probe(path: str) -> dict[str, Any]:
    """What reverse protection needs to know about an old primary's image: exists, size, fold stamp."""
    p = Path(path)
    if not p.is_absolute() or not p.is_file():
        return {"path": path, "exists": False}
    stamp = read_stamp(path)
    info = qemu_img.chain(p)[0]
    return {
        "path": path,
        "exists": True,
        "virtual_size": info.virtual_size,
        "stamp": None if stamp is None else {"target": stamp.target, "set": stamp.set_name, "point_id": stamp.point_id},
    }


def _exists(path: str) -> bool:
    return Path(path).is_absolute() and Path(path).exists()


_READ_OPS = (proto.Sets.OP, proto.Points.OP, proto.Verify.OP)
#: A receiver waiting longer than this for the sender's next message gives up (discarding
#: anything staged), so a dead link never holds the target's lock for long.
IDLE_TIMEOUT_ENV = "CGREP_RECEIVER_IDLE_S"
DEFAULT_IDLE_S = 300


class IdleTimeout(Exception):
    """The sender said nothing for the idle timeout (raised from SIGALRM by :func:`on_idle_alarm`)."""


def on_idle_alarm(signum: int, frame: object) -> None:
    """SIGALRM handler of a receiving session: the link is idle past its timeout."""
    raise IdleTimeout()


class StreamIdleError(proto.StreamError):
    """The sender went silent (a dead link): a broken stream (``CommandError``, exit 71)."""


def serve(
    root: Path,
    inp: BinaryIO,
    out: BinaryIO,
    *,
    readonly: bool = False,
    local: bool = False,
    failback: FailbackStart | None = None,
) -> int:
    """Run one receiver session; returns 0 on a clean end, 1 after a reported failure.

    ``local``: the sender runs on this host (it started this receiver for a local target), so ``copyv`` is offered.
    ``failback``: what a ``failback-start`` request runs (``server.failback.failback_start``); without it the
    feature is not offered.
    """
    proto.write_header(out)
    proto.read_header(inp)
    try:
        store = Store.open(root, readonly=readonly)
    except CgrepError as exc:
        proto.send(out, proto.error_reply(exc))
        out.flush()
        return 1
    session = _Session(store, local=local and not readonly, failback=failback)
    try:
        features = tuple(
            f for f in (proto.LOCAL_FEATURES if session.local else proto.FEATURES) if f != proto.FailbackStart.OP or failback
        )
        proto.send(out, proto.Hello(proto.VERSION, str(root), features).to_wire())
        out.flush()
        idle = int(os.environ.get(IDLE_TIMEOUT_ENV, DEFAULT_IDLE_S))
        # Payloads go from the link's pipe straight into the image (or qemu-nbd's socket) when ``inp`` is an unbuffered pipe.
        splice_fd = inp.fileno() if isinstance(inp, io.RawIOBase) and nbd.spliceable(inp.fileno()) else None
        signal.signal(signal.SIGALRM, on_idle_alarm)
        while True:
            signal.alarm(idle)
            try:
                msg = proto.recv_message(inp)
                op = None if msg is None else msg.get("op")
                if msg is None or op == proto.Bye.OP:
                    return 0
                if readonly and op not in _READ_OPS:
                    raise UsageError(f"request {op!r} on a read-only session")
                if splice_fd is not None and op == proto.Data.OP and not msg.get("z") and msg.get("n"):
                    session.splice_data(proto.Data.from_wire(msg), splice_fd)
                    continue
                if splice_fd is not None and op == proto.DataV.OP:
                    session.splice_datav(proto.DataV.from_wire(msg), splice_fd)
                    continue
                payload = proto.recv_payload(inp, msg)
            except IdleTimeout:
                raise StreamIdleError(f"no message from the sender for {idle} s: giving up, nothing committed") from None
            finally:
                signal.alarm(0)
            reply = session.handle(msg, payload)
            if reply is not None:
                proto.send(out, reply)
                out.flush()
    except CgrepError as exc:
        session.abort()
        with contextlib.suppress(OSError):
            proto.send(out, proto.error_reply(exc))
            out.flush()
        return 1
    except Exception as exc:
        session.abort()
        with contextlib.suppress(OSError):
            proto.send(out, proto.error_reply(InternalError(f"{type(exc).__name__}: {exc}")))
            out.flush()
        return 1
    finally:
        session.abort()
        store.close()
