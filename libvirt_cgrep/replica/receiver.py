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
import json
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from libvirt_cgrep.adapters import nbd, qemu_img
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.errors import CgrepError, InternalError, NotFoundError, StateError, UsageError
from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.store import StagedDisk, StagedWriter, Store, sha256_file


def manifest_to_dict(m: mf.Manifest) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(m.to_json())
    return d


def manifest_from_dict(d: dict[str, Any], *, committed: bool = True) -> mf.Manifest:
    return mf.parse(json.dumps(d).encode(), committed=committed)


def verify_point(store: Store, m: mf.Manifest, *, write_order: bool = False) -> dict[str, Any]:
    """Re-check one committed point: files, checksums, chains inside the target, optionally write order."""
    sdir = store.set_dir(m.set_name)
    problems: list[str] = []
    images: list[Path] = []
    for d in m.disks:
        img = sdir / d.image
        images.append(img)
        if not img.exists():
            problems.append(f"{d.domain}/{d.target}: {d.image} is missing")
            continue
        if sha256_file(img) != d.sha256:
            problems.append(f"{d.domain}/{d.target}: checksum mismatch of {d.image}")
        try:
            chain = qemu_img.chain(img)
        except CgrepError as exc:
            problems.append(f"{d.domain}/{d.target}: unreadable chain: {exc}")
            continue
        if (chain[0].backing and Path(chain[0].backing).name) != d.backing:
            problems.append(f"{d.domain}/{d.target}: backing is {chain[0].backing}, manifest says {d.backing}")
        for layer in chain:
            if not Path(layer.path).resolve().is_relative_to(sdir.resolve()):
                problems.append(f"{d.domain}/{d.target}: chain leaves the target: {layer.path}")
    result: dict[str, Any] = {"point_id": m.point_id, "ok": not problems, "problems": problems}
    if write_order and not problems:
        from libvirt_cgrep.lab.check import check_images

        verdict = check_images(images)
        result["write_order"] = verdict.as_dict()
        result["ok"] = verdict.consistent
        if not verdict.consistent:
            problems.append(f"write order broken: first hole at {verdict.first_hole}")
    return result


def verify_settled(store: Store, m: mf.Manifest, *, write_order: bool = False, tries: int = 3) -> dict[str, Any] | None:
    """:func:`verify_point`, not fooled by a prune running beside it (verify takes no lock).

    A point with problems is re-read: gone (pruned meanwhile) gives None; a changed manifest (a prune merged a
    parent into it) is verified again. Problems with an unchanged manifest are real.
    """
    for _ in range(tries):
        res = verify_point(store, m, write_order=write_order)
        if res["ok"]:
            return res
        try:
            again = store.point(m.set_name, m.point_id)
        except NotFoundError:
            return None
        if again == m:
            return res
        m = again
    return res


def points_reply(store: Store, set_name: str) -> dict[str, Any]:
    """The answer to a ``points`` request: each committed point's manifest and its listing row."""
    pts = store.points(set_name)
    return {
        "ok": True,
        "points": [manifest_to_dict(m) for m in pts],
        "listing": [point_listing(store, m) for m in pts],
    }


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
#: copyv: ranges are copied in pieces of at most this many bytes, the source read up to PREFETCH ahead
COPY_PIECE = 4 << 20
PREFETCH = 32 << 20


def _enter(cm: _Writer) -> tuple[_Writer, StagedWriter]:
    return cm, cm.__enter__()


class _Aborted(Exception):
    """Thrown into the open writers when a session is abandoned."""


class _Session:
    def __init__(self, store: Store, *, local: bool = False) -> None:
        self.store = store
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

    def writer(self, msg: dict[str, Any]) -> StagedWriter:
        """The disk's writer, once every copy sent before ``msg`` for that disk is done (its error raised here)."""
        key = (msg["domain"], msg["target"])
        pending = self.copies.pop(key, None)
        if pending is not None:
            pending.result()
        return self.writers[key]

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

    def copyv(self, msg: dict[str, Any]) -> None:
        """A ``copyv`` message: ranges of a file on this host copied into the image (local sessions only)."""
        if not self.local:
            raise UsageError("copyv is offered only to a sender on the receiver's own host")
        path = str(msg.get("path", ""))
        fd = self.sources.get(path)
        if fd is None:
            if not os.path.isabs(path) or not os.path.isfile(path):
                raise StateError(f"copyv source {path!r} is not a file on the receiving host")
            fd = self.sources[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        key = (msg["domain"], msg["target"])
        w = self.writers[key]
        pieces = [
            (offset + i, src + i, min(COPY_PIECE, length - i))
            for offset, src, length in proto.copy_extents(msg)
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

    def splice_data(self, msg: dict[str, Any], fd: int) -> None:
        """An uncompressed ``data`` message whose payload is still in the pipe ``fd``: spliced into the image."""
        w = self.writer(msg)
        w.write_from(int(msg["offset"]), fd, int(msg.get("n", 0)))

    def splice_datav(self, msg: dict[str, Any], fd: int) -> None:
        """A ``datav`` message whose payload is still in the pipe ``fd``: each extent spliced into the image."""
        w = self.writer(msg)
        for offset, length in proto.extents(msg):
            w.write_from(offset, fd, length)

    def handle(self, msg: dict[str, Any], payload: bytes) -> dict[str, Any] | None:
        op = msg.get("op")
        if self.done:
            raise StateError(f"request {op!r} after failback-start: this session has ended")
        if op == "datav":
            w = self.writer(msg)
            view, pos = memoryview(payload), 0
            for offset, length in proto.extents(msg):
                w.write(offset, view[pos : pos + length])
                pos += length
            return None
        if op == "data":
            w = self.writer(msg)
            w.write(int(msg["offset"]), proto.decompress(payload, msg.get("z")))
            return None
        if op == "copyv":
            self.copyv(msg)
            return None
        if op == "applied":
            self.applied()
            return {"ok": True}
        if op == "zero":
            self.writer(msg).write_zeroes(int(msg["offset"]), int(msg["length"]))
            return None
        if op == "sets":
            return {"ok": True, "sets": self.store.sets()}
        if op == "points":
            return points_reply(self.store, msg["set"])
        if op == "begin":
            if self.staged:
                raise StateError("a point is already being received")
            self.set_name = msg["set"]
            parent = self.store.point(msg["set"], msg["parent"]) if msg.get("parent") else None
            disks = [(str(d), str(t), int(s), bool(f)) for d, t, s, f in msg["disks"]]
            seeds = {(str(d), str(t)): _seed_path(p) for d, t, p in msg.get("seed", ())}
            self.staged = self.store.stage(msg["set"], msg["point_id"], parent, disks, seeds)
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
            return {"ok": True, "staged": [[s.domain, s.target, s.backing] for s in self.staged]}
        if op == "commit":
            if not self.staged or self.set_name is None:
                raise StateError("commit without a point")
            self.applied()
            # flush every image at once (a qemu-nbd fsyncs its own), then finish them (metadata written, closed)
            for w in self.writers.values():
                w.send_flush()
            for w in self.writers.values():
                w.wait()
            self.stack.close()
            self.writers = {}
            self.close_sources()
            shipped = {(d, t): int(n) for d, t, n in msg["shipped"]}
            final = self.store.commit(self.set_name, manifest_from_dict(msg["manifest"], committed=False), self.staged, shipped)
            self.staged = []
            return {"ok": True, "manifest": manifest_to_dict(final)}
        if op == "probe":
            return {
                "ok": True,
                "images": [_probe(str(p)) for p in msg["paths"]],
                "exists": [_exists(str(p)) for p in msg.get("exists", ())],
            }
        if op == "abort":
            self.abort()
            return {"ok": True}
        if op == "verify":
            pts = self.store.points(msg["set"])
            if msg.get("point"):
                pts = [self.store.point(msg["set"], msg["point"])]
            wo = bool(msg.get("write_order"))
            results = [r for m in pts if (r := verify_settled(self.store, m, write_order=wo)) is not None]
            return {"ok": True, "results": results}
        if op == "failback-start":
            if self.staged:
                raise StateError("a point is being received")
            # The recovery takes the target's writer lock itself (to hold its point): this session lets it go and ends.
            self.store.close()
            self.done = True
            return _failback_start(self.store.root, msg)
        if op == "prune":
            pol = Policy(**msg["policy"])
            now = datetime.fromisoformat(msg["now"]) if msg.get("now") else datetime.now(UTC)
            return {"ok": True, "deleted": self.store.prune(msg["set"], pol, now)}
        raise UsageError(f"unknown request {op!r}")


def _failback_start(root: Path, msg: dict[str, Any]) -> dict[str, Any]:
    """Start the originals of a failback on this (the original) site's libvirt, over this target's final point."""
    from libvirt_cgrep.adapters import libvirt as lv
    from libvirt_cgrep.recovery.reverse import HomeStart, start_home

    start = HomeStart(**msg["start"]) if msg.get("start") else None
    uri = lv.default_uri()
    conn = lv.connect(uri)
    try:
        point, run, names = start_home(conn, uri, root, str(msg["set"]), start)
    finally:
        conn.close()
    return {"ok": True, "point": point, "run": run, "originals": list(names)}


def _seed_path(path: str) -> Path:
    p = Path(path)
    if not p.is_absolute() or not p.is_file():
        raise StateError(f"seed image {path!r} does not exist on the receiving side")
    return p


def _probe(path: str) -> dict[str, Any]:
    """What reverse protection needs to know about an old primary's image: exists, size, fold stamp."""
    from libvirt_cgrep.engine.sync import read_stamp

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


_READ_OPS = ("sets", "points", "verify")
#: A receiver waiting longer than this for the sender's next message gives up (discarding
#: anything staged), so a dead link never holds the target's lock for long.
IDLE_TIMEOUT_ENV = "CGREP_RECEIVER_IDLE_S"
DEFAULT_IDLE_S = 300


class IdleTimeout(Exception):
    """The sender said nothing for the idle timeout (raised from SIGALRM by :func:`on_idle_alarm`)."""


def on_idle_alarm(signum: int, frame: object) -> None:
    """SIGALRM handler of a receiving session: the link is idle past its timeout."""
    raise IdleTimeout()


class StreamIdleError(CgrepError):
    """The sender went silent (a dead link)."""


def serve(root: Path, inp: BinaryIO, out: BinaryIO, *, readonly: bool = False, local: bool = False) -> int:
    """Run one receiver session; returns 0 on a clean end, 1 after a reported failure.

    ``local``: the sender runs on this host (it started this receiver for a local target), so ``copyv`` is offered.
    """
    proto.write_header(out)
    proto.read_header(inp)
    try:
        store = Store.open(root, readonly=readonly)
    except CgrepError as exc:
        proto.send(out, proto.error_reply(exc))
        out.flush()
        return 1
    session = _Session(store, local=local and not readonly)
    try:
        proto.send(
            out,
            {
                "ok": True,
                "version": proto.VERSION,
                "target": str(root),
                "features": list(proto.LOCAL_FEATURES if session.local else proto.FEATURES),
            },
        )
        out.flush()
        idle = int(os.environ.get(IDLE_TIMEOUT_ENV, DEFAULT_IDLE_S))
        # Payloads go from the link's pipe straight into the image (or qemu-nbd's socket) when ``inp`` is an unbuffered pipe.
        splice_fd = inp.fileno() if isinstance(inp, io.RawIOBase) and nbd.spliceable(inp.fileno()) else None
        signal.signal(signal.SIGALRM, on_idle_alarm)
        while True:
            signal.alarm(idle)
            try:
                msg = proto.recv_message(inp)
                if msg is None or msg.get("op") == "bye":
                    return 0
                if readonly and msg.get("op") not in _READ_OPS:
                    raise UsageError(f"request {msg.get('op')!r} on a read-only session")
                if splice_fd is not None and msg.get("op") == "data" and not msg.get("z") and msg.get("n"):
                    session.splice_data(msg, splice_fd)
                    continue
                if splice_fd is not None and msg.get("op") == "datav":
                    session.splice_datav(msg, splice_fd)
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
