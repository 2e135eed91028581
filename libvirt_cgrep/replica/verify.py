"""Re-checking what a target holds: a point's files, checksums and chains, and the write order of a cut.

Reads only, and takes no lock. The write-order check reads each image
(qcow2 with its backing chain, or raw) through ``qemu-img`` with ``-U``, so
it works while QEMU holds the images and never writes or locks them; the
verdict is :func:`libvirt_cgrep.core.writeorder.evaluate`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.writeorder import BLOCK, MAGIC, MAX_BS, Record, Verdict, decode, evaluate
from libvirt_cgrep.errors import CannotCheckError, CgrepError, NotFoundError
from libvirt_cgrep.replica.store import Store, sha256_file

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
