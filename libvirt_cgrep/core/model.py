"""Frozen dataclasses passed between layers: what a guest's disks are, what a cut did.

Adapters build these from libvirt XML or QMP replies; the core and the CLI
only ever see these, never raw QMP dicts or libvirt objects.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Disk:
    """One disk of a guest as discovered.

    ``image`` is the active (top) image the guest writes to; ``chain`` is the
    backing chain, top first (``chain[0] == image``). ``node`` is QEMU's node
    name of the top, when known. ``reason`` says why an unsupported disk
    cannot be protected.
    """

    target: str
    image: str
    format: str
    chain: tuple[str, ...]
    node: str | None = None
    device: str | None = None
    supported: bool = True
    reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "image": self.image,
            "format": self.format,
            "chain": list(self.chain),
            "node": self.node,
            "supported": self.supported,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Guest:
    """One QEMU process: a libvirt domain (``kind='libvirt'``) or a bare QEMU (``'qmp'``)."""

    name: str
    kind: str
    address: str
    state: str
    disks: tuple[Disk, ...]
    uuid: str | None = None


@dataclass(frozen=True)
class SnapshotAction:
    """One ``blockdev-snapshot`` of a transaction: ``frozen`` stops changing, ``overlay`` becomes the top."""

    target: str
    node: str | None
    frozen: str
    overlay: str
    overlay_node: str
    format: str = "qcow2"


@dataclass(frozen=True)
class Transaction:
    """Everything cut in ONE QMP ``transaction``: exactly one per QEMU process."""

    guest: str
    actions: tuple[SnapshotAction, ...]


@dataclass(frozen=True)
class CutPlan:
    """A consistency point to take: one transaction per guest."""

    point_id: str
    transactions: tuple[Transaction, ...]


@dataclass(frozen=True)
class DiskCut:
    """What a cut did to one disk."""

    target: str
    frozen_image: str
    active_image: str


@dataclass(frozen=True)
class GuestCut:
    guest: str
    disks: tuple[DiskCut, ...]
    cut_ms: float


@dataclass(frozen=True)
class PointResult:
    """The outcome of ``point``: per guest its disks, the host-measured hold and the cut time."""

    point_id: str
    time_utc: str
    fence: str
    backend: str
    guests: tuple[GuestCut, ...]
    fence_ms: float | None
    cut_ms: float

    def as_dict(self) -> dict[str, object]:
        return {
            "point_id": self.point_id,
            "time_utc": self.time_utc,
            "fence": self.fence,
            "backend": self.backend,
            "fence_ms": None if self.fence_ms is None else round(self.fence_ms, 3),
            "cut_ms": round(self.cut_ms, 3),
            "domains": [{"name": g.guest, "cut_ms": round(g.cut_ms, 3)} for g in self.guests],
            "disks": [
                {"domain": g.guest, "target": d.target, "frozen_image": d.frozen_image, "active_image": d.active_image}
                for g in self.guests
                for d in g.disks
            ],
        }
