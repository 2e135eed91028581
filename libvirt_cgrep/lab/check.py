"""The write-order checker: do these images form one consistent cut?

Reads only. Each image (qcow2 with its backing chain, or raw) is read through
``qemu-img`` with ``-U``, so it works while QEMU holds the images and never
writes or locks them. The verdict is :func:`libvirt_cgrep.core.writeorder.evaluate`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.core.writeorder import BLOCK, MAGIC, MAX_BS, Record, Verdict, decode, evaluate
from libvirt_cgrep.errors import CannotCheckError, CgrepError

_CHUNK = 4 << 20


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Data extents of a sparse file, BLOCK-aligned, as (start, end)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start - start % BLOCK, end
        pos = end


def scan_raw(path: Path) -> Iterator[Record]:
    """Every record (valid or not) found in a raw image, each read once."""
    with open(path, "rb") as f:
        fd = f.fileno()
        done = 0
        for start, end in _extents(fd, os.fstat(fd).st_size):
            off = max(start, done)
            while off < end:
                buf = os.pread(fd, min(_CHUNK, end - off), off)
                if not buf:
                    break
                i = 0
                while i < len(buf):
                    if buf[i : i + 8] != MAGIC:
                        i += BLOCK
                        continue
                    bs = int.from_bytes(buf[i + 48 : i + 52], "little")
                    bs = bs if BLOCK <= bs <= MAX_BS and bs % BLOCK == 0 else BLOCK
                    block = buf[i : i + bs] if i + bs <= len(buf) else os.pread(fd, bs, off + i)
                    rec = decode(block, off + i)
                    if rec is not None:
                        yield rec
                    i += bs if rec is not None and rec.valid else BLOCK
                off += i
            done = off


def check_images(images: Sequence[Path]) -> Verdict:
    """Judge the images of one cut together. Raises CannotCheckError if any is unreadable."""
    if not images:
        raise CannotCheckError("no images to check")
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="cgrep-check-") as tmp:
        for n, image in enumerate(images):
            try:
                top = qemu_img.chain(image)[0]
                if top.format == "raw" and top.backing is None:
                    records.extend(scan_raw(image))
                    continue
                raw = Path(tmp) / f"{n}.raw"
                qemu_img.convert_to_raw(image, top.format, raw)
                records.extend(scan_raw(raw))
                raw.unlink()
            except CgrepError as exc:
                raise CannotCheckError(f"cannot read {str(image)!r}: {exc}") from exc
            except OSError as exc:
                raise CannotCheckError(f"cannot read {str(image)!r}: {exc.strerror}") from exc
    return evaluate(records)
