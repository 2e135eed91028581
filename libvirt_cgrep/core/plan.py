"""The transaction planner. Pure: plain data in, plain data out.

Guarantees of a plan:

- exactly one :class:`Transaction` per guest (QEMU process), holding every
  selected disk of that guest, so the cut is consistent across its disks;
- overlays are named beside the frozen image, never overwrite an existing
  name of the chain, and their node names are unique and stable
  (``cgrep-<target>-<point id>``);
- a selection naming an unknown or unsupported disk is refused before
  anything changes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import PurePosixPath

from libvirt_cgrep.core.model import CutPlan, Disk, Guest, SnapshotAction, Transaction
from libvirt_cgrep.errors import UsageError

_SUFFIX = re.compile(r"\.cgrep-[0-9A-Za-z-]+$")


def point_id(now: datetime, salt: int = 0) -> str:
    """A sortable point id from a UTC time, e.g. ``20261125T101500.123456Z``; ``salt`` breaks ties."""
    ts = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return ts if not salt else f"{ts}-{salt}"


def _id_token(pid: str) -> str:
    return pid.replace(".", "").replace("T", "t").replace("Z", "z")


def overlay_path(frozen: str, pid: str) -> str:
    """Overlay file for ``frozen`` at point ``pid``: ``<dir>/<stem>.cgrep-<id>.qcow2``."""
    p = PurePosixPath(frozen)
    stem = _SUFFIX.sub("", p.stem)
    return str(p.with_name(f"{stem}.cgrep-{_id_token(pid)}.qcow2"))


def overlay_node(target: str, pid: str) -> str:
    """A QEMU node name (<= 31 chars, [A-Za-z][A-Za-z0-9_-]*) for the overlay."""
    return f"cg-{target}-{_id_token(pid)[-18:]}"[:31]


def select_disks(guest: Guest, targets: Sequence[str] | None = None) -> tuple[Disk, ...]:
    """The disks to cut: the selection (all must exist and be supported), or every supported disk."""
    by_target = {d.target: d for d in guest.disks}
    if targets:
        chosen = []
        for t in targets:
            d = by_target.get(t)
            if d is None:
                raise UsageError(f"{guest.name}: no disk {t!r} (disks: {', '.join(by_target) or 'none'})")
            if not d.supported:
                raise UsageError(f"{guest.name}: disk {t} cannot be protected: {d.reason}")
            chosen.append(d)
        return tuple(chosen)
    chosen = [d for d in guest.disks if d.supported]
    if not chosen:
        reasons = "; ".join(f"{d.target}: {d.reason}" for d in guest.disks) or "it has no disks"
        raise UsageError(f"{guest.name}: no disk can be protected ({reasons})")
    return tuple(chosen)


def plan_cut(pid: str, guests: Sequence[tuple[Guest, Sequence[Disk]]]) -> CutPlan:
    """One transaction per guest over its selected disks."""
    names = [g.name for g, _ in guests]
    if len(set(names)) != len(names):
        raise UsageError(f"a guest is named twice: {', '.join(names)}")
    txns = []
    for guest, disks in guests:
        actions = []
        for d in disks:
            ov = overlay_path(d.image, pid)
            if ov in d.chain:
                raise UsageError(f"{guest.name}: overlay name {ov} is already in the chain of {d.target}")
            actions.append(SnapshotAction(d.target, d.node, d.image, ov, overlay_node(d.target, pid), "qcow2"))
        txns.append(Transaction(guest.name, tuple(actions)))
    return CutPlan(pid, tuple(txns))
