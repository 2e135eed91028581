"""qemu-img as an adapter: image facts as frozen dataclasses.

Reads always pass ``-U`` (force-share): they work while QEMU holds the image
and never take its lock. Nothing here writes to an existing image.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters.proc import run
from libvirt_cgrep.errors import CommandError, NotFoundError


@dataclass(frozen=True)
class ImageInfo:
    """One image of a chain (``chain[0]`` is the image asked about)."""

    path: str
    format: str
    virtual_size: int
    backing: str | None


def _json(argv: list[str], path: Path, timeout: float) -> Any:
    if not path.exists():
        raise NotFoundError(f"image {str(path)!r} does not exist")
    out = run(argv, timeout=timeout)
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{' '.join(argv[:2])} gave unreadable output for {str(path)!r}") from exc


def _info(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain`` of ``path``, top first (its format probed unless ``fmt``)."""
    argv = ["qemu-img", "info", "-U", "--backing-chain", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    data = _json(argv, path, 60)
    return [data] if isinstance(data, dict) else list(data)


def chain(path: Path) -> tuple[ImageInfo, ...]:
    """The backing chain of ``path``, top first."""
    data = _info(path)
    return tuple(
        ImageInfo(
            path=d["filename"],
            format=d["format"],
            virtual_size=int(d["virtual-size"]),
            backing=d.get("full-backing-filename") or d.get("backing-filename"),
        )
        for d in data
    )


def create_qcow2(path: Path, size: int) -> None:
    """Create an empty qcow2 image of ``size`` bytes (fails if it exists)."""
    if path.exists():
        raise CommandError(f"refusing to overwrite existing image {str(path)!r}")
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], timeout=60)


# --- recovery and continuous ---
def create_overlay(path: Path, base: str) -> None:
    """Create a new qcow2 overlay at ``path`` over the qcow2 image ``base`` (``base`` is only read, never written)."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(path)], timeout=60)


# --- end recovery and continuous ---


def convert_to_raw(src: Path, fmt: str, dest: Path) -> None:
    """Copy the guest-visible content of ``src`` (chain included) into a sparse raw file."""
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", "-S", "4k", str(src), str(dest)], timeout=600)


#: The digest's grid: the virtual disk is hashed in chunks of this size (the last one shorter).
DIGEST_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(DIGEST_CHUNK)
_ZERO_VIEW = memoryview(_ZERO_CHUNK)
_DIGEST_TAG = b"libvirt-cgrep content digest v1\0"


def _extents(path: Path, fmt: str, size: int) -> list[tuple[int, int, int, int]]:
    """``qemu-img map`` of ``path`` as contiguous (start, end, depth, host offset) extents; depth -1: reads as zeros."""
    raw = _json(["qemu-img", "map", "-U", "--output=json", "-f", fmt, str(path)], path, 600)
    out: list[tuple[int, int, int, int]] = []
    pos = 0
    for e in raw:
        start, end = int(e["start"]), int(e["start"]) + int(e["length"])
        if start != pos:
            raise CommandError(f"qemu-img map of {str(path)!r} is not contiguous at {pos}")
        pos = end
        if end == start:  # an empty image maps as one empty extent
            continue
        if e.get("zero"):
            if out and out[-1][2] == -1:
                out[-1] = (out[-1][0], end, -1, 0)
            else:
                out.append((start, end, -1, 0))
        elif "offset" in e:
            out.append((start, end, int(e["depth"]), int(e["offset"])))
        else:  # not known to read as zeros, and nowhere to read it from
            raise CommandError(
                f"{str(path)!r} has data at {start} with no host offset (compressed or encrypted clusters): cannot digest it"
            )
    if pos != size:
        raise CommandError(f"qemu-img map of {str(path)!r} ends at {pos}, not at its virtual size {size}")
    return out


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; bytes past the file's end stay zero (as QEMU reads them)."""
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            return
        buf, offset = buf[n:], offset + n


def content_digest(path: Path, fmt: str = "qcow2") -> str:
    """Hex SHA-256 digest of the guest-visible content of ``path`` (read with its whole backing chain).

    Equal digests mean equal virtual size and equal bytes, however each side
    stores them: one image or a chain of overlays, raw or qcow2, zeros written,
    zero-flagged or unallocated. Ranges ``qemu-img map`` reports as zero are not
    read; nothing is written. The chain must not change while it is read. Only
    raw and uncompressed, unencrypted qcow2 layers without an external data file
    can be read: others raise CommandError (no fallback through a raw copy).
    """
    path = path.absolute()  # the chain's file names are then absolute (backing names relative to their overlay)
    layers = _info(path, fmt)
    for layer in layers:
        spec = (layer.get("format-specific") or {}).get("data") or {}
        if layer.get("format") not in ("qcow2", "raw") or layer.get("encrypted") or spec.get("data-file"):
            raise CommandError(
                f"cannot digest {str(path)!r}: its layer {layer.get('filename')!r} is not a plain raw or qcow2 image"
            )
    size = int(layers[0]["virtual-size"])
    extents = _extents(path, fmt, size)
    if any(depth >= len(layers) for _, _, depth, _ in extents):
        raise CommandError(f"qemu-img map of {str(path)!r} reads below the chain qemu-img info reported")
    outer = hashlib.sha256(_DIGEST_TAG + size.to_bytes(8, "big"))
    fds: dict[int, int] = {}
    zero_run = 0  # bytes of consecutive all-zero chunks not yet fed: a run is fed once, as its length
    buf = bytearray(DIGEST_CHUNK)
    i = pos = 0  # extents[i] is the first extent ending after pos; pos is on the chunk grid
    try:
        while pos < size:
            while extents[i][1] <= pos:
                i += 1
            start, end, depth, _ = extents[i]
            if depth == -1 and (end == size or end - pos >= DIGEST_CHUNK):
                # Whole chunks inside one zero extent: counted, not read.
                step = size - pos if end == size else (end - pos) // DIGEST_CHUNK * DIGEST_CHUNK
                zero_run += step
                pos += step
                continue
            n = min(DIGEST_CHUNK, size - pos)
            chunk = memoryview(buf)[:n]
            chunk[:] = _ZERO_VIEW[:n]
            j = i
            while j < len(extents) and extents[j][0] < pos + n:
                start, end, depth, host = extents[j]
                if depth != -1:
                    lo, hi = max(start, pos), min(end, pos + n)
                    if depth not in fds:
                        try:
                            fds[depth] = os.open(layers[depth]["filename"], os.O_RDONLY | os.O_CLOEXEC)
                        except OSError as exc:
                            raise CommandError(f"cannot read {layers[depth]['filename']!r}: {exc.strerror}") from exc
                    try:
                        _pread_into(fds[depth], chunk[lo - pos : hi - pos], host + lo - start)
                    except OSError as exc:
                        raise CommandError(f"cannot read {layers[depth]['filename']!r}: {exc.strerror}") from exc
                j += 1
            # bytearray == bytes is a memcmp (a memoryview compares item by item: 70x slower).
            if (buf if n == DIGEST_CHUNK else buf[:n]) == _ZERO_CHUNK[:n]:
                zero_run += n
            else:
                if zero_run:
                    outer.update(b"Z" + zero_run.to_bytes(8, "big"))
                    zero_run = 0
                outer.update(b"D" + hashlib.sha256(chunk).digest())
            pos += n
    finally:
        for fd in fds.values():
            os.close(fd)
    if zero_run:
        outer.update(b"Z" + zero_run.to_bytes(8, "big"))
    return outer.hexdigest()


# --------------------------------------------------------------------------- writes of our own images
# (staged, live or point images of a target, never an image QEMU holds)


def map_json(image: str) -> list[dict[str, Any]]:
    """``qemu-img map -U --output=json`` of a qcow2 image (its whole chain), as qemu-img prints it."""
    out: list[dict[str, Any]] = json.loads(run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", image], timeout=600))
    return out


def backing_name(path: Path) -> str | None:
    """The backing file name recorded in ``path``'s header (as written, not resolved)."""
    name = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)], timeout=60)).get("backing-filename")
    return None if name is None else str(name)


def create_qcow2_over(path: Path, size: int, backing: str | None = None) -> None:
    """A new qcow2 image of ``size`` bytes over the qcow2 ``backing`` (not opened: ``-u``), or alone."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-u", "-F", "qcow2", "-b", backing]
    run([*argv, str(path), str(size)], timeout=60)


def convert_qcow2(src: Path, dest: Path) -> None:
    """Copy ``src``'s guest-visible content (its chain flattened) into a new qcow2 image ``dest``."""
    run(["qemu-img", "convert", "-U", "-q", "-f", "qcow2", "-O", "qcow2", str(src), str(dest)], timeout=3600)


def rebase_unsafe(path: Path, backing: str) -> None:
    """Rewrite ``path``'s backing name to the qcow2 ``backing`` (the content is not compared: ``-u``)."""
    run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(path)], timeout=60)


def commit_into_backing(path: Path) -> None:
    """Commit ``path``'s clusters into its backing image, leaving ``path`` as it was (``-d``)."""
    run(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", str(path)], timeout=3600)
