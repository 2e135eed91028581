"""A supervised ``qemu-storage-daemon`` exporting images over NBD, driven through qemu.qmp.

Guarantees:

- the daemon is our child, started with only a QMP monitor on a private
  socket; every image, export and the NBD server are added over QMP, so
  every failure is a QMPError with QEMU's one-line message;
- :meth:`StorageDaemon.snapshot` issues exactly ONE ``transaction`` of
  ``blockdev-snapshot`` actions across every node named (the overlays must
  have been added before, with ``"backing": null``): QEMU drains and flushes
  every old node inside it, so the frozen images are one consistent cut,
  durable once the transaction returns, or nothing moved;
- :meth:`StorageDaemon.stop` always ends the process (quit, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters.proc import require_tool, wait_listening
from libvirt_cgrep.adapters.qmp import QMPConnection
from libvirt_cgrep.errors import QMPError, UnavailableError


@dataclass(frozen=True)
class Export:
    """One image exported over NBD: ``name`` on the daemon's NBD socket, backed by ``node``."""

    name: str
    node: str
    path: str


class StorageDaemon:
    """One ``qemu-storage-daemon`` process and its QMP session (one client per monitor)."""

    def __init__(self, run_dir: Path, *, timeout: float = 10.0, preexec: Callable[[], None] | None = None) -> None:
        """Start the daemon with its monitor at ``run_dir/qmp.sock``; UnavailableError if it does not come up.

        ``preexec`` runs in the child before exec (e.g. to die with its parent).
        """
        require_tool("qemu-storage-daemon")
        self.run_dir = run_dir
        self.timeout = timeout
        self.qmp_path = str(run_dir / "qmp.sock")
        self.nbd_path = str(run_dir / "nbd.sock")
        self.proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--chardev",
                f"socket,id=mon,path={self.qmp_path},server=on,wait=off",
                "--monitor",
                "chardev=mon",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's ^C goes to us, and we stop it in order
            preexec_fn=preexec,  # noqa: PLW1509 - only a prctl, no locks taken
        )
        self._qmp: QMPConnection | None = None
        try:
            wait_listening([self.qmp_path], self.proc, what="qemu-storage-daemon", timeout=10.0)
            self._qmp = QMPConnection(self.qmp_path, timeout=5.0)
        except (UnavailableError, QMPError):
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def qmp(self) -> QMPConnection:
        if self._qmp is None:
            raise QMPError("the storage daemon's QMP session is closed")
        return self._qmp

    def alive(self) -> bool:
        return self.proc.poll() is None

    def x(self, cmd: str, args: Mapping[str, object] | None = None, timeout: float | None = None) -> Any:
        return self.qmp.execute(cmd, args, timeout=self.timeout if timeout is None else timeout)

    def start_nbd(self, owner: tuple[int, int] | None) -> None:
        """``nbd-server-start`` on ``nbd.sock``, handed to ``owner`` (QEMU's uid, gid) so only it may connect."""
        self.x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.nbd_path}}})
        if owner is not None:
            with contextlib.suppress(PermissionError):
                os.chown(self.nbd_path, *owner)
            os.chmod(self.nbd_path, 0o660)

    def add_image(self, node: str, path: str, *, backing_null: bool = False, backing: str | None = None) -> None:
        """``blockdev-add`` of a qcow2 image (file node ``<node>-f``).

        Its backing is the node ``backing`` if named, none if ``backing_null``, else the chain its header names.
        """
        self.x("blockdev-add", {"driver": "file", "node-name": f"{node}-f", "filename": path})
        args: dict[str, object] = {"driver": "qcow2", "node-name": node, "file": f"{node}-f"}
        if backing is not None:
            args["backing"] = backing
        elif backing_null:
            args["backing"] = None
        try:
            self.x("blockdev-add", args)
        except QMPError:
            with contextlib.suppress(QMPError):
                self.x("blockdev-del", {"node-name": f"{node}-f"})
            raise

    def flush_image(self, node: str, backing: str | None) -> None:
        """Write out a node's cached qcow2 metadata now (``blockdev-reopen`` with its own options flushes it).

        ``backing`` must name the node's current backing node (None: it has none), or the reopen would change it.
        After a ``block-commit`` into a node, its file is complete only after this (or the daemon's exit).
        """
        self.x("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": node, "file": f"{node}-f", "backing": backing}]})

    def del_image(self, node: str) -> None:
        """Best effort ``blockdev-del`` of an image's format and file nodes."""
        for n in (node, f"{node}-f"):
            with contextlib.suppress(QMPError):
                self.x("blockdev-del", {"node-name": n})

    def export(self, export_id: str, node: str, *, writethrough: bool) -> None:
        """A writable NBD export of ``node`` named ``export_id``; ``writethrough`` flushes after every write."""
        self.x(
            "block-export-add",
            {
                "type": "nbd",
                "id": export_id,
                "node-name": node,
                "name": export_id,
                "writable": True,
                "writethrough": writethrough,
            },
        )

    def snapshot(self, pairs: Sequence[tuple[str, str]]) -> float:
        """ONE ``transaction`` moving each node (first) onto its overlay (second); returns its duration in ms."""
        actions = [{"type": "blockdev-snapshot", "data": {"node": n, "overlay": o}} for n, o in pairs]
        t0 = time.monotonic()
        self.x("transaction", {"actions": actions})
        return (time.monotonic() - t0) * 1000.0

    def ping(self, timeout: float) -> float:
        """``query-version`` round trip in ms (QMPOutcomeUnknown if the daemon does not answer in time)."""
        t0 = time.monotonic()
        self.x("query-version", timeout=timeout)
        return (time.monotonic() - t0) * 1000.0

    def stop(self) -> None:
        """End the daemon: ``quit`` over QMP, then SIGKILL after 3 s. Idempotent; never raises."""
        if self._qmp is not None and self.proc.poll() is None:
            with contextlib.suppress(QMPError):
                self._qmp.execute("quit", timeout=2.0)
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        try:
            self.proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
