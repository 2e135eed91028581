"""qemu-img as an adapter: image facts as frozen dataclasses.

Reads always pass ``-U`` (force-share): they work while QEMU holds the image
and never take its lock. Nothing here writes to an existing image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from libvirt_cgrep.adapters.proc import run
from libvirt_cgrep.errors import CommandError, NotFoundError


@dataclass(frozen=True)
class ImageInfo:
    """One image of a chain (``chain[0]`` is the image asked about)."""

    path: str
    format: str
    virtual_size: int
    backing: str | None


def chain(path: Path) -> tuple[ImageInfo, ...]:
    """The backing chain of ``path``, top first."""
    if not path.exists():
        raise NotFoundError(f"image {str(path)!r} does not exist")
    out = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)], timeout=60)
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise CommandError(f"qemu-img info gave unreadable output for {str(path)!r}") from exc
    if isinstance(data, dict):
        data = [data]
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


def convert_to_raw(src: Path, fmt: str, dest: Path) -> None:
    """Copy the guest-visible content of ``src`` (chain included) into a sparse raw file."""
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", "-S", "4k", str(src), str(dest)], timeout=600)
