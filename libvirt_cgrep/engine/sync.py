"""One replication cycle: repair -> cut -> ship -> commit -> fold -> prune.

Guarantees:

- the new point is committed on the target (manifest durable) before any
  primary overlay is folded, so a crash anywhere leaves either the previous
  points only, or the new point too; never a partial one;
- a cycle ships only the extents written since the newest committed point
  (the frozen overlays above it); after an interrupted cycle the next one
  ships the union of the unshipped overlays, with no full resync;
- a full resync happens only for a new disk or a broken chain (the primary's
  base is no longer in the disk's chain), and the result says so;
- after a successful cycle each protected disk's chain is
  ``active <- base`` (plus whatever was below the base before protection).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from libvirt_cgrep.adapters import faults, qemu_img
from libvirt_cgrep.adapters.stamps import read_stamp, stamp_path, write_stamp
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.coverage import FoldStamp, coverage, primary_base
from libvirt_cgrep.core.extents import data_bytes
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.engine.backend import Backend
from libvirt_cgrep.engine.point import take_point
from libvirt_cgrep.errors import CgrepError, UsageError
from libvirt_cgrep.replica.client import Client
from libvirt_cgrep.replica.link import Target
from libvirt_cgrep.replica.ship import DiskShipment, Progress, RateLimit, extents_of, read_map, ship_disk

#: Test-only fault injection: sleep this many ms after the commit, before folding.
FAULT_BEFORE_FOLD_ENV = faults.env_name("BEFORE_FOLD_MS")
#: re-exported: the pure rule and the stamp files, for the callers of a cycle
__all__ = ["DiskSync", "FoldStamp", "SyncResult", "coverage", "primary_base", "read_stamp", "stamp_path", "sync", "write_stamp"]


@dataclass(frozen=True)
class DiskSync:
    domain: str
    target: str
    full: bool
    reason: str | None
    changed_bytes: int
    bytes_shipped: int
    chain_after: int


@dataclass(frozen=True)
class SyncResult:
    set_name: str
    target: str
    point_id: str
    time_utc: str
    parent: str | None
    fence: str
    fence_ms: float | None
    cut_ms: float
    ship_s: float
    total_s: float
    disks: tuple[DiskSync, ...]
    pruned: tuple[str, ...]
    #: wall time of each phase of the cycle, ms (see :func:`sync`)
    phases_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "set": self.set_name,
            "target": self.target,
            "point_id": self.point_id,
            "time_utc": self.time_utc,
            "parent": self.parent,
            "fence": self.fence,
            "fence_ms": None if self.fence_ms is None else round(self.fence_ms, 3),
            "cut_ms": round(self.cut_ms, 3),
            "ship_s": round(self.ship_s, 3),
            "total_s": round(self.total_s, 3),
            "bytes_shipped": sum(d.bytes_shipped for d in self.disks),
            "changed_bytes": sum(d.changed_bytes for d in self.disks),
            "disks": [
                {
                    "domain": d.domain,
                    "target": d.target,
                    "full": d.full,
                    "resync_reason": d.reason,
                    "changed_bytes": d.changed_bytes,
                    "bytes_shipped": d.bytes_shipped,
                    "primary_chain_length": d.chain_after,
                }
                for d in self.disks
            ],
            "pruned": list(self.pruned),
            "phases_ms": {k: round(v, 1) for k, v in self.phases_ms.items()},
        }


def _repair(backend: Backend, name: str, newest: mf.Manifest | None, target: str, set_name: str) -> None:
    """Fold layers a crashed cycle committed but did not fold."""
    if newest is None:
        return
    for rec in newest.disks:
        if rec.domain != name:
            continue
        try:
            chain = backend.chain(rec.target)
        except CgrepError:
            continue
        if (
            rec.source_image in chain[1:]
            and rec.primary_base in chain
            and chain.index(rec.primary_base) > chain.index(rec.source_image)
        ):
            write_stamp(rec.primary_base, FoldStamp(target, set_name, newest.point_id))
            backend.fold(rec.target, rec.primary_base, rec.source_image)


def sync(
    backends: Sequence[Backend],
    target: Target,
    *,
    set_name: str | None = None,
    fence: str = "none",
    deadline_ms: float = 2000.0,
    disks: Sequence[str] | None = None,
    policy: Policy | None = None,
    compress: str | None = None,
    bwlimit: int | None = None,
    consistency: str = "crash",
    progress: Callable[[str], Progress] = lambda label: lambda d, t: None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> SyncResult:
    """Run one cycle for the backends' guests (one set on the target).

    The per-process fixed costs (``qemu-img info``/``map`` per disk, the
    receiver's staging) run concurrently: every disk's extent map is read in
    the background from the cut on, while the chains are read and the receiver
    stages, and ``ship_s`` is the time from the receiver being ready to the
    last extent put on the link (to a local receiver, which copies the extents
    itself: to the last extent copied).
    """
    t_start = time.monotonic()
    phases: dict[str, float] = {}
    if not backends:
        raise UsageError("name at least one domain")
    if len(backends) > 1 and not set_name:
        raise UsageError("several domains form one set: name it with --set NAME")
    for b in backends:
        b.require_running()
    names = [b.record()[0] for b in backends]
    set_name = validate_name(set_name or names[0], "set name")
    link = Client(target)
    pool = ThreadPoolExecutor(max_workers=4)
    map_pool = ThreadPoolExecutor(max_workers=4)  # qemu-img map runs, beside ``pool``'s qemu-img info runs
    try:
        with _phase(phases, "open"):
            pts = link.points(set_name).points
            newest = pts[-1] if pts else None
            for b, name in zip(backends, names, strict=True):
                _repair(b, name, newest, str(target), set_name)
        with _phase(phases, "cut"):
            point = take_point(backends, targets=disks, fence=fence, deadline_ms=deadline_ms)
        domains = tuple(mf.DomainRecord(*b.record()) for b in backends)
        with _phase(phases, "plan"):
            frozen = [(g.guest, dc) for g in point.guests for dc in g.disks]
            # Frozen images never change: their maps are read from now on, beside the chains and the staging.
            raw_maps = [map_pool.submit(read_map, dc.frozen_image) for _, dc in frozen]
            chains = list(pool.map(lambda gd: qemu_img.chain(Path(gd[1].frozen_image)), frozen))
            plans: list[tuple[DiskShipment, str, str | None]] = []
            for (guest, dc), layers in zip(frozen, chains, strict=True):
                chain = tuple(i.path for i in layers)
                rec = newest.disk(guest, dc.target) if newest else None
                stamp = read_stamp(rec.primary_base) if rec else None
                depth, full, base, reason = coverage(
                    chain,
                    rec,
                    newest_id=newest.point_id if newest else None,
                    stamp=stamp,
                    target=str(target),
                    set_name=set_name,
                )
                size = layers[0].virtual_size
                plans.append((DiskShipment(guest, dc.target, chain, depth, full, size), base, reason))
        parent = newest.point_id if newest else None
        with _phase(phases, "begin"):
            link.begin(set_name, point.point_id, parent, [(s.domain, s.target, s.virtual_size, s.full) for s, _, _ in plans])
        t_ship = time.monotonic()
        limiter = RateLimit(bwlimit)
        results: list[tuple[DiskShipment, int, int, str, str | None]] = []
        wait_s = 0.0
        for (s, base, reason), raw in zip(plans, raw_maps, strict=True):
            t0 = time.monotonic()
            extents = extents_of(s, raw.result())
            wait_s += time.monotonic() - t0
            sent = ship_disk(link, s, extents, compress=compress, limiter=limiter, progress=progress(f"{s.domain}/{s.target}"))
            results.append((s, data_bytes(extents), sent, base, reason))
        if "copyv" in link.features:  # the receiver copies by itself: shipped once it has applied everything
            link.applied()
        ship_s = time.monotonic() - t_ship
        phases["map_wait"] = wait_s * 1000.0
        phases["send"] = (ship_s - wait_s) * 1000.0
        manifest = mf.Manifest(
            point_id=point.point_id,
            time_utc=point.time_utc,
            set_name=set_name,
            group=set_name if len(backends) > 1 else None,
            parent=parent,
            fence=fence,
            consistency=consistency,
            domains=domains,
            disks=tuple(
                mf.DiskRecord(s.domain, s.target, "", None, s.virtual_size, sent, "", s.chain[0], base)
                for s, _, sent, base, _ in results
            ),
        )
        with _phase(phases, "commit"):
            link.commit(manifest, [(s.domain, s.target, sent) for s, _, sent, _, _ in results])
        _fault_before_fold()
        by_name = dict(zip(names, backends, strict=True))
        with _phase(phases, "fold"):
            # one block job per disk, side by side where the backends allow (a job only touches its own disk's chain)
            def fold_one(r: tuple[DiskShipment, int, int, str, str | None]) -> DiskSync:
                s_, changed, sent, base, reason = r
                backend = by_name[s_.domain]
                write_stamp(base, FoldStamp(str(target), set_name, point.point_id))
                if s_.chain[0] != base:
                    backend.fold(s_.target, base, s_.chain[0])
                return DiskSync(s_.domain, s_.target, s_.full, reason, changed, sent, len(backend.chain(s_.target)))

            if all(b.threadsafe for b in backends):
                disk_results = list(pool.map(fold_one, results))
            else:
                disk_results = [fold_one(r) for r in results]
        pruned: tuple[str, ...] = ()
        if policy is not None:
            with _phase(phases, "prune"):
                pruned = link.prune(policy, set_name=set_name, now=now().isoformat())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        map_pool.shutdown(wait=True, cancel_futures=True)
        link.close()
    return SyncResult(
        set_name=set_name,
        target=str(target),
        point_id=point.point_id,
        time_utc=point.time_utc,
        parent=parent,
        fence=fence,
        fence_ms=point.fence_ms,
        cut_ms=point.cut_ms,
        ship_s=ship_s,
        total_s=time.monotonic() - t_start,
        disks=tuple(disk_results),
        pruned=pruned,
        phases_ms=phases,
    )


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        phases[name] = (time.monotonic() - t0) * 1000.0


def _fault_before_fold() -> None:
    faults.sleep_ms("BEFORE_FOLD_MS")
