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
  session's last request.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, BinaryIO

from libvirt_cgrep import errors
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
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data), "zstd"
    raise UsageError(f"unknown compression {method!r}: expected zlib or zstd")


def decompress(data: bytes, method: str | None) -> bytes:
    if method is None:
        return data
    if method == "zlib":
        return zlib.decompress(data)
    if method == "zstd":
        import zstandard

        out: bytes = zstandard.ZstdDecompressor().decompress(data)
        return out
    raise StreamError(f"unknown compression {method!r}")
