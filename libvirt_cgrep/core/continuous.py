"""Continuous mode, pure part: replica-side cut plans, mirror states, export names.

Guarantees of a replica cut plan (:func:`plan_cut`):

- exactly ONE transaction over every exported disk of the set (every domain
  of a group), so the cut is consistent across all of them;
- each disk gets a new live overlay whose qcow2 backing is the name the
  frozen image takes once committed (``<point id>.qcow2``), inside the same
  directory, so every committed point's chain stays inside the target;
- new node and file names never collide with the live ones (a sequence number).

A restart without a full recopy (:func:`check_resume`): only when the
replica's newest point is the *final* point of a clean stop, whose record
names, for every disk, the overlay added while the domain was shut off
(``top``, now the disk's active image) and the identity (path, size,
device, inode, mtime) of every image below it, all unchanged: then the
disk's content up to the stop is exactly that point (proved by digests at
the stop), and only what the top holds must be copied.

Mirror state of a set (:func:`mirror_state`): ``in-sync`` only when every
disk's job is READY and none failed since; ``degraded`` as soon as one job
failed, was cancelled or vanished; else ``syncing``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.names import validate_name

#: States a disk's copy job can be in, as the primary sees them.
JOB_STATES = ("starting", "syncing", "ready", "failed", "cancelled", "gone")
MIRROR_STATES = ("syncing", "in-sync", "degraded", "stopped")
#: Version of the resume record a final point carries in its manifest's ``extra["resume"]``.
RESUME_VERSION = 1
_OVERLAY = re.compile(r"^(?P<stem>.+?)\.cgrep-(?P<pid>[^/]+)\.qcow2$")


def export_name(domain: str, target: str) -> str:
    """The NBD export name of one disk (names are validated: no separators to escape)."""
    return f"{validate_name(domain, 'domain name')}.{validate_name(target, 'disk target')}"


def live_file(domain: str, target: str, seq: int) -> str:
    """A live image, relative to the set directory: a staging name, so an unclean end discards it."""
    return f"disks/{domain}/{target}/.staging-live{seq}.qcow2"


def live_node(seq: int, index: int) -> str:
    """A daemon node name (<= 31 chars) for disk ``index`` of live generation ``seq``."""
    return f"lv{seq}x{index}"


@dataclass(frozen=True)
class LiveDisk:
    """One exported disk: its live image (relative to the set directory), node and committed backing."""

    domain: str
    target: str
    size: int
    node: str
    image: str
    backing: str | None


@dataclass(frozen=True)
class CutStep:
    """One disk of a replica cut: ``old`` is frozen as ``final``, ``new`` (backing ``new_backing``) takes the writes."""

    old: LiveDisk
    final: str
    new: LiveDisk


@dataclass(frozen=True)
class ReplicaCut:
    point_id: str
    seq: int
    steps: tuple[CutStep, ...]

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(node, overlay) of every action of the ONE transaction."""
        return tuple((s.old.node, s.new.node) for s in self.steps)


def first_live(disks: Sequence[tuple[str, str, int]], seq: int, over: str | None = None) -> tuple[LiveDisk, ...]:
    """The first live images of a session: fresh bases (the mirror's full copy fills each one completely).

    So a session's first point never reads an older point, and retention may
    merge older points while the daemon runs. A resumed session (``over``: the
    final point it restarts from) starts on overlays of that point's images
    instead, in their directory, as a cut's do.
    """
    backing = None if over is None else mf.point_file(over)
    return tuple(
        LiveDisk(domain, target, size, live_node(seq, i), live_file(domain, target, seq), backing)
        for i, (domain, target, size) in enumerate(disks)
    )


def plan_cut(point_id: str, live: Sequence[LiveDisk], seq: int) -> ReplicaCut:
    """ONE transaction over every live disk: freeze each as ``<point_id>.qcow2``, continue on a new overlay."""
    if not mf.valid_point_id(point_id):
        raise ValueError(f"invalid point id {point_id!r}")
    if not live:
        raise ValueError("a cut needs at least one disk")
    steps = []
    for i, d in enumerate(live):
        final = mf.disk_image_name(d.domain, d.target, point_id)
        new = LiveDisk(d.domain, d.target, d.size, live_node(seq, i), live_file(d.domain, d.target, seq), mf.point_file(point_id))
        if new.node == d.node or new.image == d.image:
            raise ValueError(f"live generation {seq} collides with the current one")
        steps.append(CutStep(d, final, new))
    return ReplicaCut(point_id, seq, tuple(steps))


def mirror_state(jobs: Mapping[str, str]) -> str:
    """``in-sync`` iff every job is ready; ``degraded`` if any failed, was cancelled or is gone; else ``syncing``."""
    if not jobs or any(s in ("failed", "cancelled", "gone") for s in jobs.values()):
        return "degraded"
    if all(s == "ready" for s in jobs.values()):
        return "in-sync"
    return "syncing"


def resync_percent(done: int | None, total: int | None) -> float | None:
    """A resync's progress in percent (QEMU's counters: ``total`` may still grow), None when unknown."""
    if done is None or not total:
        return None
    return min(100.0, 100.0 * done / total)


def mode_label(mode: str, mirror: str | None, done: int | None = None, total: int | None = None) -> str:
    """``status``'s MODE column: ``continuous/syncing 42%``, ``continuous/in-sync``, or the bare mode."""
    if mirror is None:
        return mode
    pct = resync_percent(done, total) if mirror == "syncing" else None
    return f"{mode}/{mirror}" if pct is None else f"{mode}/{mirror} {pct:.0f}%"


def mean_write_ms(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Mean write latency (ms) between two (operations, total ns) samples; None without writes (or a counter reset)."""
    ops, ns = after[0] - before[0], after[1] - before[1]
    if ops <= 0 or ns < 0:
        return None
    return ns / ops / 1e6


# ----------------------------------------------------------------- restart without a recopy
@dataclass(frozen=True)
class FileId:
    """What identifies an image file's content without reading it: any write changes ``mtime_ns``."""

    path: str
    size: int
    dev: int
    ino: int
    mtime_ns: int


@dataclass(frozen=True)
class ResumeDisk:
    """One disk of a final point: the overlay its domain starts on next, the images below it, their digest."""

    domain: str
    target: str
    top: str
    below: tuple[FileId, ...]
    digest: str


def overlay_path(top: str, point_id: str) -> str:
    """The overlay added over ``top`` after the final point ``point_id``: beside it, ours by its name.

    Not :func:`core.plan.overlay_path` on purpose: snapshot mode's overlays
    (``.cgrep-<lowercase token>``) are folded away by its cycles
    (``engine.sync.primary_base`` skips them), while a restart overlay holds
    the guest's writes since it booted and must stay the disk's base for those
    cycles; :func:`fold_plan` likewise folds only restart overlays.
    """
    d, name = os.path.split(top)
    m = _OVERLAY.match(name)
    stem = m.group("stem") if m else (name[: -len(".qcow2")] if name.endswith(".qcow2") else name)
    return os.path.join(d, f"{stem}.cgrep-{point_id}.qcow2")


def is_overlay(path: str) -> bool:
    """True if ``path`` is named like an overlay :func:`overlay_path` makes."""
    m = _OVERLAY.match(os.path.basename(path))
    return bool(m and mf.valid_point_id(m.group("pid")))


def fold_plan(chain: Sequence[str]) -> tuple[str, str] | None:
    """(base, top) to fold at a start: a previous restart's overlay just below the active image, else None."""
    if len(chain) >= 3 and is_overlay(chain[1]):
        return chain[2], chain[1]
    return None


def resume_to_dict(disks: Sequence[ResumeDisk]) -> dict[str, Any]:
    return {
        "version": RESUME_VERSION,
        "disks": [
            {
                "domain": d.domain,
                "target": d.target,
                "top": d.top,
                "digest": d.digest,
                "below": [[f.path, f.size, f.dev, f.ino, f.mtime_ns] for f in d.below],
            }
            for d in disks
        ],
    }


def resume_from_dict(data: object) -> tuple[ResumeDisk, ...] | None:
    """The record of a final point's ``extra["resume"]``; None if absent, of another version or malformed."""
    if not isinstance(data, dict) or data.get("version") != RESUME_VERSION:
        return None
    try:
        return tuple(
            ResumeDisk(
                str(d["domain"]),
                str(d["target"]),
                str(d["top"]),
                tuple(FileId(str(p), int(s), int(dv), int(i), int(m)) for p, s, dv, i, m in d["below"]),
                str(d["digest"]),
            )
            for d in data["disks"]
        )
    except (KeyError, TypeError, ValueError):
        return None


def check_resume(
    record: Sequence[ResumeDisk] | None,
    chains: Mapping[tuple[str, str], Sequence[str]],
    ids: Mapping[str, FileId | None],
) -> str | None:
    """None if every disk may restart without a recopy, else why not. Pure.

    ``chains``: each protected disk's current chain (active image first);
    ``ids``: the current identity of every image named there (None: gone).
    """
    if not record:
        return "the replica's newest point is not the final point of a clean stop"
    rec = {(d.domain, d.target): d for d in record}
    if set(rec) != set(chains):
        return f"the disks differ from the final point's ({sorted(rec)} there, {sorted(chains)} now)"
    for key, chain in sorted(chains.items()):
        r = rec[key]
        name = "/".join(key)
        if not chain or chain[0] != r.top:
            return f"{name}: its active image is {chain[0] if chain else None}, not the overlay {r.top}"
        below = tuple(chain[1:])
        if below != tuple(f.path for f in r.below):
            return f"{name}: the images below {r.top} changed ({list(below)})"
        for f in r.below:
            if ids.get(f.path) != f:
                return f"{name}: {f.path} changed since the final point"
    return None
