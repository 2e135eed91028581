"""Ship a frozen image's changed extents over a link, reading them straight from the qcow2 files.

Only the extents ``core.extents.plan_extents`` selects are read (at their host
offsets in the layer that holds them, from ``qemu-img map -U``): never the
whole disk. Frozen images no longer change, so reading them while QEMU keeps
them open as backing files is safe.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.core.extents import Extent, data_bytes, plan_extents, read_order
from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.client import Client

CHUNK = 4 << 20
#: at most this many extents share one ``datav`` message
BATCH_EXTENTS = 256
#: ... or one ``copyv`` message (no payload: only the message's size bounds it)
COPY_EXTENTS = 4096

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DiskShipment:
    domain: str
    target: str
    chain: tuple[str, ...]  # the frozen image first
    ship_depth: int
    full: bool
    virtual_size: int


def read_map(image: str) -> list[dict[str, object]]:
    """``qemu-img map --output=json`` of a frozen image (its whole chain): what :func:`plan_extents` selects from."""
    out: list[dict[str, object]] = qemu_img.map_json(image)
    return out


def extents_of(d: DiskShipment, image_map: list[dict[str, object]] | None = None) -> tuple[Extent, ...]:
    """The extents to ship for ``d`` (from ``image_map`` if its map was read already)."""
    return plan_extents(read_map(d.chain[0]) if image_map is None else image_map, d.ship_depth, full=d.full)


class RateLimit:
    """A simple pacing limiter: at most ``rate`` bytes per second on average."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def take(self, n: int) -> None:
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def ship_disk(
    link: Client,
    d: DiskShipment,
    extents: Sequence[Extent],
    *,
    compress: str | None,
    limiter: RateLimit,
    progress: Progress,
) -> int:
    """Send one disk's extents; returns the payload bytes put on the link.

    Uncompressed, the image's pages go to the link with ``sendfile``; to a
    receiver that offers ``datav``, up to :data:`BATCH_EXTENTS` extents (at
    most :data:`CHUNK` bytes) share one message header. A receiver on this
    host that offers ``copyv`` is sent only the file ranges, and copies them
    itself (one in-kernel copy: no pipe); the bytes "put on the link" are
    then those it was told to copy.
    """
    if compress is None and "copyv" in link.features:
        return _copy_disk(link, d, extents, limiter=limiter, progress=progress)
    fds: dict[int, int] = {}
    sent = 0
    total = data_bytes(extents)
    done = 0
    batched = compress is None and "datav" in link.features
    batch: list[tuple[int, int, int]] = []  # (disk offset, file offset, length) in batch_fd
    batch_fd, batch_n = -1, 0

    def flush() -> None:
        nonlocal sent, done, batch, batch_n
        if not batch:
            return
        n, batch_n = batch_n, 0
        limiter.take(n)
        link.datav_file(d.domain, d.target, batch_fd, batch)
        sent += n
        done += n
        progress(done, total)
        batch = []

    try:
        for x in read_order(extents):
            if x.kind == "zero":
                flush()
                link.zero(d.domain, d.target, x.start, x.length)
                continue
            fd = fds.get(x.depth)
            if fd is None:
                fd = fds[x.depth] = os.open(d.chain[x.depth], os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            assert x.offset is not None
            for i in range(0, x.length, CHUNK):
                n = min(CHUNK, x.length - i)
                if batched:
                    if fd != batch_fd or batch_n + n > CHUNK or len(batch) >= BATCH_EXTENTS:
                        flush()
                        batch_fd = fd
                    batch.append((x.start + i, x.offset + i, n))
                    batch_n += n
                    continue
                if compress is None:
                    # uncompressed: the kernel moves the image's pages into the link (sendfile)
                    limiter.take(n)
                    link.data_file(d.domain, d.target, x.start + i, (fd, x.offset + i, n))
                    sent += n
                    done += n
                    progress(done, total)
                    continue
                buf = os.pread(fd, n, x.offset + i)
                if len(buf) != n:
                    raise proto.StreamError(f"short read from {d.chain[x.depth]} at {x.offset + i}")
                payload, z = proto.compress(buf, compress)
                limiter.take(len(payload))
                link.data(d.domain, d.target, x.start + i, payload, z=z)
                sent += len(payload)
                done += n
                progress(done, total)
        flush()
    finally:
        for fd in fds.values():
            os.close(fd)
    return sent


def _copy_disk(link: Client, d: DiskShipment, extents: Sequence[Extent], *, limiter: RateLimit, progress: Progress) -> int:
    """:func:`ship_disk` to a receiver on this host: ``copyv`` messages, up to :data:`COPY_EXTENTS` each."""
    total = data_bytes(extents)
    done = 0
    batch: list[tuple[int, int, int]] = []
    batch_depth = -1

    def flush() -> None:
        nonlocal done, batch
        if batch:
            # flushed: the receiver copies while this side reads the next disk's map
            link.copyv(d.domain, d.target, os.path.abspath(d.chain[batch_depth]), batch)
            done += sum(n for _, _, n in batch)
            progress(done, total)
            batch = []

    for x in read_order(extents):
        if x.kind == "zero":
            flush()
            link.zero(d.domain, d.target, x.start, x.length)
            continue
        assert x.offset is not None
        if x.depth != batch_depth or len(batch) >= COPY_EXTENTS:
            flush()
            batch_depth = x.depth
        limiter.take(x.length)
        batch.append((x.start, x.offset, x.length))
    flush()
    return done


def terminal_progress(label: str) -> Progress:
    """A progress bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        return lambda done, total: None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{label} [{bar:<30}] {frac * 100:5.1f}% {done >> 20}/{total >> 20} MiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def json_progress(label: str) -> Progress:
    """Quiet machine-readable progress: one JSON line on stderr per ~10 %."""
    marks = [-1]

    def show(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if pct // 10 != marks[0]:
            marks[0] = pct // 10
            sys.stderr.write(json.dumps({"progress": label, "done": done, "total": total}) + "\n")
            sys.stderr.flush()

    return show
