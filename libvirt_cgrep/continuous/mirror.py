"""One domain's disks mirrored into NBD exports through libvirt (``virDomainBlockCopy``), job states from events.

Guarantees:

- one copy job per disk, ``REUSE_EXT|TRANSIENT_JOB|SYNCHRONOUS_WRITES``:
  once READY, a guest write completes only after it is on the export too;
  the jobs are never pivoted (the domain's chain never changes);
- every job's state comes from libvirt's block-job events (and a lifecycle
  event when the domain stops); :attr:`Mirrors.failures` counts every job
  that left READY for good, so a caller can prove none failed across a cut.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from xml.sax.saxutils import quoteattr

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.errors import LibvirtError


def nbd_disk_xml(socket: str, export: str) -> str:
    """The copy destination: an NBD export on a unix socket, raw (the daemon serves the qcow2 layer)."""
    return (
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        f"<source protocol='nbd' name={quoteattr(export)}><host transport='unix' socket={quoteattr(socket)}/></source>"
        "</disk>"
    )


class Mirrors:
    """The copy jobs of one domain. ``on_change(domain, target, state)`` runs in the event thread."""

    def __init__(
        self, conn: lv.Connection, dom: lv.Domain, targets: Sequence[str], on_change: Callable[[str, str, str], None]
    ) -> None:
        self.conn = conn
        self.dom = dom
        self.name = lv.domain_name(dom)
        self.states: dict[str, str] = dict.fromkeys(targets, "starting")
        self.failures = 0
        #: the domain stopped (a lifecycle event): its jobs ended with it
        self.stopped = False
        self.lock = threading.Lock()
        self.on_change = on_change
        self._ids = lv.watch_copy_jobs(conn, dom, self._set, self._stopped)

    def _set(self, target: str, state: str) -> None:
        with self.lock:
            if target not in self.states:
                return
            prev = self.states[target]
            if prev in ("failed", "cancelled", "gone"):
                return  # a job that ended stays ended
            self.states[target] = state
            if state in ("failed", "cancelled", "gone"):
                self.failures += 1
        if prev != state:
            self.on_change(self.name, target, state)

    def _stopped(self) -> None:
        self.stopped = True
        for t in list(self.states):
            self._set(t, "gone")

    def start(self, socket: str, exports: Mapping[str, str], bandwidth: int | None = None, *, shallow: bool = False) -> None:
        """One ``virDomainBlockCopy`` per disk into its export; LibvirtError (jobs started so far aborted) on failure.

        ``bandwidth`` (bytes/s) limits each job's background copy (tests: a seeding that lasts).
        ``shallow`` copies only the active image (the export's backing already holds the rest).
        """
        try:
            for target in self.states:
                self._set(target, "syncing")
                lv.block_copy(
                    self.dom,
                    f"{self.name}/{target}: block copy",
                    target,
                    nbd_disk_xml(socket, exports[target]),
                    bandwidth,
                    shallow=shallow,
                )
        except BaseException:
            self.abort()
            raise

    def snapshot(self) -> tuple[dict[str, str], int]:
        with self.lock:
            return dict(self.states), self.failures

    def progress(self) -> tuple[int, int]:
        """(bytes copied, bytes to copy) over every job, asked now; a job not listed counts as 0 of 0.

        QEMU's own counters: ``total`` grows when guest writes dirty what was already copied.
        """
        done = total = 0
        for target in self.states:
            job = lv.copy_job(self.dom, target)
            if job is not None:
                done += job[0]
                total += job[1]
        return done, total

    def write_stats(self) -> tuple[int, int]:
        """(write operations, their total time in ns) of the domain's mirrored disks, QEMU's counters, asked now."""
        ops = ns = 0
        for target in self.states:
            o, n = lv.write_stats(self.dom, target)
            ops += o
            ns += n
        return ops, ns

    def check_jobs(self) -> list[str]:
        """Disks whose copy job QEMU no longer runs (asked now: libvirt queries QEMU's block jobs)."""
        return [target for target in self.states if lv.copy_job(self.dom, target) is None]

    def wait_ready(self, timeout: float, tick: Callable[[], None]) -> None:
        """Until every job is READY; LibvirtError if one fails or the timeout passes. ``tick`` runs every 0.1 s."""
        end = time.monotonic() + timeout
        while True:
            states, _ = self.snapshot()
            if all(s == "ready" for s in states.values()):
                return
            bad = [f"{t} {s}" for t, s in states.items() if s in ("failed", "cancelled", "gone")]
            if bad:
                raise LibvirtError(f"{self.name}: mirror ended before READY: {', '.join(bad)}")
            if time.monotonic() > end:
                raise LibvirtError(f"{self.name}: mirrors not READY after {timeout:.0f} s: {states}")
            tick()
            time.sleep(0.1)

    def abort(self) -> None:
        """Cancel every job still running (never a pivot: the domain stays on its own images). Never raises."""
        for target in self.states:
            lv.abort_block_job(self.dom, target)

    def close(self) -> None:
        lv.unwatch(self.conn, self._ids)
        self._ids = []
