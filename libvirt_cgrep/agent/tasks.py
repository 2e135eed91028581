"""What the agent's children run: one cycle, one probe of the newest point. Typed calls, plain data back.

Guarantees:

- each function runs in a child (``agent.worker``), calls the engine and the replica library directly (no CLI,
  no argv, no text to parse) and returns a frozen dataclass; a failure is raised as our error and reaches the
  agent as its class and message;
- a cycle is exactly ``virt-cgrep sync MEMBERS --target T --set G --fence F --keep N [--keep-hourly H]
  [--keep-daily D]``: one libvirt connection per member, closed afterwards;
- a probe is ``virt-cgrep points T --set G``: a target that is not a replica target yet raises NotFoundError.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.engine.backend import Backend
from libvirt_cgrep.engine.libvirt_backend import LibvirtBackend
from libvirt_cgrep.engine.sync import sync
from libvirt_cgrep.replica.client import Client
from libvirt_cgrep.replica.link import parse_target

#: the longest hold of a suspend fence, ms (``sync --deadline``'s default)
DEADLINE_MS = 2000.0


@dataclass(frozen=True)
class CycleRequest:
    """One group's cycle, as its protection asks for it."""

    uri: str
    members: tuple[str, ...]
    target: str
    set_name: str
    fence: str
    keep: int
    keep_hourly: int = 0
    keep_daily: int = 0


@dataclass(frozen=True)
class CycleDone:
    """A committed point: what the agent records of it."""

    point_id: str
    time_utc: str
    bytes_shipped: int
    changed_bytes: int
    fence_ms: float | None


@dataclass(frozen=True)
class Newest:
    """The newest point of a set (``point_id`` None: the set has none yet)."""

    point_id: str | None = None
    time_utc: str | None = None


def cycle(req: CycleRequest) -> CycleDone:
    """Run one cycle of the group (engine.sync); our error on failure."""
    target = parse_target(req.target)
    policy = Policy(keep_last=req.keep, keep_hourly=req.keep_hourly, keep_daily=req.keep_daily)
    backends: list[Backend] = []
    try:
        # one connection per domain: several guests are paused, cut and resumed in parallel
        backends.extend(LibvirtBackend(lv.connect(req.uri), n, req.uri) for n in req.members)
        result = sync(backends, target, set_name=req.set_name, fence=req.fence, deadline_ms=DEADLINE_MS, policy=policy)
    finally:
        for b in backends:
            with contextlib.suppress(Exception):
                b.close()
    return CycleDone(
        point_id=result.point_id,
        time_utc=result.time_utc,
        bytes_shipped=sum(d.bytes_shipped for d in result.disks),
        changed_bytes=sum(d.changed_bytes for d in result.disks),
        fence_ms=None if result.fence_ms is None else round(result.fence_ms, 3),
    )


def newest(target: str, set_name: str) -> Newest:
    """The newest point of ``set_name`` on ``target``; NotFoundError if the target is not a replica target."""
    with Client(parse_target(target), readonly=True) as client:
        listing = client.points(set_name).listing
    if not listing:
        return Newest()
    last = listing[-1]
    return Newest(str(last["id"]), str(last["time_utc"]))
