"""The one interface every cut backend implements (libvirt domains, bare QEMU over QMP).

Contract of :meth:`Backend.cut`: it issues exactly ONE QMP ``transaction`` in
the guest's QEMU process covering every action of the plan's transaction.
Either every disk moved onto its overlay, or none did and the guest runs on
its old chain. Overlays are created by :meth:`prepare`, before and outside
the cut (and the hold), and removed again by :meth:`discard` after a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from libvirt_cgrep.core.model import Guest, GuestCut, Transaction


class Backend(Protocol):
    """One QEMU process we can cut."""

    #: ``libvirt`` or ``qmp``
    kind: str
    #: whether calls for different disks may run from several threads at once (e.g. one fold per disk)
    threadsafe: bool

    def discover(self) -> Guest:
        """The guest, its state and its disks (supported or not, with reasons)."""
        ...

    def prepare(self, txn: Transaction) -> None:
        """Create the overlays of ``txn`` (backing = the frozen image), outside any hold."""
        ...

    def cut(self, txn: Transaction) -> GuestCut:
        """ONE transaction moving every disk of ``txn`` onto its overlay (CutError on failure)."""
        ...

    def confirm(self, txn: Transaction) -> None:
        """After the cut and the hold: check the guest's definitions name the new overlays (error if not)."""
        ...

    def discard(self, txn: Transaction) -> None:
        """After a failed cut: remove what :meth:`prepare` made; the old chain stays active."""
        ...

    def pause(self) -> None:
        """Stop the guest's vCPUs and I/O (libvirt suspend / QMP ``stop``)."""
        ...

    def resume(self) -> None:
        """Resume the guest (libvirt resume / QMP ``cont``). Idempotent."""
        ...

    def guardian_spec(self) -> Sequence[str]:
        """Arguments telling a guardian process how to resume this guest on its own."""
        ...

    def require_running(self) -> None:
        """StateError unless the guest is running."""
        ...

    def chain(self, target: str) -> tuple[str, ...]:
        """The disk's live backing chain, active image first."""
        ...

    def fold(self, target: str, base: str, top: str) -> None:
        """Merge the non-active ``top`` (and anything between) into ``base``; the guest keeps running."""
        ...

    def record(self) -> tuple[str, str | None, str]:
        """(name, uuid, definition) of the guest for a manifest (definition: domain XML, or '' for bare QEMU)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
