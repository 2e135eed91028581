"""What a cycle must ship of each disk: the primary's base, the fold stamp, the coverage rule. Pure.

A fold stamp is recorded beside the primary's base before every fold (the
file itself is read and written by :mod:`libvirt_cgrep.adapters.stamps`): the
base holds nothing newer than the point it names. :func:`coverage` ships a
delta only when that stamp proves the target's newest point covers the base.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from libvirt_cgrep.core import manifest as mf

_OURS = re.compile(r"\.cgrep-[0-9a-z-]+\.qcow2$")
#: appended to the base's path: the stamp file beside it
STAMP_SUFFIX = ".cgrep-fold.json"


def primary_base(chain: Sequence[str]) -> str:
    """The image overlays fold into: the newest layer of the chain that is not one of our overlays."""
    for image in chain:
        if not _OURS.search(PurePosixPath(image).name):
            return image
    return chain[-1]


@dataclass(frozen=True)
class FoldStamp:
    """Recorded beside the primary's base before every fold: the base holds nothing newer than this point."""

    target: str
    set_name: str
    point_id: str


#: what an unreadable stamp parses as: never trusted for a delta
UNREADABLE_STAMP = FoldStamp("?", "?", "?")


def stamp_to_bytes(stamp: FoldStamp) -> bytes:
    """The stamp file's content."""
    data = {"target": stamp.target, "set": stamp.set_name, "point_id": stamp.point_id}
    return json.dumps(data).encode() + b"\n"


def stamp_from_bytes(data: bytes) -> FoldStamp:
    """Parse a stamp file's content; :data:`UNREADABLE_STAMP` if it is malformed."""
    try:
        d = json.loads(data)
        return FoldStamp(str(d["target"]), str(d["set"]), str(d["point_id"]))
    except (ValueError, KeyError, TypeError):
        return UNREADABLE_STAMP


def coverage(
    chain: Sequence[str],
    rec: mf.DiskRecord | None,
    *,
    newest_id: str | None = None,
    stamp: FoldStamp | None = None,
    target: str = "",
    set_name: str = "",
) -> tuple[int, bool, str, str | None]:
    """(ship depth, full?, primary base, resync reason) for a frozen chain (frozen image first).

    A delta is only correct if the primary's base holds nothing the target's
    newest point lacks: the fold stamp must name this target and set, and a
    point no newer than the newest one there (else: full resync).
    """
    if rec is None:
        return len(chain), True, primary_base(chain), "first point of this disk"
    if not rec.primary_base:
        return len(chain), True, primary_base(chain), "the newest point was cut in continuous mode"
    if rec.primary_base not in chain:
        return len(chain), True, primary_base(chain), f"chain broken: {rec.primary_base} is no longer in it"
    if stamp is not None and (
        stamp.target != target or stamp.set_name != set_name or newest_id is None or stamp.point_id > newest_id
    ):
        return (
            len(chain),
            True,
            primary_base(chain),
            f"the primary's base was folded after point {stamp.point_id} of {stamp.target} (set {stamp.set_name}), "
            "which this target does not hold",
        )
    if rec.source_image in chain:
        return chain.index(rec.source_image), False, rec.primary_base, None
    return chain.index(rec.primary_base), False, rec.primary_base, None
