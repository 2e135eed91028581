"""Which extents of a frozen chain to ship. Pure.

Input: ``qemu-img map --output=json`` entries of the frozen image (depth 0 is
the frozen image itself, depth 1 its backing file, ...). A delta ships the
extents allocated in the layers above the newest point already on the
target (``depth < ship_depth``): data as bytes read from that layer's file at
the entry's host ``offset``; explicit zeroes as zero writes (they must mask
older data in the target's backing). A full seed ships every allocated data
extent and skips zeroes (a new base reads as zeroes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from libvirt_cgrep.errors import CommandError


@dataclass(frozen=True)
class Extent:
    kind: str  # "data" or "zero"
    start: int
    length: int
    depth: int
    offset: int | None  # host offset in the layer's file (data only)


def plan_extents(entries: Iterable[Mapping[str, Any]], ship_depth: int, *, full: bool) -> tuple[Extent, ...]:
    """The extents to ship, in guest offset order."""
    out: list[Extent] = []
    for e in entries:
        depth = int(e.get("depth", 0))
        if not e.get("present", True) or depth >= ship_depth:
            continue
        start, length = int(e["start"]), int(e["length"])
        if e.get("data"):
            if "offset" not in e:
                raise CommandError(f"extent at {start} has no host offset (compressed or not a plain file); cannot ship it")
            out.append(Extent("data", start, length, depth, int(e["offset"])))
        elif e.get("zero") and not full:
            out.append(Extent("zero", start, length, depth, None))
    return tuple(sorted(out, key=lambda x: x.start))


def data_bytes(extents: Iterable[Extent]) -> int:
    """Bytes of changed data (what a perfect shipper would send)."""
    return sum(x.length for x in extents if x.kind == "data")


def read_order(extents: Iterable[Extent]) -> list[Extent]:
    """The same extents in the order that reads each layer's file front to back: zeros first, then data by
    (layer, host offset). A guest's random writes land in its overlay in time order, so guest-offset order
    would read the file at random; the receiver takes extents in any order (they never overlap). Pure."""
    return sorted(extents, key=lambda x: (x.kind != "zero", x.depth, x.offset or 0, x.start))
