"""Fold stamp files beside the primary's base (format: :mod:`libvirt_cgrep.core.coverage`)."""

from __future__ import annotations

from pathlib import Path

from libvirt_cgrep.adapters.fs import save_file
from libvirt_cgrep.core.coverage import STAMP_SUFFIX, FoldStamp, stamp_from_bytes, stamp_to_bytes


def stamp_path(base: str) -> Path:
    """The stamp file of the base image ``base``."""
    return Path(f"{base}{STAMP_SUFFIX}")


def read_stamp(base: str) -> FoldStamp | None:
    """The base's stamp; None if it has none, an untrusted stamp if the file is unreadable."""
    try:
        data = stamp_path(base).read_bytes()
    except FileNotFoundError:
        return None
    return stamp_from_bytes(data)


def write_stamp(base: str, stamp: FoldStamp) -> None:
    """Record the stamp durably (before the fold it stands for)."""
    save_file(stamp_path(base), stamp_to_bytes(stamp), 0o600)
