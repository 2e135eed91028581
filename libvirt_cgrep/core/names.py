"""Strict parsing of operator input: names, sizes, counts. Pure functions.

Every parser either returns a clean value or raises :class:`UsageError` with
one line that names the bad value; nothing is ever partially accepted.
"""

from __future__ import annotations

import re

from libvirt_cgrep.errors import UsageError

#: Names we create or act on: they become file names and libvirt names, so
#: they never hold '/', '..', spaces or shell metacharacters.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}")
_TARGET_RE = re.compile(r"(?:vd|sd|hd|xvd)[a-z]{1,2}")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)(?:i?B)?", re.IGNORECASE)


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as a domain, group or file name."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid {what} {name!r}: use 1-63 characters from A-Z a-z 0-9 _ . + -, "
            "starting with a letter or digit, without '..'"
        )
    return name


def validate_target(target: str) -> str:
    """Return a disk target name such as ``vda`` or raise UsageError."""
    if not _TARGET_RE.fullmatch(target):
        raise UsageError(f"invalid disk target {target!r}: expected a name like vda or sdb")
    return target


def parse_targets(spec: str) -> tuple[str, ...]:
    """Parse ``vda,vdb`` into a tuple of unique targets, in the given order."""
    targets = tuple(t.strip() for t in spec.split(","))
    for t in targets:
        validate_target(t)
    if len(set(targets)) != len(targets):
        raise UsageError(f"disk target listed twice in {spec!r}")
    return targets


def parse_size(text: str, *, minimum: int = 1 << 20, maximum: int = 1 << 40, align: int = 1 << 20) -> int:
    """Parse a size like ``64M``, ``1G``, ``512KiB`` or ``1048576`` (bytes, binary units)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"invalid size {text!r}: expected a number with an optional unit K, M, G or T")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if not minimum <= value <= maximum:
        raise UsageError(f"size {text!r} out of range: must be between {format_size(minimum)} and {format_size(maximum)}")
    if value % align:
        raise UsageError(f"size {text!r} must be a multiple of {format_size(align)}")
    return value


def parse_count(text: str | int, what: str, lo: int, hi: int) -> int:
    """Parse an integer in ``[lo, hi]``."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"invalid {what} {text!r}: expected a whole number") from None
    if not lo <= value <= hi:
        raise UsageError(f"{what} {value} out of range: must be between {lo} and {hi}")
    return value


def format_size(n: int) -> str:
    """Format bytes with the largest binary unit that divides it exactly, else one decimal."""
    for unit in ("T", "G", "M", "K"):
        size = _UNITS[unit]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    for unit in ("T", "G", "M", "K"):
        size = _UNITS[unit]
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def disk_target(index: int) -> str:
    """The virtio target name for data disk ``index`` (0 -> vda, 25 -> vdz, 26 -> vdaa)."""
    letters = ""
    i = index
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i = i // 26 - 1
        if i < 0:
            return "vd" + letters
