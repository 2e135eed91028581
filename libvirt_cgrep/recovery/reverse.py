"""Reverse protection after a failover, and the planned failback. Runs on the replica side (where the failover runs).

Reverse (``reverse``): the failed-over domains are protected back to a target
on the original site, ``TO``. Its set is seeded with the common point P (the
point failed over from) built from the old primary's surviving images, which
the receiver copies locally on the original site; nothing of them crosses the
link. An image is trusted as P only if it exists, has P's size, its fold
stamp names this target, this set and point P, and P's frozen layer on the
primary is gone (it was folded into it). Any other image is seeded by
shipping P's allocated data in full, and the result says why. Then one normal
cycle (engine/sync.py) ships what changed on the failed-over domains since P:
their recovery overlays' clusters.

Failback (``failback``): the recovered domains are paused then stopped (no
write can follow), their last changes are shipped to ``TO`` as a final point,
the replica's own target is seeded locally with that final point (so
protection in the original direction resumes with deltas), the failover run is
retired, and the originals are defined (same names and UUIDs, their protection
metadata kept) on new overlays over ``TO``'s final point and started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters import faults, qemu_img
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters.fs import save_file
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core import recovery as rc
from libvirt_cgrep.core.domxml import disks_of
from libvirt_cgrep.core.extents import Extent, data_bytes
from libvirt_cgrep.core.plan import point_id as make_point_id
from libvirt_cgrep.engine.libvirt_backend import LibvirtBackend
from libvirt_cgrep.engine.sync import coverage, read_stamp, sync
from libvirt_cgrep.errors import ConflictError, NotFoundError, StateError
from libvirt_cgrep.recovery import failover as fo
from libvirt_cgrep.recovery import journal as jr
from libvirt_cgrep.replica.client import Client
from libvirt_cgrep.replica.link import Target, parse_target
from libvirt_cgrep.replica.ship import DiskShipment, RateLimit, extents_of, ship_disk
from libvirt_cgrep.replica.store import StagedWriter, Store

log = logging.getLogger(__name__)


def active_failover(root: Path, name: str) -> rc.Journal:
    """The unfinished failover run of set (or domain) ``name`` on this target."""
    runs = jr.unfinished(root, Store.open(root, create=False, readonly=True), name, "failover")
    if not runs:
        raise NotFoundError(f"{name!r} is not failed over on target {root}")
    return max(runs, key=lambda j: j.run)


def _stamp_ok(probe: dict[str, Any], root: Path, set_name: str, p: mf.Manifest, size: int) -> str | None:
    """None if the old primary's image holds exactly point P, else why not."""
    if not probe.get("exists"):
        return f"{probe['path']} does not exist"
    if int(probe["virtual_size"]) != size:
        return f"{probe['path']} has another size"
    st = probe.get("stamp")
    if not st:
        return f"{probe['path']} has no fold stamp"
    try:
        stamp_root = parse_target(str(st["target"])).path
    except Exception:
        stamp_root = ""
    if stamp_root != str(root) or st["set"] != set_name or st["point_id"] != p.point_id:
        return f"{probe['path']} holds point {st['point_id']} of {st['target']} (set {st['set']}), not {p.point_id}"
    return None


@dataclass(frozen=True)
class ReverseResult:
    run: str
    to: str
    common_point: str
    seeded: bool
    seed_bytes_shipped: int
    seed_full: tuple[str, ...]  # disks seeded by shipping, with why
    point_id: str
    changed_bytes: int
    bytes_shipped: int
    disk_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        shipped = self.seed_bytes_shipped + self.bytes_shipped
        return {
            "run": self.run,
            "to": self.to,
            "common_point": self.common_point,
            "seeded": self.seeded,
            "seed_bytes_shipped": self.seed_bytes_shipped,
            "seed_full": list(self.seed_full),
            "point_id": self.point_id,
            "changed_bytes": self.changed_bytes,
            "bytes_shipped": self.bytes_shipped,
            "shipped_over_changed": round(shipped / self.changed_bytes, 4) if self.changed_bytes else None,
            "disk_bytes": self.disk_bytes,
            "seconds": round(self.seconds, 3),
        }


def _seed(link: Client, root: Path, j: rc.Journal, p: mf.Manifest, conn: lv.Connection) -> tuple[int, list[str]]:
    """Commit the common point P on the far target from the old primary's images (copied there) or by shipping P."""
    names = {d.original: d for d in j.domains}
    disks = [d for d in p.disks if d.domain in names]
    probes = link.probe([d.primary_base for d in disks], [d.source_image for d in disks])
    images: dict[str, str] = j.extra["images"]
    seeds: list[tuple[str, str, str]] = []
    full: list[tuple[mf.DiskRecord, str]] = []
    for d, probe, frozen_left in zip(disks, probes.images, probes.exists, strict=True):
        why = _stamp_ok(probe, root, j.set_name, p, d.virtual_size)
        if why is None and frozen_left and d.source_image != d.primary_base:
            why = f"P's frozen layer {d.source_image} was not folded into {d.primary_base}"
        if why is None:
            seeds.append((names[d.domain].name, d.target, d.primary_base))
        else:
            full.append((d, why))
    link.begin(j.set_name, p.point_id, None, [(names[d.domain].name, d.target, d.virtual_size, True) for d in disks], seed=seeds)
    shipped: dict[tuple[str, str], int] = {}
    for d, _ in full:
        img = images[f"{d.domain}/{d.target}"]
        chain = tuple(i.path for i in qemu_img.chain(Path(img)))
        s = DiskShipment(names[d.domain].name, d.target, chain, len(chain), True, d.virtual_size)
        shipped[(s.domain, s.target)] = ship_disk(
            link, s, extents_of(s), compress=None, limiter=RateLimit(None), progress=lambda a, b: None
        )
    domains = []
    for r in j.domains:
        dom = lv.lookup(conn, r.name)
        domains.append(mf.DomainRecord(r.name, r.uuid, lv.persistent_xml(dom)))
    overlays = {(r.original, t): path for r in j.domains for t, path in r.overlays}
    manifest = replace(
        p,
        parent=None,
        committed_utc="",
        domains=tuple(domains),
        disks=tuple(
            mf.DiskRecord(
                names[d.domain].name,
                d.target,
                "",
                None,
                d.virtual_size,
                shipped.get((names[d.domain].name, d.target), 0),
                "",
                images[f"{d.domain}/{d.target}"],  # the layer of the recovered chain that holds P
                overlays[(d.domain, d.target)],  # the recovered domain's writable base
            )
            for d in disks
        ),
        extra={"seeded_from": "old primary" if not full else "mixed", "common_point": p.point_id},
    )
    link.commit(manifest, [(a, b, n) for (a, b), n in shipped.items()])
    return sum(shipped.values()), [f"{d.domain}/{d.target}: {why}" for d, why in full]


def reverse(
    conn: lv.Connection,
    uri: str,
    root: Path,
    name: str,
    to: Target,
    *,
    deadline_ms: float = 2000.0,
    progress: Callable[[str], None] = lambda s: None,
) -> ReverseResult:
    """Protect the failed-over domains back to ``to``; the first cycle ships only what changed since P."""
    t0 = time.monotonic()
    j = active_failover(root, name)
    if j.state != "active":
        raise StateError(f"failover run {j.run} is {j.state}; finish it first (run failover again)")
    p = Store.open(root, create=False, readonly=True).point(j.set_name, j.point_id)
    prev = j.extra.get("reverse")
    if prev and prev.get("to") != str(to):
        raise ConflictError(f"{j.set_name} is already protected back to {prev['to']}")
    link = Client(to)
    seeded, seed_bytes = False, 0
    seed_full: list[str] = []
    try:
        pts = link.points(j.set_name).points
        if not pts:
            progress(f"seeding point {p.point_id} on {to} from the old primary's images")
            seed_bytes, seed_full = _seed(link, root, j, p, conn)
            seeded = True
        elif not prev:
            raise ConflictError(f"{to} already holds set {j.set_name}: reverse needs its own target (or a fresh set)")
    finally:
        link.close()
    if seeded:
        j = j.step(jr.utcnow(), f"reverse: {to} seeded with point {p.point_id}", extra={**j.extra, "reverse": {"to": str(to)}})
        jr.save_journal(root, j)
    disk_bytes = sum(d.virtual_size for d in p.disks if j.domain(d.domain))
    backends = [LibvirtBackend(lv.connect(uri), d.name, uri) for d in j.domains]
    try:
        res = sync(backends, to, set_name=j.set_name, fence="suspend" if len(backends) > 1 else "none", deadline_ms=deadline_ms)
    finally:
        for b in backends:
            with contextlib.suppress(Exception):
                b.close()
    j = j.step(jr.utcnow(), f"reverse: point {res.point_id} shipped to {to}")
    jr.save_journal(root, j)
    changed = sum(d.changed_bytes for d in res.disks)
    shipped = sum(d.bytes_shipped for d in res.disks)
    return ReverseResult(
        j.run,
        str(to),
        p.point_id,
        seeded,
        seed_bytes,
        tuple(seed_full),
        res.point_id,
        changed,
        shipped,
        disk_bytes,
        time.monotonic() - t0,
    )


# ------------------------------------------------------------------ failback


def _now_id() -> str:
    return make_point_id(datetime.now(UTC))


def _final_point(conn: lv.Connection, j: rc.Journal, to: Target) -> mf.Manifest:
    """Ship what the stopped recovered domains wrote since the newest point on ``to``; commit it there."""
    link = Client(to)
    try:
        pts = link.points(j.set_name).points
        if not pts:
            raise StateError(f"{to} holds no point of {j.set_name}: run 'reverse' first")
        newest = pts[-1]
        plans = []
        domains = []
        for r in j.domains:
            dom = lv.lookup(conn, r.name)
            xml = lv.persistent_xml(dom)
            domains.append(mf.DomainRecord(r.name, r.uuid, xml))
            for disk in disks_of(xml):
                rec = newest.disk(r.name, disk.target)
                if rec is None:
                    continue
                layers = qemu_img.chain(Path(disk.image))
                chain = tuple(i.path for i in layers)
                depth, full, base, _ = coverage(
                    chain, rec, newest_id=newest.point_id, stamp=read_stamp(rec.primary_base), target=str(to), set_name=j.set_name
                )
                plans.append((DiskShipment(r.name, disk.target, chain, depth, full, layers[0].virtual_size), base))
        pid = _now_id()
        link.begin(j.set_name, pid, newest.point_id, [(s.domain, s.target, s.virtual_size, s.full) for s, _ in plans])
        sent = {}
        for s, _ in plans:
            sent[(s.domain, s.target)] = ship_disk(
                link, s, extents_of(s), compress=None, limiter=RateLimit(None), progress=lambda a, b: None
            )
        manifest = mf.Manifest(
            point_id=pid,
            time_utc=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            set_name=j.set_name,
            group=newest.group,
            parent=newest.point_id,
            fence="stopped",
            consistency="crash",
            domains=tuple(domains),
            disks=tuple(
                mf.DiskRecord(s.domain, s.target, "", None, s.virtual_size, sent[(s.domain, s.target)], "", s.chain[0], base)
                for s, base in plans
            ),
        )
        return link.commit(manifest, [(a, b, n) for (a, b), n in sent.items()]).manifest
    finally:
        link.close()


def _seed_home(
    root: Path, j: rc.Journal, *, p: mf.Manifest, final: mf.Manifest, to_root: Path, home_run: str, conn: lv.Connection
) -> int:
    """Commit ``final`` on this (the replica's) target from the recovered chains, locally: a delta over P.

    Its records name the originals' coming chain on the original site (the final
    point's image there, and the failback overlay above it), so protection in
    the original direction ships deltas. Returns the bytes written; 0 (and no
    point) when this target has points newer than P (the next cycle is then a full copy).
    """
    with jr.locked(root) as store:
        pts = store.points(j.set_name)
        if pts and pts[-1].point_id == final.point_id:
            return 0  # done before (resumed)
        if not pts or pts[-1].point_id != p.point_id:
            return -1
        names = {r.name: r for r in j.domains}
        disks = []
        for d in final.disks:
            r = names[d.domain]
            disks.append((r.original, d.target, d.virtual_size, False))
        staged = store.stage(j.set_name, final.point_id, p, disks)
        written = 0
        images: dict[str, str] = j.extra["images"]
        try:
            for s in staged:
                r = next(x for x in j.domains if x.original == s.domain)
                active = next(dd.image for dd in disks_of(lv.persistent_xml(lv.lookup(conn, r.name))) if dd.target == s.target)
                chain = tuple(i.path for i in qemu_img.chain(Path(active)))
                depth = chain.index(images[f"{s.domain}/{s.target}"])
                sh = DiskShipment(s.domain, s.target, chain, depth, False, s.virtual_size)
                exts = extents_of(sh)
                with store.writer(s) as w:
                    _copy_extents(sh, exts, w)
                written += data_bytes(exts)
            home_dir = Path(to_root) / j.set_name / "recovery" / home_run
            p_domains = {x.name: x for x in p.domains}
            manifest = mf.Manifest(
                point_id=final.point_id,
                time_utc=final.time_utc,
                set_name=j.set_name,
                group=p.group,
                parent=p.point_id,
                fence=final.fence,
                consistency=final.consistency,
                domains=tuple(p_domains[r.original] for r in j.domains if r.original in p_domains),
                disks=tuple(
                    mf.DiskRecord(
                        s.domain,
                        s.target,
                        "",
                        None,
                        s.virtual_size,
                        0,
                        "",
                        str(Path(to_root) / j.set_name / _final_image(final, names, s.domain, s.target)),
                        str(home_dir / s.domain / f"{s.target}.qcow2"),
                    )
                    for s in staged
                ),
                extra={"seeded_from": "failback", "local_bytes": written},
            )
            store.commit(j.set_name, manifest, staged, {})  # nothing crossed a link
        except BaseException:
            store.discard(staged)
            raise
    return written


def _final_image(final: mf.Manifest, names: dict[str, rc.DomainRun], original: str, target: str) -> str:
    for d in final.disks:
        if names[d.domain].original == original and d.target == target:
            return d.image
    raise NotFoundError(f"final point lacks {original}/{target}")


def _copy_extents(s: DiskShipment, extents: tuple[Extent, ...], w: StagedWriter) -> None:
    fds: dict[int, int] = {}
    try:
        for x in extents:
            if x.kind == "zero":
                w.write_zeroes(x.start, x.length)
                continue
            fd = fds.get(x.depth)
            if fd is None:
                fd = fds[x.depth] = os.open(s.chain[x.depth], os.O_RDONLY)
            for i in range(0, x.length, 4 << 20):
                n = min(4 << 20, x.length - i)
                assert x.offset is not None
                w.write(x.start + i, os.pread(fd, n, x.offset + i))
    finally:
        for fd in fds.values():
            os.close(fd)


@dataclass(frozen=True)
class FailbackResult:
    final_point: str
    final_bytes_shipped: int
    home_seed_bytes: int
    originals: tuple[str, ...]
    run: str
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {
            "final_point": self.final_point,
            "final_bytes_shipped": self.final_bytes_shipped,
            "home_seed_local_bytes": self.home_seed_bytes,
            "originals": list(self.originals),
            "run": self.run,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class HomeStart:
    """What the original site needs to start the originals over the final point.

    ``xmls`` and ``names``: per recovered domain, its original's domain XML and name.
    """

    point: str
    run: str
    xmls: dict[str, str]
    names: dict[str, str]


@dataclass(frozen=True)
class Home:
    """The original site's libvirt, for a ``TO`` that is a local path (an ssh ``TO``'s receiver uses its own)."""

    conn: lv.Connection
    uri: str


def start_home(
    conn: lv.Connection,
    uri: str,
    to_root: Path,
    set_name: str,
    start: HomeStart | None,
    *,
    progress: Callable[[str], None] = lambda s: None,
) -> tuple[str, str, tuple[str, ...]]:
    """Define and start the originals on the original site over ``start``'s final point, on ``conn``; returns (point, run, names).

    ``start`` None finishes a failback run that began starting them before (NotFoundError if there is none).
    Runs where ``to_root`` is a local path: in ``failback`` itself, or in the original site's receiver.
    """
    if start is None:
        ro = Store.open(to_root, create=False, readonly=True)
        journals = jr.journals(to_root, set_name) if set_name in ro.sets() else []
        runs = [r for r in journals if r.kind == "failback" and r.state == "preparing"]
        if not runs:
            raise NotFoundError(f"no failback of {set_name!r} to finish on {to_root}")
        res = fo.failover(conn, uri, to_root, set_name, kind="failback", point=runs[-1].point_id, force=True)
    else:
        res = fo.failover(
            conn,
            uri,
            to_root,
            set_name,
            kind="failback",
            point=start.point,
            force=True,
            run_id=start.run,
            xml_override=start.xmls,
            names=start.names,
            progress=progress,
        )
    return res.journal.point_id, res.journal.run, tuple(d.name for d in res.journal.domains)


def _start_home(
    to: Target, home: Home | None, set_name: str, start: HomeStart | None, progress: Callable[[str], None]
) -> tuple[str, str, tuple[str, ...]]:
    """:func:`start_home` on the original site: here for a local ``to``, else by its receiver (``failback-start``)."""
    if to.host is None:
        if home is None:
            raise StateError("failback to a local path needs the original site's libvirt")
        return start_home(home.conn, home.uri, Path(to.path), set_name, start, progress=progress)
    link = Client(to)
    try:
        if "failback-start" not in link.features:
            raise StateError(f"the receiver on {to.host} cannot start a failback: update libvirt-cgrep there")
        r = link.failback_start(set_name, None if start is None else asdict(start))
    finally:
        link.close()
    return r.point, r.run, r.originals


#: In the replica's ``SET/recovery/`` while a failback's home start is owed: the :class:`HomeStart` as JSON.
PENDING = "failback-start.json"


def _pending_path(root: Path, set_name: str) -> Path:
    return jr.recovery_dir(root, set_name) / PENDING


def _forget_pending(pending: Path) -> None:
    pending.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        pending.parent.rmdir()  # only when empty


def _point_on(to: Target, set_name: str, point_id: str) -> mf.Manifest:
    link = Client(to, readonly=True)
    try:
        pts = link.points(set_name).points
    finally:
        link.close()
    for m in pts:
        if m.point_id == point_id:
            return m
    raise NotFoundError(f"{to} lacks the final point {point_id} of {set_name}")


def failback(
    conn: lv.Connection,
    uri: str,
    root: Path,
    name: str,
    to: Target,
    *,
    home: Home | None,
    progress: Callable[[str], None] = lambda s: None,
) -> FailbackResult:
    """Planned return to the original site ``to``: the reverse target there.

    ``to`` a local path: the originals start on ``home``; ssh://: its receiver starts them on its host's libvirt.
    """
    t0 = time.monotonic()
    try:
        j = active_failover(root, name)
    except NotFoundError as missing:
        # Interrupted after the failover run was retired: finish starting the originals at home.
        pending = _pending_path(root, name)
        start = HomeStart(**json.loads(pending.read_bytes())) if pending.is_file() else None
        try:
            point, run, names = _start_home(to, home, name, start, progress)
        except NotFoundError:
            raise missing from None
        _forget_pending(pending)
        return FailbackResult(point, 0, 0, names, run, time.monotonic() - t0)
    rev = j.extra.get("reverse")
    if not rev or parse_target(str(rev["to"])) != to:
        raise StateError(f"{j.set_name} is not protected back to {to}: run 'reverse' first")
    p = Store.open(root, create=False, readonly=True).point(j.set_name, j.point_id)
    # 1. hold, then stop: no write can follow the final point.
    for r in j.domains:
        dom = lv.lookup(conn, r.name)
        if lv.state(dom) == "running":
            lv.call(f"pausing {r.name!r}", dom.suspend)
    for r in j.domains:
        dom = lv.lookup(conn, r.name)
        if lv.is_active(dom):
            lv.call(f"stopping {r.name!r}", dom.destroy)
    j = j.step(jr.utcnow(), "failback: recovered domains held and stopped")
    jr.save_journal(root, j)
    progress("recovered domains stopped")
    # 2. the final point on the original site
    fb = j.extra.get("failback", {})
    final = _point_on(to, j.set_name, fb["final"]) if "final" in fb else _final_point(conn, j, to)
    final_shipped = sum(d.bytes_shipped for d in final.disks)
    home_run = fb.get("home_run") or rc.run_id("failback", datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ"))
    j = j.step(
        jr.utcnow(),
        f"failback: final point {final.point_id} on {to}",
        extra={**j.extra, "failback": {"final": final.point_id, "home_run": home_run}},
    )
    jr.save_journal(root, j)
    progress(f"final point {final.point_id} committed on {to}")
    # 3. this target learns the final point locally: protection resumes with deltas.
    home_bytes = _seed_home(root, j, p=p, final=final, to_root=Path(to.path), home_run=home_run, conn=conn)
    # 4. retire the failover run (its domains and overlays), then start the originals at home. What the start
    # needs is saved first: a failback run again after an interruption in between finishes it from there.
    originals = {r.name: r.original for r in j.domains}
    xmls = {x.name: x.xml for x in p.domains}
    start = HomeStart(final.point_id, home_run, {n: xmls[o] for n, o in originals.items() if o in xmls}, originals)
    pending = _pending_path(root, j.set_name)
    save_file(pending, json.dumps(asdict(start)).encode(), 0o600)
    fo.cleanup_run(conn, root, j)
    faults.die_at("FAILBACK", "after-retire")  # tests: an interruption between retiring the run and starting at home
    _, _, names = _start_home(to, home, j.set_name, start, progress)
    _forget_pending(pending)
    return FailbackResult(final.point_id, final_shipped, home_bytes, names, home_run, time.monotonic() - t0)
