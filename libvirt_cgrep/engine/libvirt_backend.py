"""Cut a libvirt domain through libvirt only.

The chain changes only through ``virDomainSnapshotCreateXML(DISK_ONLY | ATOMIC
| NO_METADATA | REUSE_EXT)``, which libvirt 9.0 issues as ONE QMP
``transaction`` of ``blockdev-snapshot`` actions, and after which both the
live and the persistent definitions name the new overlays. Overlays are
created beforehand with ``qemu-img create -b FROZEN -F qcow2`` (outside any
hold). Never a chain change through the monitor passthrough.

With ``preown`` (opt-in) each overlay is handed to QEMU's user and group
(``user``/``group`` of ``qemu.conf``, else ``libvirt-qemu``) when it is
created, and the snapshot XML tells libvirt's DAC driver not to relabel it
(``<seclabel model='dac' relabel='no'/>``): libvirt then skips the ``chown``
of the new image. It is off by default: measured on libvirt 9.0 it does not
shorten the hold (libvirt still forks for its label transaction and still
moves the remembered-owner attributes; see docs/operations-hold.md). The
overlays keep that owner after the domain stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters import qcow2
from libvirt_cgrep.adapters.fs import fsync_all, fsync_dir
from libvirt_cgrep.adapters.libvirt import SNAPSHOT_FLAGS, qemu_owner
from libvirt_cgrep.core.domxml import disks_of, snapshot_xml
from libvirt_cgrep.core.model import DiskCut, Guest, GuestCut, Transaction
from libvirt_cgrep.engine.fold import fold
from libvirt_cgrep.errors import CgrepError, CutError, LibvirtError, StateError

# TRANSITIONAL (issue #18): disks_of, qemu_owner and SNAPSHOT_FLAGS stay importable from here only until the
# callers outside engine/ (server/live.py, bench/, tests/) import their homes (core.domxml.disks_of,
# adapters.libvirt.qemu_owner, adapters.libvirt.SNAPSHOT_FLAGS); then drop them from __all__ and the imports.
__all__ = ["SNAPSHOT_FLAGS", "LibvirtBackend", "disks_of", "qemu_owner"]


class LibvirtBackend:
    """One libvirt domain, reached over a libvirt connection.

    ``preown``: overlays are created owned by QEMU's user and the snapshot asks
    libvirt not to relabel them. Off by default (no measurable gain on libvirt
    9.0, see docs/operations-hold.md). It falls back to libvirt's relabeling
    when QEMU's user cannot be resolved or the overlay cannot be chowned.
    """

    kind = "libvirt"
    threadsafe = True  # libvirt connections serve concurrent calls

    def __init__(self, conn: lv.Connection, name: str, uri: str, *, preown: bool = False) -> None:
        self.conn = conn
        self.name = name
        self.uri = uri
        self._snapshot_xml = ""
        self.dom = lv.lookup(conn, name)
        self.owner = lv.qemu_owner() if preown else None
        self.preown = self.owner is not None

    def discover(self) -> Guest:
        xml = lv.live_xml(self.dom) if lv.is_active(self.dom) else lv.persistent_xml(self.dom)
        return Guest(
            name=self.name,
            kind=self.kind,
            address=self.uri,
            state=lv.state(self.dom),
            disks=disks_of(xml),
            uuid=lv.uuid_of(self.dom),
        )

    def prepare(self, txn: Transaction) -> None:
        # The snapshot XML is built here, outside any hold (reading the live XML costs ms per disk).
        all_targets = [d.target for d in disks_of(lv.live_xml(self.dom))]
        self._snapshot_xml = snapshot_xml(txn, all_targets, relabel=not self.preown)
        made: list[str] = []
        try:
            for a in txn.actions:
                if os.path.exists(a.overlay):
                    raise CutError(f"{self.name}: overlay {a.overlay} already exists")
                # in-process (no qemu-img per disk): the cut starts sooner and no process competes with the guest
                qcow2.create_image(a.overlay, qcow2.virtual_size(a.frozen), a.frozen)
                made.append(a.overlay)
                if self.preown and self.owner is not None:
                    try:
                        os.chown(a.overlay, *self.owner)
                    except PermissionError:
                        # Not allowed to give files away (not root): let libvirt relabel, as without preown.
                        self.preown = False
            # durable before the cut (the guest's first flush after it must not pay for writing out new files),
            # all at once: one journal commit for every overlay, not one per disk for the guest to wait behind
            fsync_all(made)
            for d in sorted({os.path.dirname(p) for p in made}):
                fsync_dir(Path(d))  # the new files' directory entries too
        except (CgrepError, OSError) as exc:
            for p in made:
                Path(p).unlink(missing_ok=True)
            raise CutError(f"{self.name}: cannot create overlays: {exc}") from exc

    def cut(self, txn: Transaction) -> GuestCut:
        """The atomic snapshot call only (inside the hold); :meth:`confirm` checks the definitions afterwards."""
        xml = self._snapshot_xml
        t0 = time.monotonic()
        try:
            lv.snapshot(self.dom, xml)
        except CgrepError as exc:
            raise CutError(f"{self.name}: the atomic snapshot failed, disks stay on their old chain: {exc}") from exc
        cut_ms = (time.monotonic() - t0) * 1000.0
        return GuestCut(self.name, tuple(DiskCut(a.target, a.frozen, a.overlay) for a in txn.actions), cut_ms)

    def confirm(self, txn: Transaction) -> None:
        """After the hold: the live and the persistent definitions both name every new overlay.

        Reading both XMLs costs ms per disk, so it runs after the resume; a
        mismatch fails the point (CutError if the live chain, LibvirtError if
        only the persistent definition disagrees).
        """
        live = {d.target: d for d in disks_of(lv.live_xml(self.dom))}
        persistent = {d.target: d for d in disks_of(lv.persistent_xml(self.dom))}
        for a in txn.actions:
            now = live.get(a.target)
            if now is None or now.image != a.overlay:
                raise CutError(f"{self.name}: after the snapshot, {a.target} is not on {a.overlay}")
            conf = persistent.get(a.target)
            if conf is None or conf.image != a.overlay:
                raise LibvirtError(f"{self.name}: the persistent definition of {a.target} does not name {a.overlay}")

    def discard(self, txn: Transaction) -> None:
        live = {d.target: d.chain for d in disks_of(lv.live_xml(self.dom))} if lv.is_active(self.dom) else {}
        for a in txn.actions:
            if a.overlay not in live.get(a.target, ()):
                Path(a.overlay).unlink(missing_ok=True)

    def pause(self) -> None:
        lv.call(f"suspending {self.name!r}", self.dom.suspend)

    def resume(self) -> None:
        # One call inside the hold (no state query first); "not paused" is success: resume is idempotent.
        lv.resume(self.dom, f"resuming {self.name!r}")

    def require_running(self) -> None:
        st = lv.state(self.dom)
        if st != "running":
            raise StateError(f"domain {self.name!r} is {st}; a point needs a running domain")

    def guardian_spec(self) -> Sequence[str]:
        return [f"libvirt:{self.uri}:{self.name}"]

    def chain(self, target: str) -> tuple[str, ...]:
        """The disk's live backing chain, active image first."""
        return lv.live_chain(self.dom, target)

    def fold(self, target: str, base: str, top: str) -> None:
        """Merge ``top`` (non-active) down into ``base`` with virDomainBlockCommit; see engine.fold."""
        fold(self.dom, target, base, top)

    def record(self) -> tuple[str, str | None, str]:
        """(name, uuid, persistent XML) for a manifest."""
        return self.name, lv.uuid_of(self.dom), lv.persistent_xml(self.dom)

    def close(self) -> None:
        return None
