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

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from xml.sax.saxutils import quoteattr

import libvirt

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.errors import LibvirtError

COPY_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    | libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
)
_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "gone",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "cancelled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}

_LOOP = threading.Event()


def start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread; call before opening the connection."""
    if _LOOP.is_set():
        return
    _LOOP.set()
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()


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
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, targets: Sequence[str], on_change: Callable[[str, str, str], None]
    ) -> None:
        self.conn = conn
        self.dom = dom
        self.name = dom.name()
        self.states: dict[str, str] = dict.fromkeys(targets, "starting")
        self.failures = 0
        #: the domain stopped (a lifecycle event): its jobs ended with it
        self.stopped = False
        self.lock = threading.Lock()
        self.on_change = on_change
        self._ids = [
            conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._job_event, None),
            conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None),
        ]

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

    def _job_event(self, conn: object, dom: object, disk: str, kind: int, status: int, opaque: object) -> None:  # noqa: PLR0917 - libvirt's callback
        if kind == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
            self._set(disk, _STATUS.get(status, "syncing"))

    def _lifecycle(self, conn: object, dom: object, event: int, detail: int, opaque: object) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            self.stopped = True
            for t in list(self.states):
                self._set(t, "gone")

    def start(self, socket: str, exports: Mapping[str, str], bandwidth: int | None = None, *, shallow: bool = False) -> None:
        """One ``virDomainBlockCopy`` per disk into its export; LibvirtError (jobs started so far aborted) on failure.

        ``bandwidth`` (bytes/s) limits each job's background copy (tests: a seeding that lasts).
        ``shallow`` copies only the active image (the export's backing already holds the rest).
        """
        started: list[str] = []
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else None
        flags = COPY_FLAGS | (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW if shallow else 0)
        try:
            for target in self.states:
                self._set(target, "syncing")
                lv.call(
                    f"{self.name}/{target}: block copy",
                    self.dom.blockCopy,
                    target,
                    nbd_disk_xml(socket, exports[target]),
                    params,
                    flags,
                )
                started.append(target)
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
            with contextlib.suppress(libvirt.libvirtError):
                info = self.dom.blockJobInfo(target, 0)
                if info and info.get("type") == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
                    done += int(info.get("cur", 0))
                    total += int(info.get("end", 0))
        return done, total

    def write_stats(self) -> tuple[int, int]:
        """(write operations, their total time in ns) of the domain's mirrored disks, QEMU's counters, asked now."""
        ops = ns = 0
        for target in self.states:
            with contextlib.suppress(libvirt.libvirtError):
                st = self.dom.blockStatsFlags(target, 0)
                ops += int(st.get("wr_operations", 0))
                ns += int(st.get("wr_total_times", 0))
        return ops, ns

    def check_jobs(self) -> list[str]:
        """Disks whose copy job QEMU no longer runs (asked now: libvirt queries QEMU's block jobs)."""
        bad = []
        for target in self.states:
            try:
                info = self.dom.blockJobInfo(target, 0)
            except libvirt.libvirtError:
                bad.append(target)
                continue
            if not info or info.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
                bad.append(target)
        return bad

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
            with contextlib.suppress(libvirt.libvirtError):
                self.dom.blockJobAbort(target, 0)

    def close(self) -> None:
        for i in self._ids:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.domainEventDeregisterAny(i)
        self._ids = []
