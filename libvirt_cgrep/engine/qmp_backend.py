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
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libvirt_cgrep.adapters.qmp import QMPCommandError, QMPConnection, QMPOutcomeUnknown
from libvirt_cgrep.core.model import Disk, DiskCut, Guest, GuestCut, SnapshotAction, Transaction
from libvirt_cgrep.errors import CgrepError, ConflictError, CutError, QMPError, StateError, UsageError

#: ``qdev`` of a device given ``id=NAME``: ``/machine/peripheral/NAME/...``
_QDEV_ID = re.compile(r"^/machine/peripheral/([^/]+)(?:/|$)")
#: QEMU's limit on node names (``char node_name[32]``).
_NODE_NAME_MAX = 31


@dataclass
class _Made:
    """What :meth:`QMPBackend.prepare` made for one action (so only that is ever removed)."""

    file: str | None = None
    file_node: str | None = None
    overlay_node: str | None = None


def file_node_name(overlay_node: str) -> str:
    """The node name of an overlay's file (protocol) node: ``<overlay node>-f``, within 31 chars."""
    return overlay_node[: _NODE_NAME_MAX - 2] + "-f"


def _target_of(dev: Mapping[str, Any]) -> str:
    """The qdev id (``vda`` from ``-device ...,id=vda``), else the device name, else the top node name."""
    m = _QDEV_ID.match(str(dev.get("qdev") or ""))
    if m:
        return m.group(1)
    if dev.get("device"):
        return str(dev["device"])
    inserted = dev.get("inserted") or {}
    return str(inserted.get("node-name") or dev.get("qdev") or "?")


def _chain_of(image: Mapping[str, Any] | None) -> tuple[str, ...]:
    out: list[str] = []
    while image:
        out.append(str(image.get("filename", "")))
        image = image.get("backing-image")
    return tuple(out)


def disks_of(block: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]) -> tuple[Disk, ...]:
    """Disks from ``query-block`` and ``query-named-block-nodes`` replies, each with why it is unsupported. Pure."""
    file_nodes = {str(n.get("file")) for n in nodes if n.get("drv") == "file"}
    out: list[Disk] = []
    for dev in block:
        target = _target_of(dev)
        inserted = dev.get("inserted")
        device = "cdrom" if dev.get("removable") else "disk"
        if not inserted:
            out.append(Disk(target, "", "", (), None, device, False, "no medium"))
            continue
        image = inserted.get("image") or {}
        top = str(image.get("filename") or inserted.get("file") or "")
        fmt = str(inserted.get("drv") or image.get("format") or "")
        reason = None
        if inserted.get("ro"):
            reason = "read-only"
        elif fmt != "qcow2":
            reason = f"{fmt} image (qcow2 is required)"
        elif top not in file_nodes:
            reason = f"image {top!r} is not a local file (protocol other than file)"
        elif not os.path.isabs(top):
            reason = f"image path {top!r} is relative to QEMU's working directory"
        out.append(
            Disk(
                target=target,
                image=top,
                format=fmt,
                chain=_chain_of(image) or (top,),
                node=inserted.get("node-name"),
                device=device,
                supported=reason is None,
                reason=reason,
            )
        )
    return tuple(out)


class QMPBackend:
    """One bare QEMU process, reached over its QMP monitor socket.

    QEMU accepts one client per monitor: this backend keeps ``socket_path``
    busy while connected, so a guardian needs a second ``-qmp`` monitor
    (``guardian_socket``). The connection is opened on first use.
    """

    kind = "qmp"

    def __init__(
        self, socket_path: str, name: str | None = None, guardian_socket: str | None = None, *, timeout: float = 10.0
    ) -> None:
        self.socket_path = socket_path
        self.guardian_socket = guardian_socket
        self.timeout = timeout
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
        return {_target_of(d): (d.get("inserted") or {}).get("node-name") for d in self._x("query-block")}

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

    def close(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            qmp.close()
