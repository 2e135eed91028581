"""Cut a bare QEMU process (started without libvirt) through its QMP monitor.

Guarantees:

- :meth:`QMPBackend.cut` issues exactly ONE ``transaction`` of
  ``blockdev-snapshot`` actions covering every disk of the plan's transaction
  (never ``completion-mode: grouped``, never ``blockdev-snapshot-sync``): QEMU
  drains every node from its action's prepare to the end of the transaction,
  so the frozen images form one consistent cut, or none moved.
- Overlays are made by :meth:`QMPBackend.prepare`, outside the transaction
  and any hold: ``blockdev-create`` of the file, ``blockdev-add`` of a file
  node, ``blockdev-create`` of the qcow2 (backing = the frozen image, qcow2),
  ``blockdev-add`` of the overlay node with ``"backing": null``. A failed
  prepare removes what it made; the old chain stays active.
- An existing file is never overwritten and never removed: only files and
  nodes this backend made are removed again (by a failed prepare or by
  :meth:`QMPBackend.discard`), and never while a disk uses them.
- When a command's outcome is unknown (timeout, lost connection) the state is
  re-queried (``query-block``) to decide what happened; nothing is retried.
- :meth:`QMPBackend.fold` merges non-active layers into a lower one with ONE
  ``block-commit`` job (the guest keeps running); on failure the chain is
  unchanged. Node names come from QEMU's queries, so a later process folds
  what an earlier one cut. Afterwards it removes (nodes, then file) every
  layer a prepare made (node ``cg-...``, file node ``<node>-f``, file
  ``*.cgrep-*.qcow2``) that no disk uses any more: the merged-away layers,
  and leftovers of processes that died after a prepare or during a fold;
  never a layer this backend prepared for a pending cut, nor one QEMU still
  uses. This assumes one controller per QEMU process.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libvirt_cgrep.adapters.qmp import QMPConnection
from libvirt_cgrep.core.chain import check_fold
from libvirt_cgrep.core.model import DiskCut, Guest, GuestCut, SnapshotAction, Transaction
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.core.qmp import chain_of, disks_of, file_node_name, garbage_layers, layer_nodes, not_ours, target_of
from libvirt_cgrep.errors import (
    CgrepError,
    ConflictError,
    CutError,
    QMPCommandError,
    QMPError,
    QMPOutcomeUnknown,
    StateError,
    UsageError,
)

log = logging.getLogger(__name__)

#: Seconds a fold's ``block-commit`` job may run before it is cancelled.
FOLD_TIMEOUT = 3600.0


@dataclass
class _Made:
    """What :meth:`QMPBackend.prepare` made for one action (so only that is ever removed)."""

    file: str | None = None
    file_node: str | None = None
    overlay_node: str | None = None


class QMPBackend:
    """One bare QEMU process, reached over its QMP monitor socket.

    QEMU accepts one client per monitor: this backend keeps ``socket_path``
    busy while connected, so a guardian needs a second ``-qmp`` monitor
    (``guardian_socket``). The connection is opened on first use.
    """

    kind = "qmp"
    threadsafe = False  # one QMP client, driven from one thread

    def __init__(
        self,
        socket_path: str,
        name: str | None = None,
        guardian_socket: str | None = None,
        *,
        timeout: float = 10.0,
        fold_timeout: float = FOLD_TIMEOUT,
    ) -> None:
        self.socket_path = socket_path
        self.guardian_socket = guardian_socket
        self.timeout = timeout
        self.fold_timeout = fold_timeout
        self._name = name
        self._qmp: QMPConnection | None = None
        self._made: dict[str, _Made] = {}

    # -- plumbing ---------------------------------------------------------

    @property
    def qmp(self) -> QMPConnection:
        if self._qmp is None:
            self._qmp = QMPConnection(self.socket_path, timeout=min(self.timeout, 5.0))
        return self._qmp

    @property
    def name(self) -> str:
        """The name given, else QEMU's ``-name``, else the socket path."""
        if self._name is None:
            reply = self.qmp.execute("query-name", timeout=self.timeout)
            self._name = str(reply.get("name") or self.socket_path)
        return self._name

    def _x(self, cmd: str, args: Mapping[str, object] | None = None) -> Any:
        return self.qmp.execute(cmd, args, timeout=self.timeout)

    def _tops(self) -> dict[str, str | None]:
        """Top node name of every device, by target (None without medium)."""
        return {target_of(d): (d.get("inserted") or {}).get("node-name") for d in self._x("query-block")}

    def _node_names(self) -> set[str]:
        return {str(n.get("node-name")) for n in self._x("query-named-block-nodes", {"flat": True})}

    def _used_nodes(self) -> set[str]:
        """Node names of every device's top, for the safety checks of removal."""
        return {n for n in self._tops().values() if n}

    # -- Backend ----------------------------------------------------------

    def discover(self) -> Guest:
        status = self._x("query-status")
        block = self._x("query-block")
        nodes = self._x("query-named-block-nodes", {"flat": True})
        return Guest(
            name=self.name,
            kind=self.kind,
            address=self.socket_path,
            state=str(status.get("status", "unknown")),
            disks=disks_of(block, nodes),
        )

    def prepare(self, txn: Transaction) -> None:
        """Create and add every overlay of ``txn``; on failure remove what was made (CutError)."""
        self._check_plan(txn)
        try:
            block = {
                str((d.get("inserted") or {}).get("node-name")): d["inserted"]
                for d in self._x("query-block")
                if d.get("inserted")
            }
            existing = self._node_names()
            for a in txn.actions:
                top = block.get(str(a.node))
                if top is None:
                    raise StateError(f"{a.target}: node {a.node} is no longer the top of a disk (rediscover)")
                if (top.get("image") or {}).get("filename") != a.frozen:
                    raise StateError(f"{a.target}: node {a.node} is not {a.frozen} (rediscover)")
                for n in (a.overlay_node, file_node_name(a.overlay_node)):
                    if n in existing:
                        raise ConflictError(f"{a.target}: node name {n} is already in use")
                if os.path.lexists(a.overlay):
                    raise ConflictError(f"{a.target}: overlay {a.overlay} already exists")
            for a in txn.actions:
                self._make_overlay(a, block[str(a.node)])
        except CgrepError as exc:
            note = ""
            try:
                self._remove(txn.guest, txn.actions)
            except CgrepError as cleanup:
                note = f" (cleanup incomplete: {cleanup})"
            raise CutError(f"{txn.guest}: cannot create overlays, disks stay on their old chain: {exc}{note}") from exc

    def _check_plan(self, txn: Transaction) -> None:
        if not txn.actions:
            raise UsageError(f"{txn.guest}: empty transaction")
        for a in txn.actions:
            if not a.node:
                raise UsageError(f"{txn.guest}: disk {a.target} has no node name (was it discovered over QMP?)")
            if a.format != "qcow2":
                raise UsageError(f"{txn.guest}: overlay format {a.format} is not supported (qcow2 only)")
        overlays = [a.overlay_node for a in txn.actions] + [file_node_name(a.overlay_node) for a in txn.actions]
        if len(set(overlays)) != len(overlays):
            raise UsageError(f"{txn.guest}: overlay node names collide: {', '.join(overlays)}")

    def _make_overlay(self, a: SnapshotAction, frozen: Mapping[str, Any]) -> None:
        made = self._made.setdefault(a.overlay_node, _Made())
        fnode = file_node_name(a.overlay_node)
        cache = frozen.get("cache") or {}
        zeroes = str(frozen.get("detect_zeroes") or "off")
        common: dict[str, object] = {
            "cache": {"direct": bool(cache.get("direct")), "no-flush": bool(cache.get("no-flush"))},
            "detect-zeroes": zeroes,
        }
        if zeroes == "unmap":  # QEMU refuses detect-zeroes=unmap without discard=unmap
            common["discard"] = "unmap"
        size = int((frozen.get("image") or {})["virtual-size"])
        made.file = a.overlay  # from here on the file may exist: it is ours (we checked it did not)
        self.qmp.run_job(
            {"job-id": f"cgrep-cf-{a.overlay_node}", "options": {"driver": "file", "filename": a.overlay, "size": 0}},
            timeout=self.timeout,
        )
        self._add(made, "file_node", {"driver": "file", "node-name": fnode, "filename": a.overlay, **common})
        self.qmp.run_job(
            {
                "job-id": f"cgrep-cq-{a.overlay_node}",
                "options": {"driver": "qcow2", "file": fnode, "size": size, "backing-file": a.frozen, "backing-fmt": "qcow2"},
            },
            timeout=self.timeout,
        )
        self._add(
            made, "overlay_node", {"driver": "qcow2", "node-name": a.overlay_node, "file": fnode, "backing": None, **common}
        )

    def _add(self, made: _Made, slot: str, args: dict[str, object]) -> None:
        """``blockdev-add``, recorded in ``made`` first: after an unanswered add, removal checks whether it exists."""
        setattr(made, slot, args["node-name"])
        try:
            self._x("blockdev-add", args)
        except QMPCommandError:
            setattr(made, slot, None)  # refused: nothing was added
            raise

    def cut(self, txn: Transaction) -> GuestCut:
        """ONE ``transaction`` of ``blockdev-snapshot`` actions; CutError (old chains active) on failure.

        ``cut_ms`` is the host-monotonic duration of the transaction command.
        """
        self._check_plan(txn)
        actions = [{"type": "blockdev-snapshot", "data": {"node": a.node, "overlay": a.overlay_node}} for a in txn.actions]
        t0 = time.monotonic()
        try:
            self.qmp.execute("transaction", {"actions": actions}, timeout=self.timeout)
        except QMPCommandError as exc:
            self._require_old_tops(txn, exc)
            raise CutError(f"{txn.guest}: the transaction failed, disks stay on their old chain: {exc}") from exc
        except QMPOutcomeUnknown as exc:
            cut_ms = (time.monotonic() - t0) * 1000.0
            if not self._moved_after_unknown(txn, exc):
                raise CutError(f"{txn.guest}: the transaction did not take effect, disks stay on their old chain: {exc}") from exc
        else:
            cut_ms = (time.monotonic() - t0) * 1000.0
        for a in txn.actions:
            self._made.pop(a.overlay_node, None)  # live now: never removed by discard
        return GuestCut(txn.guest, tuple(DiskCut(a.target, a.frozen, a.overlay) for a in txn.actions), cut_ms)

    def confirm(self, txn: Transaction) -> None:
        """Nothing to re-read: the transaction's answer (or query-block after a lost one) decided the cut."""

    def _require_old_tops(self, txn: Transaction, cause: QMPError) -> None:
        """After a refused transaction, confirm every disk is still on its old top."""
        try:
            tops = self._tops()
        except QMPError:
            return  # the transaction was refused; QEMU's abort restored every action
        moved = [a.target for a in txn.actions if tops.get(a.target) != a.node]
        if moved:
            raise StateError(f"{txn.guest}: transaction failed ({cause}) but {', '.join(moved)} left its old top") from cause

    def _moved_after_unknown(self, txn: Transaction, cause: QMPError) -> bool:
        """Decide from ``query-block`` whether a transaction with no answer took effect (True) or not."""
        try:
            tops = self._tops()
        except QMPError:
            self.close()  # the session is unusable: query over a new one
            try:
                tops = self._tops()
            except QMPError as exc:
                raise QMPError(f"{txn.guest}: transaction outcome unknown ({cause}) and QEMU cannot be queried: {exc}") from exc
        now = [tops.get(a.target) for a in txn.actions]
        if all(n == a.overlay_node for n, a in zip(now, txn.actions, strict=True)):
            return True
        if all(n == a.node for n, a in zip(now, txn.actions, strict=True)):
            return False
        raise StateError(f"{txn.guest}: after an unanswered transaction ({cause}) the disks are on mixed tops: {now}")

    def discard(self, txn: Transaction) -> None:
        """Remove the overlay nodes and files :meth:`prepare` made for ``txn``, unless a disk uses them."""
        self._remove(txn.guest, txn.actions)

    def _remove(self, guest: str, actions: Sequence[SnapshotAction]) -> None:
        """Best effort: remove what prepare made for ``actions``; QMPError/StateError lists what stayed."""
        mine = [(a, self._made[a.overlay_node]) for a in reversed(actions) if a.overlay_node in self._made]
        if not mine:
            return
        used = self._used_nodes()
        existing = self._node_names()
        busy: list[str] = []
        failed: list[str] = []
        for a, made in mine:
            if a.overlay_node in used:
                busy.append(a.target)
                continue
            for node in (made.overlay_node, made.file_node):
                if node and node in existing:
                    try:
                        self._x("blockdev-del", {"node-name": node})
                    except QMPError as exc:
                        failed.append(f"node {node}: {exc}")
            if made.file:
                try:
                    os.unlink(made.file)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failed.append(f"{made.file}: {exc.strerror}")
            del self._made[a.overlay_node]
        if busy:
            raise StateError(f"{guest}: not removing overlays in use by {', '.join(busy)} (the cut took effect)")
        if failed:
            raise QMPError(f"{guest}: could not remove {'; '.join(failed)}")

    def pause(self) -> None:
        """``stop``: vCPUs paused, I/O drained and flushed."""
        self._x("stop")

    def resume(self) -> None:
        """``cont`` (a no-op on a running VM)."""
        self._x("cont")

    def guardian_spec(self) -> Sequence[str]:
        """``qmp:<guardian socket>``: a second monitor, since this backend holds the first."""
        if not self.guardian_socket:
            raise UsageError(
                f"{self._name or self.socket_path}: a fence needs a second QMP monitor for the guardian "
                "(start QEMU with another -qmp socket and give it as the guardian socket)"
            )
        return [f"qmp:{self.guardian_socket}"]

    def require_running(self) -> None:
        """StateError unless ``query-status`` says the guest runs."""
        status = self._x("query-status")
        if not status.get("running"):
            raise StateError(f"QEMU guest {self.name!r} is {status.get('status', 'not running')}; a point needs a running guest")

    def _device(self, target: str) -> Mapping[str, Any]:
        """The ``query-block`` entry of ``target`` (with a medium); StateError if there is none."""
        block = self._x("query-block")
        for dev in block:
            if target_of(dev) == target:
                if not dev.get("inserted"):
                    raise StateError(f"{self.name}: disk {target} has no medium")
                return dict(dev)
        raise StateError(f"{self.name}: no disk {target} (disks: {', '.join(target_of(d) for d in block) or 'none'})")

    def chain(self, target: str) -> tuple[str, ...]:
        """The disk's live backing chain from ``query-block``, active image first."""
        inserted = self._device(target)["inserted"]
        return chain_of(inserted.get("image")) or (str(inserted.get("file") or ""),)

    def fold(self, target: str, base: str, top: str) -> None:
        """Merge the non-active ``top`` (and every layer between it and ``base``) into ``base``.

        ONE ``block-commit`` job (``top-node``/``base-node``, node names
        resolved from QEMU's queries); the guest keeps running. On failure the
        chain is unchanged and a QMPError/StateError says why. Then the
        merged-away layers that a prepare made are removed (nodes and files,
        see :meth:`_collect_garbage`); a layer QEMU still uses stays, logged.
        """
        inserted = self._device(target)["inserted"]
        chain = chain_of(inserted.get("image"))
        check_fold(chain, base, top, self.name, target)
        nodes = self._x("query-named-block-nodes", {"flat": False})
        layers = layer_nodes(chain, str(inserted.get("node-name") or ""), nodes, f"{self.name}/{target}")
        i_top, i_base = chain.index(top), chain.index(base)
        job_id = f"cgrep-fold-{target}-{uuid.uuid4().hex[:8]}"
        args = {
            "job-id": job_id,
            "device": layers[0],
            "top-node": layers[i_top],
            "base-node": layers[i_base],
            "auto-dismiss": False,
        }
        try:
            self.qmp.job("block-commit", args, timeout=self.fold_timeout)
        except QMPError as exc:
            # Refused, failed, or cancelled at the deadline (the job may have completed just before): look.
            now = self._chain_after_error(target, exc)
            if top in now or base not in now:
                raise QMPError(f"{self.name}/{target}: cannot fold {top} into {base}, the chain is unchanged: {exc}") from exc
            log.warning("%s/%s: the fold completed despite: %s", self.name, target, exc)
        after = self.chain(target)
        if top in after or base not in after:
            raise StateError(f"{self.name}/{target}: after folding {top} into {base} the chain is {' <- '.join(after)}")
        try:
            self._collect_garbage(f"{self.name}/{target}", layers[i_top:i_base])
        except QMPError as exc:  # the fold itself succeeded; leftovers go with a later fold
            log.warning("%s/%s: folded, but removing the merged-away layers failed: %s", self.name, target, exc)

    def _chain_after_error(self, target: str, cause: QMPError) -> tuple[str, ...]:
        """The chain after a failed fold job, over a new session if the old one is unusable."""
        try:
            return self.chain(target)
        except QMPError:
            self.close()  # the session is unusable: query over a new one
            try:
                return self.chain(target)
            except QMPError as exc:
                raise QMPError(f"{self.name}/{target}: fold outcome unknown ({cause}) and QEMU cannot be queried: {exc}") from exc

    def _collect_garbage(self, where: str, merged: Sequence[str]) -> None:
        """Remove our overlay layers that no disk uses any more: the ``merged`` ones, and leftovers of dead processes.

        A layer is ours when a prepare made it: format node ``cg-...`` with
        file node ``<node>-f`` on a ``*.cgrep-*.qcow2`` file. Every such layer
        outside every disk's chain, and not prepared by this backend for a
        pending cut, gets ``blockdev-del`` of its format node and then its file
        node (upper layers first: a merged-away layer still holds the one below
        as its backing); its file is unlinked only once both nodes are gone.
        Layers QEMU still uses (``is in use``) stay, logged; a later fold
        collects them once they are free.
        """
        block = self._x("query-block")
        nodes = self._x("query-named-block-nodes", {"flat": False})
        for node in not_ours(merged, nodes):
            log.info("%s: %s was merged away but is not an overlay of ours: left alone", where, node)
        for node, filename in garbage_layers(block, nodes, self._made):
            if not (self._del_node(where, node) and self._del_node(where, file_node_name(node))):
                continue
            try:
                os.unlink(filename)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("%s: cannot remove merged-away %s: %s", where, filename, exc.strerror)

    def _del_node(self, where: str, node: str) -> bool:
        """``blockdev-del``; True when the node is gone (deleted or not found), False when QEMU still uses it."""
        try:
            self._x("blockdev-del", {"node-name": node})
        except QMPCommandError as exc:
            text = str(exc)
            if "find node" in text or "not found" in text or exc.error_class == "DeviceNotFound":
                return True
            log.warning("%s: node %s stays (%s)", where, node, text)
            return False
        return True

    def record(self) -> tuple[str, str | None, str]:
        """(name, None, ''): bare QEMU has no domain definition. UsageError unless the name is a valid name.

        The name is the one :meth:`discover` uses (given, else QEMU's ``-name``);
        a replica stores it, so the socket-path fallback is refused here.
        """
        name = self.name
        if name == self.socket_path:
            raise UsageError(f"QEMU at {self.socket_path} has no name: start it with -name NAME to replicate it")
        return validate_name(name, "guest name"), None, ""

    def close(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            qmp.close()
