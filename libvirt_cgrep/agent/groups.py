"""The agent's groups: formed from the protected domains (one scan), and each group's runtime state.

Guarantees:

- a group is formed from the found members' protections by ``core.protection``'s rules (one target, RPO and fence;
  several domains need fence suspend; declared members not found are ``missing``);
- :meth:`GroupSpec.blocked` says why a cycle cannot run now: never a partial group point.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

from libvirt_cgrep.agent import tasks
from libvirt_cgrep.agent.worker import Outcome
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.engine.protection import Scan


@dataclass(frozen=True)
class GroupSpec:
    name: str
    members: tuple[str, ...]
    protection: prot.Protection
    member_states: tuple[str, ...]
    problem: str | None = None
    #: declared members (protect --group) whose domain or protection is not found
    missing: tuple[str, ...] = ()

    def blocked(self) -> str | None:
        """Why a cycle of this group cannot run now (None: it can)."""
        if self.problem:
            return self.problem
        if self.missing:
            return (
                f"member {', '.join(self.missing)} of group {self.name} is missing (undefined, or its protection "
                "was removed other than by 'virt-cgrep unprotect'): no partial group point"
            )
        down = [f"{m} is {s}" for m, s in zip(self.members, self.member_states, strict=True) if s != "running"]
        if down and not all(s == "shutoff" for s in self.member_states):
            return f"member {', '.join(down)}: no partial group point"
        return None


@dataclass(frozen=True)
class CycleEnd:
    """A finished cycle: the child's outcome and its wall-clock start and end (epoch seconds)."""

    outcome: Outcome[tasks.CycleDone]
    started: float
    ended: float


@dataclass
class Runtime:
    spec: GroupSpec
    newest_id: str | None = None
    newest_time: datetime | None = None
    known: bool = False
    failures: int = 0
    last_failure: datetime | None = None
    last_error: str | None = None
    last_duration: float | None = None
    last_bytes: int | None = None
    running_since: datetime | None = None
    future: Future[CycleEnd] | None = None
    probe: Future[Outcome[tasks.Newest]] | None = None
    state: str = "unknown"
    durations: list[float] = field(default_factory=list)
    next_run: datetime | None = None
    reprobe: bool = False
    blocked: str | None = None


def first_target(spec: GroupSpec) -> str:
    return spec.protection.target


def form(scan: Scan, only: tuple[str, ...] | None) -> dict[str, GroupSpec]:
    """The groups of one scan (only those named in ``only``, when given), by name."""
    members: dict[str, list[tuple[str, prot.Protection, str]]] = {}
    for name, d in scan.found.items():
        gname = d.protection.group or name
        if only and gname not in only:
            continue
        members.setdefault(gname, []).append((name, d.protection, d.state))
    specs: dict[str, GroupSpec] = {}
    for gname, ms in members.items():
        ms.sort(key=lambda m: m[0])
        first = ms[0][1]
        problem = prot.group_problem([m[1] for m in ms])
        missing = prot.missing_members({m[0]: m[1] for m in ms}) if first.group else ()
        specs[gname] = GroupSpec(gname, tuple(m[0] for m in ms), first, tuple(m[2] for m in ms), problem, missing)
    return specs
