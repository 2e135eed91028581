"""A writer of NEW qcow2 v3 images: data clusters appended as they arrive, metadata written once at the end.

A point's staged image is always a new file (a delta over the parent point's
image, or a full base), written once from start to end, then fsynced,
renamed and never written again. That needs none of a block layer's
machinery: :class:`Qcow2Writer` puts each cluster-aligned data extent at the
end of the file (``splice`` from the link's pipe straight into the file's
page cache, or ``pwrite``), remembers where, and :meth:`Qcow2Writer.finish`
writes the L2 tables, the L1 table, the refcount blocks and table, and the
header last. The result is an ordinary qcow2 v3 image (64 KiB clusters,
16-bit refcounts, the backing file and its format named in the header) that
``qemu-img check`` finds clean.

Guarantees:

- until :meth:`finish` returns, the file is not a valid image (no header):
  a crash or an abandoned session leaves a file that the store discards;
- requests that are not cluster-aligned (a source with smaller clusters)
  raise :class:`Unaligned` before anything of them is written, so the caller
  can finish the image and go on through QEMU (qemu-nbd);
- a cluster written twice keeps its first host cluster (no leak); a
  ``write_zeroes`` makes zero clusters that mask the backing file.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

from libvirt_cgrep.adapters.fs import copy_range
from libvirt_cgrep.errors import Qcow2Error

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
_L2_ENTRIES = CLUSTER // 8
_REFS_PER_BLOCK = CLUSTER * 8 // 16  # 16-bit refcounts
_MAGIC = 0x514649FB
_HEADER_LEN = 104
_EXT_BACKING_FORMAT = 0xE2792ACA
_COPIED = 1 << 63
_ZERO = 1  # L2 entry "reads as zeros" (v3)
_RESERVED = 2  # clusters 0 (header) and 1 (refcount table) come first


class Unaligned(Qcow2Error):
    """A request does not cover whole clusters: nothing of it was written."""


def virtual_size(path: Path | str) -> int:
    """The virtual size in a qcow2 image's header (Qcow2Error if it is not a qcow2 image)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise Qcow2Error(f"cannot read {path}: {exc.strerror}") from exc
    if len(head) < 32 or struct.unpack(">I", head[:4])[0] != _MAGIC:
        raise Qcow2Error(f"{path} is not a qcow2 image")
    return int(struct.unpack(">Q", head[24:32])[0])


def create_image(path: Path | str, size: int, backing: str | None = None, *, mode: int = 0o644) -> None:
    """A new empty image (an overlay if ``backing``, a qcow2 file named as given); never over an existing file.
    Not fsynced: the caller makes it durable (``fs.fsync_all`` for many at once).

    What ``qemu-img create -f qcow2 [-F qcow2 -b BACKING] PATH SIZE`` makes, without starting a process.
    """
    w = Qcow2Writer(Path(path), size, backing, exclusive=True, mode=mode)
    try:
        w.finish()
    except BaseException:
        w.close()
        Path(path).unlink(missing_ok=True)
        raise
    w.close()


class Qcow2Writer:
    """Writes one new image at ``path`` (created or truncated) of ``size`` bytes over ``backing`` (a qcow2 name)."""

    def __init__(self, path: Path, size: int, backing: str | None = None, *, exclusive: bool = False, mode: int = 0o600) -> None:
        self.path = path
        self.size = size
        self.backing = backing
        self.l1_size = -(-size // (CLUSTER * _L2_ENTRIES)) or 1
        self.l2: dict[int, array[int]] = {}  # L1 index -> L2 entries (host offset | flags), 0 = unallocated
        self.next_cluster = _RESERVED
        self.broken = False  # the NBDClient's meaning: a write broke off mid-payload
        self.finished = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
        self.fd = os.open(path, flags, mode)
        if exclusive:
            os.fchmod(self.fd, mode)  # not narrowed by the umask: QEMU's user must read an overlay libvirt relabels

    # ------------------------------------------------------------------ requests
    def _check(self, offset: int, length: int) -> None:
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise Qcow2Error(f"request {offset}+{length} is outside the disk ({self.size} bytes)")
        if offset % CLUSTER or (end % CLUSTER and end != self.size):
            raise Unaligned(f"request {offset}+{length} does not cover whole {CLUSTER}-byte clusters")

    def _host(self, index: int) -> int:
        """The host offset guest cluster ``index`` is stored at, or 0 (unallocated or a zero cluster)."""
        table = self.l2.get(index // _L2_ENTRIES)
        return (table[index % _L2_ENTRIES] if table is not None else 0) & ~(_COPIED | 0x1FF)

    def _set(self, index: int, value: int) -> None:
        table = self.l2.get(index // _L2_ENTRIES)
        if table is None:
            table = self.l2[index // _L2_ENTRIES] = array("Q", bytes(CLUSTER))
        table[index % _L2_ENTRIES] = value

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(guest offset, host offset, bytes) runs for ``offset..+length``, new clusters allocated at the end."""
        runs: list[tuple[int, int, int]] = []
        first, count = offset // CLUSTER, -(-length // CLUSTER)
        for i in range(first, first + count):
            host = self._host(i)
            if not host:
                host = self.next_cluster * CLUSTER
                self.next_cluster += 1
                self._set(i, host | _COPIED)
            guest = i * CLUSTER
            n = min(CLUSTER, offset + length - guest)
            if runs and runs[-1][0] + runs[-1][2] == guest and runs[-1][1] + runs[-1][2] == host:
                g, h, m = runs[-1]
                runs[-1] = (g, h, m + n)
            else:
                runs.append((guest, host, n))
        return runs

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        for guest, host, n in self._runs(offset, len(data)):
            part = view[guest - offset : guest - offset + n]
            done = 0
            while done < n:
                done += os.pwrite(self.fd, part[done:], host + done)

    def write_from(self, offset: int, fd: int, length: int) -> None:
        """``length`` bytes from the pipe ``fd`` into the image at ``offset``: spliced pipe -> file in the kernel."""
        self._check(offset, length)
        try:
            for _guest, host, n in self._runs(offset, length):
                done = 0
                while done < n:
                    got = os.splice(fd, self.fd, n - done, offset_dst=host + done)
                    if got == 0:
                        raise Qcow2Error("the link broke mid-payload")
                    done += got
        except BaseException:
            self.broken = True
            raise

    def copy_from(self, offset: int, fd: int, src_offset: int, length: int) -> None:
        """``length`` bytes of the file ``fd`` from ``src_offset`` into the image at ``offset``: one in-kernel copy."""
        self._check(offset, length)
        try:
            for guest, host, n in self._runs(offset, length):
                copy_range(fd, src_offset + guest - offset, self.fd, host, n)
        except OSError as exc:
            self.broken = True
            raise Qcow2Error(f"{self.path}: copy failed: {exc.strerror}") from exc

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for i in range(offset // CLUSTER, -(-(offset + length) // CLUSTER)):
            host = self._host(i)
            if host:  # already holds data: keep the cluster (no leak), zero its bytes
                n = min(CLUSTER, self.size - i * CLUSTER)
                os.pwrite(self.fd, bytes(n), host)
            else:
                self._set(i, _ZERO)

    def send_flush(self) -> None:
        """Nothing to do: :meth:`finish` writes the metadata and the store fsyncs the file."""

    def wait(self) -> None:
        if self.broken:
            raise Qcow2Error("a write broke off mid-payload: the image is incomplete")

    def flush(self) -> None:
        self.wait()

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """Write L2 tables, L1 table, refcounts and header; the image is valid (not yet fsynced) afterwards."""
        self.wait()
        if self.finished:
            return
        l1 = array("Q", bytes(8 * self.l1_size))
        for index in sorted(self.l2):
            host = self.next_cluster * CLUSTER
            self.next_cluster += 1
            table = array("Q", self.l2[index])
            table.byteswap()  # big-endian on disk
            os.pwrite(self.fd, table.tobytes(), host)
            l1[index] = host | _COPIED
        l1_offset = self.next_cluster * CLUSTER
        l1_clusters = -(-(8 * self.l1_size) // CLUSTER)
        self.next_cluster += l1_clusters
        l1.byteswap()
        os.pwrite(self.fd, l1.tobytes(), l1_offset)
        # refcount blocks at the end, covering every cluster including themselves
        blocks = 0
        while blocks * _REFS_PER_BLOCK < self.next_cluster + blocks:
            blocks += 1
        if blocks > CLUSTER // 8:
            raise Qcow2Error(f"{self.path}: image too large for one refcount table cluster")
        first_block = self.next_cluster
        total = self.next_cluster + blocks
        reftable = array("Q", bytes(CLUSTER))
        for b in range(blocks):
            refs = array("H", bytes(CLUSTER))
            for c in range(b * _REFS_PER_BLOCK, min(total, (b + 1) * _REFS_PER_BLOCK)):
                refs[c - b * _REFS_PER_BLOCK] = 1
            refs.byteswap()
            os.pwrite(self.fd, refs.tobytes(), (first_block + b) * CLUSTER)
            reftable[b] = (first_block + b) * CLUSTER
        self.next_cluster = total
        reftable.byteswap()
        os.pwrite(self.fd, reftable.tobytes(), CLUSTER)
        os.pwrite(self.fd, self._header(l1_offset), 0)
        os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, total * CLUSTER))
        self.finished = True

    def _header(self, l1_offset: int) -> bytes:
        exts = b""
        name = b""
        if self.backing:
            fmt = b"qcow2"
            exts += struct.pack(">II", _EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
            name = self.backing.encode()
        exts += struct.pack(">II", 0, 0)
        backing_offset = _HEADER_LEN + len(exts) if name else 0
        head = struct.pack(
            ">IIQIIQIIQQIIQQQQII",
            _MAGIC,
            3,
            backing_offset,
            len(name),
            CLUSTER_BITS,
            self.size,
            0,  # no encryption
            self.l1_size,
            l1_offset,
            CLUSTER,  # refcount table: cluster 1
            1,
            0,  # no snapshots
            0,
            0,  # incompatible features
            0,  # compatible features
            0,  # autoclear features
            4,  # refcount order: 16 bits
            _HEADER_LEN,
        )
        out = head + exts + name
        if len(out) > CLUSTER:
            raise Qcow2Error(f"{self.path}: backing file name too long")
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
