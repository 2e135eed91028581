"""A minimal NBD client (fixed newstyle, simple replies) and a qemu-nbd server for one image.

Enough to write extents into a qcow2 image through QEMU's own block layer:
``write``, ``write_zeroes`` (which in a qcow2 overlay makes zero clusters that
mask the backing file), ``flush``. :func:`serve` runs ``qemu-nbd`` on a unix
socket for one image and guarantees that, once it returns, the image was
flushed and closed by qemu-nbd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from libvirt_cgrep.adapters.proc import stop
from libvirt_cgrep.errors import NBDError

_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC = 0x3E889045565A9
_REQ_MAGIC = 0x25609513
_SIMPLE_REPLY = 0x67446698
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_INFO_EXPORT = 0
_CMD_WRITE, _CMD_DISC, _CMD_FLUSH, _CMD_WRITE_ZEROES = 1, 2, 3, 6
_FLAG_FIXED_NEWSTYLE, _FLAG_NO_ZEROES = 1, 2
MAX_REQUEST = 16 << 20


class NBDClient:
    """One connection to one export; requests are pipelined and their replies checked in batches."""

    def __init__(self, path: str, export: str = "", window: int = 16) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.window = window
        self.pending = 0
        self.handle = 0
        #: a write request was sent without all of its payload: the server waits for the rest, so no
        #: reply will come; close() then drops the connection instead of waiting (a wait would hang)
        self.broken = False
        self.size = self._handshake(export)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NBDError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self, export: str) -> int:
        if self._recv(8) != _NBDMAGIC or struct.unpack(">Q", self._recv(8))[0] != _IHAVEOPT:
            raise NBDError("not an NBD newstyle server")
        self._recv(2)  # handshake flags
        self.sock.sendall(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        size = -1
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != _REPLY_MAGIC:
                raise NBDError("bad NBD option reply")
            if rtype & 0x80000000:
                raise NBDError(f"NBD server refused the export: {payload[4:].decode(errors='replace') or hex(rtype)}")
            if rtype == _REP_INFO and struct.unpack(">H", payload[:2])[0] == _INFO_EXPORT:
                size = struct.unpack(">Q", payload[2:10])[0]
            elif rtype == _REP_ACK:
                return size

    def _send_header(self, cmd: int, offset: int, length: int) -> None:
        if self.broken:  # the server reads whatever comes next as the rest of the broken write's payload
            raise NBDError("the NBD connection broke mid-payload: no further request can be sent")
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", _REQ_MAGIC, 0, cmd, self.handle, offset, length))

    def _request(self, cmd: int, offset: int, length: int, data: bytes | memoryview = b"") -> None:
        self._send_header(cmd, offset, length)
        if data:
            self.sock.sendall(data)
        self.pending += 1
        if self.pending >= self.window:
            self.wait()

    def wait(self) -> None:
        """Collect every outstanding reply; raise on the first error (at once on a broken connection)."""
        if self.broken and self.pending:
            raise NBDError("the NBD connection broke mid-request: no reply can come")
        while self.pending:
            magic, error, _handle = struct.unpack(">IIQ", self._recv(16))
            self.pending -= 1
            if magic != _SIMPLE_REPLY:
                raise NBDError("bad NBD reply")
            if error:
                raise NBDError(f"NBD request failed: {os.strerror(error)}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for i in range(0, len(view), MAX_REQUEST):
            part = view[i : i + MAX_REQUEST]
            self._request(_CMD_WRITE, offset + i, len(part), part)

    def write_from(self, offset: int, fd: int, length: int) -> None:
        """Write ``length`` bytes read from the pipe ``fd`` at ``offset``: spliced pipe -> socket in the kernel.

        ``fd`` must be a pipe (see :func:`spliceable`) with no bytes of it buffered in this process.
        """
        if length > MAX_REQUEST:
            raise NBDError(f"request of {length} bytes exceeds {MAX_REQUEST}")
        self._send_header(_CMD_WRITE, offset, length)
        out = self.sock.fileno()
        done = 0
        try:
            while done < length:
                n = os.splice(fd, out, length - done)
                if n == 0:
                    raise NBDError("the link broke mid-payload")
                done += n
        except BaseException:
            self.broken = True
            raise
        self.pending += 1
        if self.pending >= self.window:
            self.wait()

    def copy_from(self, offset: int, fd: int, src_offset: int, length: int) -> None:
        """Write ``length`` bytes of the file ``fd`` from ``src_offset`` at ``offset`` (read here, then sent)."""
        for i in range(0, length, MAX_REQUEST):
            n = min(MAX_REQUEST, length - i)
            data = os.pread(fd, n, src_offset + i)
            if len(data) != n:
                raise NBDError(f"short read at {src_offset + i}: the source ends early")
            self._request(_CMD_WRITE, offset + i, n, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        for i in range(0, length, MAX_REQUEST):
            self._request(_CMD_WRITE_ZEROES, offset + i, min(MAX_REQUEST, length - i))

    def flush(self) -> None:
        self.send_flush()
        self.wait()

    def send_flush(self) -> None:
        """Ask for a flush without waiting for it (:meth:`wait` collects the answer)."""
        self._request(_CMD_FLUSH, 0, 0)

    def close(self) -> None:
        if not self.broken:
            with contextlib.suppress(OSError):
                self.wait()
                self.sock.sendall(struct.pack(">IHHQQI", _REQ_MAGIC, 0, _CMD_DISC, 0, 0, 0))
        self.sock.close()


def spliceable(fd: int) -> bool:
    """Whether :meth:`NBDClient.write_from` can read from ``fd`` (a pipe)."""
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode) and hasattr(os, "splice")
    except OSError:
        return False


@contextlib.contextmanager
def serve(image: Path, fmt: str = "qcow2", timeout: float = 30.0) -> Iterator[NBDClient]:
    """Export ``image`` with qemu-nbd on a private unix socket and yield a connected client.

    On normal exit the client flushes and disconnects, and qemu-nbd (which
    serves one client) exits after closing the image.
    """
    with tempfile.TemporaryDirectory(prefix="cgrep-nbd-") as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        proc = subprocess.Popen(
            ["qemu-nbd", "--socket", sock, "--format", fmt, "--cache", "writeback", "--discard", "unmap", str(image)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        client: NBDClient | None = None
        try:
            end = time.monotonic() + timeout
            while client is None:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    raise NBDError(f"qemu-nbd failed for {image}: {err.splitlines()[-1] if err else proc.returncode}")
                try:
                    client = NBDClient(sock)
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > end:
                        raise NBDError(f"qemu-nbd did not start for {image}") from None
                    time.sleep(0.01)
            yield client
            client.flush()  # refused on a connection broken mid-payload (see _request)
            client.close()
            client = None
            if proc.wait(timeout=timeout) != 0:
                raise NBDError(f"qemu-nbd exited with {proc.returncode} for {image}")
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.sock.close()
            stop(proc, timeout=5)
            if proc.stderr:
                proc.stderr.close()
