"""The replication stream (version 1): framing shared by the sender and ``virt-cgrep receive``.

Both sides first send the 12-byte header ``b"CGREPSTR" + u32 version``. Then
every message is ``u32 length`` + a JSON object + ``n`` payload bytes (``n``
from the object, default 0). Requests carry ``op``; replies carry ``ok`` and,
on failure, ``error`` (one line) and ``kind`` (our error class name), so the
sender re-raises the receiver's error with its exit code.

Payloads of ``data`` messages may be compressed (``z``: ``zlib`` or ``zstd``;
``raw``: the uncompressed length).

Optional features, named in the receiver's first reply (``features``) and
used by a sender only when named there (an older receiver names none):

- ``datav``: a ``datav`` message carries several extents of one disk,
  ``ext``: ``[[offset, length], ...]``, its payload their bytes in that order
  (uncompressed; ``n`` = the sum of the lengths). One header for many small
  extents.
- ``copyv`` (offered only by a receiver on the sender's own host, the one a
  sync starts for a local target): a ``copyv`` message names a file,
  ``path`` (absolute), and ``ext``: ``[[offset, file_offset, length], ...]``,
  and carries no payload: the receiver copies each range of that file into
  the disk at ``offset`` itself (``copy_file_range``: one copy in the
  kernel, as ``cp`` makes), in the background, in message order per disk.
  An ``applied`` request is answered once every copy sent before it is
  done; ``commit`` waits for them too.
- ``failback-start``: the last step of a ``failback`` whose ``TO`` is this
  receiver's target: ``{"op": "failback-start", "set": S, "start": {"point",
  "run", "xmls", "names"}}`` defines and starts the originals on this host's
  libvirt (the default URI) over that final point, as ``failback`` does for a
  local ``TO``; ``"start": null`` finishes such a start that was interrupted.
  The reply names the point, the run and the domains started. The receiver
  lets the target's lock go first (the recovery takes it), so this is the
  session's last request. Offered by ``virt-cgrep receive`` (what ssh runs),
  not by the lean local receiver a sync starts for a local target.

Every request and reply is a frozen dataclass below (``to_wire``/``from_wire``);
senders use :class:`libvirt_cgrep.replica.client.Client`, receivers
:func:`parse_request` and a table from request class to handler.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, Generic, TypeVar

import zstandard

from libvirt_cgrep import errors
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.errors import CgrepError, CommandError, UsageError

MAGIC = b"CGREPSTR"
VERSION = 1
_LEN = struct.Struct(">I")
MAX_JSON = 64 << 20
COMPRESSORS = ("zlib", "zstd")
#: the optional features this side's receiver offers
FEATURES = ("datav", "failback-start")
#: ... and offers to a sender on its own host
LOCAL_FEATURES = (*FEATURES, "copyv")


class StreamError(CommandError):
    """The link to the receiver broke or spoke an unknown protocol."""


def write_header(f: BinaryIO) -> None:
    f.write(MAGIC + _LEN.pack(VERSION))
    f.flush()


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream (works on unbuffered pipes too)."""
    first = f.read(n)
    if first is None or len(first) == n or not first:
        return first or b""
    buf = bytearray(first)
    while len(buf) < n:
        more = f.read(n - len(buf))
        if not more:
            break
        buf += more
    return bytes(buf)


def read_header(f: BinaryIO) -> int:
    head = read_exact(f, 12)
    if len(head) < 12:
        raise StreamError("the receiver closed the link before its header (is virt-cgrep installed on the far side?)")
    if head[:8] != MAGIC:
        raise StreamError("the far side is not a virt-cgrep receiver (bad stream header)")
    version: int = _LEN.unpack(head[8:])[0]
    if version != VERSION:
        raise StreamError(f"stream version {version} is not supported (this side speaks {VERSION})")
    return version


def send(f: BinaryIO, msg: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    if payload:
        msg = {**msg, "n": len(payload)}
    body = json.dumps(msg, separators=(",", ":")).encode()
    f.write(_LEN.pack(len(body)) + body)
    if payload:
        f.write(payload)


def recv_message(f: BinaryIO) -> dict[str, Any] | None:
    """The next message's JSON object (its ``n`` payload bytes are left in the stream), or None at a clean end."""
    head = read_exact(f, 4)
    if not head:
        return None
    if len(head) < 4:
        raise StreamError("the link broke mid-message")
    (n,) = _LEN.unpack(head)
    if n > MAX_JSON:
        raise StreamError("oversized message")
    body = read_exact(f, n)
    if len(body) < n:
        raise StreamError("the link broke mid-message")
    msg: dict[str, Any] = json.loads(body)
    return msg


def recv_payload(f: BinaryIO, msg: dict[str, Any]) -> bytes:
    size = int(msg.get("n", 0))
    payload = read_exact(f, size) if size else b""
    if len(payload) < size:
        raise StreamError("the link broke mid-payload")
    return payload


def recv(f: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """The next message, or None at a clean end of stream."""
    msg = recv_message(f)
    if msg is None:
        return None
    return msg, recv_payload(f, msg)


def extents(msg: dict[str, Any]) -> list[tuple[int, int]]:
    """The ``[[offset, length], ...]`` of a ``datav`` message, checked against its ``n``."""
    ext = [(int(o), int(n)) for o, n in msg.get("ext", ())]
    if any(o < 0 or n <= 0 for o, n in ext) or sum(n for _, n in ext) != int(msg.get("n", 0)):
        raise StreamError("a datav message whose extents do not add up to its payload")
    return ext


def copy_extents(msg: dict[str, Any]) -> list[tuple[int, int, int]]:
    """The ``[[offset, file_offset, length], ...]`` of a ``copyv`` message, checked."""
    ext = [(int(o), int(f), int(n)) for o, f, n in msg.get("ext", ())]
    if any(o < 0 or f < 0 or n <= 0 for o, f, n in ext) or msg.get("n"):
        raise StreamError("a copyv message with a bad extent or a payload")
    return ext


def error_reply(exc: CgrepError) -> dict[str, Any]:
    return {"ok": False, "error": str(exc), "kind": type(exc).__name__}


def raise_reply(reply: dict[str, Any]) -> None:
    """Re-raise a receiver's failure with its own error class (exit code)."""
    if reply.get("ok"):
        return
    cls = getattr(errors, str(reply.get("kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, CgrepError)):
        cls = StreamError
    raise cls(f"receiver: {reply.get('error', 'unknown error')}")


def compress(data: bytes, method: str | None) -> tuple[bytes, str | None]:
    if method is None:
        return data, None
    if method == "zlib":
        return zlib.compress(data, 1), "zlib"
    if method == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data), "zstd"
    raise UsageError(f"unknown compression {method!r}: expected zlib or zstd")


def decompress(data: bytes, method: str | None) -> bytes:
    if method is None:
        return data
    if method == "zlib":
        return zlib.decompress(data)
    if method == "zstd":
        out: bytes = zstandard.ZstdDecompressor().decompress(data)
        return out
    raise StreamError(f"unknown compression {method!r}")


# ------------------------------------------------------------------------------------------------ messages
#
# Every request and reply as a frozen dataclass. ``to_wire`` gives the JSON object sent (the keys and their
# order of protocol version 1, unchanged); ``from_wire`` parses a received one and validates names, ids and
# lengths (UsageError for a malformed request, StreamError for a malformed reply).


def _set_name(v: Any) -> str:
    return validate_name(str(v), "set name")


def _point_id(v: Any) -> str:
    pid = str(v)
    if not mf.valid_point_id(pid):
        raise UsageError(f"invalid point id {pid!r}")
    return pid


def _disk_key(msg: dict[str, Any]) -> tuple[str, str]:
    try:
        return str(msg["domain"]), str(msg["target"])
    except KeyError as exc:
        raise UsageError(f"a {msg.get('op')!r} message without {exc}") from exc


def _field(msg: dict[str, Any], key: str) -> Any:
    try:
        return msg[key]
    except KeyError as exc:
        raise UsageError(f"a {msg.get('op')!r} message without {key!r}") from exc


def _int(msg: dict[str, Any], key: str, *, minimum: int = 0) -> int:
    try:
        v = int(_field(msg, key))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"a {msg.get('op')!r} message with a bad {key!r}") from exc
    if v < minimum:
        raise UsageError(f"a {msg.get('op')!r} message with a bad {key!r}: {v}")
    return v


R = TypeVar("R")


@dataclass(frozen=True)
class Request(Generic[R]):
    """A request; ``R``: the type of its reply (``None`` for messages answered only on failure)."""

    OP: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def reply(d: dict[str, Any]) -> Any:
        """This request's reply, parsed."""
        return d


# ---- data path (no reply) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Data(Request[None]):
    """Bytes of one disk at ``offset``: the payload, compressed when ``z`` names a method."""

    OP: ClassVar[str] = "data"
    domain: str
    target: str
    offset: int
    z: str | None = None
    n: int = 0

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "data", "domain": self.domain, "target": self.target, "offset": self.offset}
        if self.z:
            msg["z"] = self.z
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Data:
        d, t = _disk_key(msg)
        z = msg.get("z")
        if z is not None and z not in COMPRESSORS:
            raise StreamError(f"unknown compression {z!r}")
        return cls(d, t, _int(msg, "offset"), z, int(msg.get("n", 0)))


@dataclass(frozen=True)
class DataV(Request[None]):
    """Several extents of one disk, their bytes the payload in order (feature ``datav``)."""

    OP: ClassVar[str] = "datav"
    domain: str
    target: str
    ext: tuple[tuple[int, int], ...]

    @property
    def n(self) -> int:
        return sum(n for _, n in self.ext)

    def to_wire(self) -> dict[str, Any]:
        return {"domain": self.domain, "target": self.target, "op": "datav", "ext": [[o, n] for o, n in self.ext], "n": self.n}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> DataV:
        d, t = _disk_key(msg)
        return cls(d, t, tuple(extents(msg)))


@dataclass(frozen=True)
class CopyV(Request[None]):
    """Ranges ``(offset, file_offset, length)`` of the file ``path`` on the receiver's host (feature ``copyv``)."""

    OP: ClassVar[str] = "copyv"
    domain: str
    target: str
    path: str
    ext: tuple[tuple[int, int, int], ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": "copyv",
            "domain": self.domain,
            "target": self.target,
            "path": self.path,
            "ext": [[o, f, n] for o, f, n in self.ext],
        }

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> CopyV:
        d, t = _disk_key(msg)
        return cls(d, t, str(msg.get("path", "")), tuple(copy_extents(msg)))


@dataclass(frozen=True)
class Zero(Request[None]):
    """``length`` bytes of one disk at ``offset`` read as zeros."""

    OP: ClassVar[str] = "zero"
    domain: str
    target: str
    offset: int
    length: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": "zero", "domain": self.domain, "target": self.target, "offset": self.offset, "length": self.length}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Zero:
        d, t = _disk_key(msg)
        return cls(d, t, _int(msg, "offset"), _int(msg, "length"))


@dataclass(frozen=True)
class Bye(Request[None]):
    """The session's clean end."""

    OP: ClassVar[str] = "bye"

    def to_wire(self) -> dict[str, Any]:
        return {"op": "bye"}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Bye:
        return cls()


# ---- replies ----------------------------------------------------------------------------------------------


def _reply_field(d: dict[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError as exc:
        raise StreamError(f"a reply without {key!r}") from exc


@dataclass(frozen=True)
class Hello:
    """The receiver's first reply."""

    version: int
    target: str
    #: the optional features offered (none named by a continuous-mode session, which says ``serve``)
    features: tuple[str, ...] = ()
    serve: bool = False

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"ok": True, "version": self.version, "target": self.target}
        if self.serve:
            msg["serve"] = True
        else:
            msg["features"] = list(self.features)
        return msg

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Hello:
        features = tuple(str(f) for f in d.get("features", ()))
        return cls(int(d.get("version", VERSION)), str(d.get("target", "")), features, bool(d.get("serve")))


@dataclass(frozen=True)
class Ok:
    """A bare ``{"ok": true}``."""

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Ok:
        return cls()


@dataclass(frozen=True)
class SetsReply:
    sets: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "sets": list(self.sets)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SetsReply:
        return cls(tuple(str(s) for s in _reply_field(d, "sets")))


@dataclass(frozen=True)
class PointsReply:
    """Each committed point's manifest (oldest first) and its listing row (``virt-cgrep points``)."""

    points: tuple[mf.Manifest, ...]
    listing: tuple[dict[str, Any], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "points": [mf.manifest_to_dict(m) for m in self.points], "listing": list(self.listing)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PointsReply:
        return cls(tuple(mf.manifest_from_dict(m) for m in _reply_field(d, "points")), tuple(d.get("listing", ())))


@dataclass(frozen=True)
class BeginReply:
    """The staged images: (domain, target, backing name or None)."""

    staged: tuple[tuple[str, str, str | None], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "staged": [list(s) for s in self.staged]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> BeginReply:
        return cls(tuple((str(a), str(b), None if c is None else str(c)) for a, b, c in d.get("staged", ())))


@dataclass(frozen=True)
class CommitReply:
    """The committed manifest (``commit_ms``: continuous mode only)."""

    manifest: mf.Manifest
    commit_ms: float | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"ok": True, "manifest": mf.manifest_to_dict(self.manifest)}
        if self.commit_ms is not None:
            msg["commit_ms"] = self.commit_ms
        return msg

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CommitReply:
        ms = d.get("commit_ms")
        return cls(mf.manifest_from_dict(_reply_field(d, "manifest")), None if ms is None else float(ms))


@dataclass(frozen=True)
class ProbeReply:
    """Per probed path: ``{"path", "exists", ["virtual_size", "stamp"]}``; per ``exists`` path: whether it exists."""

    images: tuple[dict[str, Any], ...]
    exists: tuple[bool, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "images": list(self.images), "exists": list(self.exists)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ProbeReply:
        return cls(tuple(_reply_field(d, "images")), tuple(bool(e) for e in d.get("exists", ())))


@dataclass(frozen=True)
class VerifyReply:
    """One result per point: ``{"point_id", "ok", "problems", ["write_order"]}``."""

    results: tuple[dict[str, Any], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "results": list(self.results)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> VerifyReply:
        return cls(tuple(_reply_field(d, "results")))


@dataclass(frozen=True)
class FailbackStartReply:
    point: str
    run: str
    originals: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "point": self.point, "run": self.run, "originals": list(self.originals)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> FailbackStartReply:
        return cls(str(_reply_field(d, "point")), str(_reply_field(d, "run")), tuple(str(n) for n in d.get("originals", ())))


@dataclass(frozen=True)
class PruneReply:
    deleted: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "deleted": list(self.deleted)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PruneReply:
        return cls(tuple(str(p) for p in _reply_field(d, "deleted")))


@dataclass(frozen=True)
class StartReply:
    """Continuous mode: the daemon's NBD socket and pid, each disk's export, the set's newest point."""

    socket: str
    pid: int
    exports: tuple[tuple[str, str, str], ...]
    parent: str | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "ok": True,
            "socket": self.socket,
            "pid": self.pid,
            "exports": [list(e) for e in self.exports],
            "parent": self.parent,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StartReply:
        exports = tuple((str(a), str(b), str(c)) for a, b, c in _reply_field(d, "exports"))
        parent = d.get("parent")
        return cls(str(_reply_field(d, "socket")), int(_reply_field(d, "pid")), exports, None if parent is None else str(parent))


@dataclass(frozen=True)
class PrepareReply:
    point_id: str
    prepare_ms: float

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "point_id": self.point_id, "prepare_ms": self.prepare_ms}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PrepareReply:
        return cls(str(_reply_field(d, "point_id")), float(_reply_field(d, "prepare_ms")))


@dataclass(frozen=True)
class CutReply:
    point_id: str
    add_ms: float
    preflush_ms: float
    cut_ms: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "ok": True,
            "point_id": self.point_id,
            "add_ms": self.add_ms,
            "preflush_ms": self.preflush_ms,
            "cut_ms": self.cut_ms,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CutReply:
        return cls(
            str(_reply_field(d, "point_id")),
            float(_reply_field(d, "add_ms")),
            float(_reply_field(d, "preflush_ms")),
            float(_reply_field(d, "cut_ms")),
        )


@dataclass(frozen=True)
class FinalReply:
    """Content digests of the staged final images, by ``domain/target``."""

    digests: dict[str, str]
    digest_ms: float

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "digests": dict(self.digests), "digest_ms": self.digest_ms}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> FinalReply:
        return cls({str(k): str(v) for k, v in _reply_field(d, "digests").items()}, float(d.get("digest_ms", 0.0)))


@dataclass(frozen=True)
class PingReply:
    ms: float

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "ms": self.ms}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PingReply:
        return cls(float(_reply_field(d, "ms")))


# ---- requests with a reply ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied(Request[Ok]):
    """Answered once every ``copyv`` sent before it is done."""

    OP: ClassVar[str] = "applied"

    def to_wire(self) -> dict[str, Any]:
        return {"op": "applied"}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Applied:
        return cls()

    @staticmethod
    def reply(d: dict[str, Any]) -> Ok:
        return Ok.from_wire(d)


@dataclass(frozen=True)
class Abort(Request[Ok]):
    """Discard the point being received."""

    OP: ClassVar[str] = "abort"

    def to_wire(self) -> dict[str, Any]:
        return {"op": "abort"}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Abort:
        return cls()

    @staticmethod
    def reply(d: dict[str, Any]) -> Ok:
        return Ok.from_wire(d)


@dataclass(frozen=True)
class Sets(Request[SetsReply]):
    OP: ClassVar[str] = "sets"

    def to_wire(self) -> dict[str, Any]:
        return {"op": "sets"}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Sets:
        return cls()

    @staticmethod
    def reply(d: dict[str, Any]) -> SetsReply:
        return SetsReply.from_wire(d)


@dataclass(frozen=True)
class Points(Request[PointsReply]):
    OP: ClassVar[str] = "points"
    set_name: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "points", "set": self.set_name}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Points:
        return cls(_set_name(_field(msg, "set")))

    @staticmethod
    def reply(d: dict[str, Any]) -> PointsReply:
        return PointsReply.from_wire(d)


@dataclass(frozen=True)
class Begin(Request[BeginReply]):
    """Stage a point: ``disks`` are (domain, target, virtual size, full?); ``seed``: (domain, target, image path)."""

    OP: ClassVar[str] = "begin"
    set_name: str
    point_id: str
    parent: str | None
    disks: tuple[tuple[str, str, int, bool], ...]
    seed: tuple[tuple[str, str, str], ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "op": "begin",
            "set": self.set_name,
            "point_id": self.point_id,
            "parent": self.parent,
            "disks": [list(d) for d in self.disks],
        }
        if self.seed is not None:
            msg["seed"] = [list(s) for s in self.seed]
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Begin:
        try:
            disks = tuple((str(d), str(t), int(s), bool(f)) for d, t, s, f in _field(msg, "disks"))
            seed = tuple((str(d), str(t), str(p)) for d, t, p in msg.get("seed", ()))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"a malformed begin request: {exc}") from exc
        if any(s < 0 for _, _, s, _ in disks):
            raise UsageError("a begin request with a negative disk size")
        parent = msg.get("parent")
        return cls(
            _set_name(_field(msg, "set")),
            _point_id(_field(msg, "point_id")),
            _point_id(parent) if parent else None,
            disks,
            seed if "seed" in msg else None,
        )

    @staticmethod
    def reply(d: dict[str, Any]) -> BeginReply:
        return BeginReply.from_wire(d)


@dataclass(frozen=True)
class Commit(Request[CommitReply]):
    """Commit the received point: its draft manifest, and the bytes shipped per disk (not in continuous mode)."""

    OP: ClassVar[str] = "commit"
    manifest: mf.Manifest
    shipped: tuple[tuple[str, str, int], ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "commit", "manifest": mf.manifest_to_dict(self.manifest)}
        if self.shipped is not None:
            msg["shipped"] = [list(s) for s in self.shipped]
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Commit:
        manifest = mf.manifest_from_dict(_field(msg, "manifest"), committed=False)
        try:
            shipped = tuple((str(d), str(t), int(n)) for d, t, n in msg["shipped"]) if "shipped" in msg else None
        except (TypeError, ValueError) as exc:
            raise UsageError(f"a malformed commit request: {exc}") from exc
        return cls(manifest, shipped)

    @staticmethod
    def reply(d: dict[str, Any]) -> CommitReply:
        return CommitReply.from_wire(d)


@dataclass(frozen=True)
class Probe(Request[ProbeReply]):
    """What reverse protection needs to know of an old primary's images (``paths``) and frozen layers (``exists``)."""

    OP: ClassVar[str] = "probe"
    paths: tuple[str, ...]
    exists: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"op": "probe", "paths": list(self.paths), "exists": list(self.exists)}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Probe:
        return cls(tuple(str(p) for p in _field(msg, "paths")), tuple(str(p) for p in msg.get("exists", ())))

    @staticmethod
    def reply(d: dict[str, Any]) -> ProbeReply:
        return ProbeReply.from_wire(d)


@dataclass(frozen=True)
class Verify(Request[VerifyReply]):
    """Re-check a set's points (or one point), optionally their write order."""

    OP: ClassVar[str] = "verify"
    set_name: str
    write_order: bool = False
    point: str | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "verify", "set": self.set_name, "write_order": self.write_order}
        if self.point:
            msg["point"] = self.point
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Verify:
        point = msg.get("point")
        return cls(_set_name(_field(msg, "set")), bool(msg.get("write_order")), str(point) if point else None)

    @staticmethod
    def reply(d: dict[str, Any]) -> VerifyReply:
        return VerifyReply.from_wire(d)


@dataclass(frozen=True)
class FailbackStart(Request[FailbackStartReply]):
    """Start a failback's originals on the receiver's host (feature ``failback-start``); ``start`` None: finish one."""

    OP: ClassVar[str] = "failback-start"
    set_name: str
    start: dict[str, Any] | None

    def to_wire(self) -> dict[str, Any]:
        return {"op": "failback-start", "set": self.set_name, "start": self.start}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> FailbackStart:
        start = msg.get("start")
        if start is not None and not isinstance(start, dict):
            raise UsageError("a failback-start request with a malformed start")
        return cls(_set_name(_field(msg, "set")), start or None)

    @staticmethod
    def reply(d: dict[str, Any]) -> FailbackStartReply:
        return FailbackStartReply.from_wire(d)


@dataclass(frozen=True)
class Prune(Request[PruneReply]):
    """Apply a retention policy at ``now`` (ISO 8601; the receiver's clock if None); ``set`` absent in continuous mode."""

    OP: ClassVar[str] = "prune"
    policy: Policy
    set_name: str | None = None
    now: str | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "prune"}
        if self.set_name is not None:
            msg["set"] = self.set_name
        p = self.policy
        msg["policy"] = {"keep_last": p.keep_last, "keep_hourly": p.keep_hourly, "keep_daily": p.keep_daily}
        if self.now is not None:
            msg["now"] = self.now
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Prune:
        pol = _field(msg, "policy")
        try:
            policy = Policy(**{str(k): int(v) for k, v in pol.items()})
        except (AttributeError, TypeError, ValueError) as exc:
            raise UsageError(f"a prune request with a malformed policy: {exc}") from exc
        now = msg.get("now")
        return cls(policy, _set_name(msg["set"]) if "set" in msg else None, str(now) if now else None)

    @staticmethod
    def reply(d: dict[str, Any]) -> PruneReply:
        return PruneReply.from_wire(d)


# ---- continuous mode (``receive --serve``) ----------------------------------------------------------------


@dataclass(frozen=True)
class Start(Request[StartReply]):
    """Serve a set's disks, (domain, target, size), over NBD; ``resume``: restart over that final point."""

    OP: ClassVar[str] = "start"
    set_name: str
    disks: tuple[tuple[str, str, int], ...]
    writethrough: bool = False
    resume: str | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "op": "start",
            "set": self.set_name,
            "disks": [list(d) for d in self.disks],
            "writethrough": self.writethrough,
        }
        if self.resume is not None:
            msg["resume"] = self.resume
        return msg

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Start:
        try:
            disks = tuple((str(d), str(t), int(s)) for d, t, s in _field(msg, "disks"))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"a malformed start request: {exc}") from exc
        resume = msg.get("resume")
        return cls(_set_name(_field(msg, "set")), disks, bool(msg.get("writethrough")), str(resume) if resume else None)

    @staticmethod
    def reply(d: dict[str, Any]) -> StartReply:
        return StartReply.from_wire(d)


@dataclass(frozen=True)
class Prepare(Request[PrepareReply]):
    OP: ClassVar[str] = "prepare"
    point_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "prepare", "point_id": self.point_id}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Prepare:
        return cls(_point_id(_field(msg, "point_id")))

    @staticmethod
    def reply(d: dict[str, Any]) -> PrepareReply:
        return PrepareReply.from_wire(d)


@dataclass(frozen=True)
class Cut(Request[CutReply]):
    OP: ClassVar[str] = "cut"
    point_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "cut", "point_id": self.point_id}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Cut:
        return cls(str(msg.get("point_id")))

    @staticmethod
    def reply(d: dict[str, Any]) -> CutReply:
        return CutReply.from_wire(d)


@dataclass(frozen=True)
class Final(Request[FinalReply]):
    OP: ClassVar[str] = "final"
    point_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "final", "point_id": self.point_id}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Final:
        return cls(_point_id(_field(msg, "point_id")))

    @staticmethod
    def reply(d: dict[str, Any]) -> FinalReply:
        return FinalReply.from_wire(d)


@dataclass(frozen=True)
class Ping(Request[PingReply]):
    OP: ClassVar[str] = "ping"
    timeout: float = 2.0

    def to_wire(self) -> dict[str, Any]:
        return {"op": "ping", "timeout": self.timeout}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Ping:
        try:
            return cls(float(msg.get("timeout", 2.0)))
        except (TypeError, ValueError) as exc:
            raise UsageError("a ping request with a bad timeout") from exc

    @staticmethod
    def reply(d: dict[str, Any]) -> PingReply:
        return PingReply.from_wire(d)


#: every request of ``virt-cgrep receive``, by its ``op``
REQUESTS: dict[str, Any] = {
    c.OP: c
    for c in (Data, DataV, CopyV, Zero, Bye, Applied, Abort, Sets, Points, Begin, Commit, Probe, Verify, FailbackStart, Prune)
}


#: every request of ``virt-cgrep receive --serve`` (continuous mode), by its ``op``
SERVE_REQUESTS: dict[str, Any] = {c.OP: c for c in (Start, Prepare, Cut, Commit, Final, Ping, Prune, Points, Bye)}


def parse_request(msg: dict[str, Any], requests: dict[str, Any] = REQUESTS) -> Request[Any]:
    """The request a received message carries; UsageError for an unknown op or a malformed message."""
    cls = requests.get(str(msg.get("op")))
    if cls is None:
        raise UsageError(f"unknown request {msg.get('op')!r}")
    req: Request[Any] = cls.from_wire(msg)
    return req
