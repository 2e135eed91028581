"""A domain's protection settings, as stored in its libvirt metadata. Pure.

The element lives under our own namespace, so a domain without it is never
touched by the agent::

    <cgrep:protection xmlns:cgrep="urn:x-libvirt-cgrep:protection:1"
        target="/srv/replica" rpo="300" group="app1" members="db1,web1" keep="24"
        keep-hourly="0" keep-daily="0" fence="suspend" app-consistent="no" mode="snapshot"/>

``members`` is the group's declared membership, written on every member by
``virt-cgrep protect``/``unprotect``: a declared member that is missing (its
domain undefined, or its element removed behind our back) blocks the group's
cycles instead of silently shrinking the group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from lxml import etree

from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.core.rpo import MAX_RPO, MIN_RPO, format_duration
from libvirt_cgrep.errors import StateError, UsageError

NS = "urn:x-libvirt-cgrep:protection:1"
PREFIX = "cgrep"
FENCES = ("none", "suspend")
MODES = ("snapshot", "continuous")


@dataclass(frozen=True)
class Protection:
    target: str
    rpo: int
    group: str | None = None
    members: tuple[str, ...] = ()
    keep: int = 24
    keep_hourly: int = 0
    keep_daily: int = 0
    fence: str = "none"
    app_consistent: bool = False
    mode: str = "snapshot"
    #: continuous mode: seconds between points (the RPO then governs the snapshot-mode fallback)
    interval: int = 60
    #: continuous mode: longest a guest write may wait for the replica, in seconds
    replica_timeout: int = 5

    def __post_init__(self) -> None:
        if not MIN_RPO <= self.rpo <= MAX_RPO:
            raise UsageError(f"RPO {self.rpo}s out of range")
        if self.group is not None:
            validate_name(self.group, "group name")
        elif self.members:
            raise UsageError("members are declared only for a group")
        for m in self.members:
            validate_name(m, "member name")
        if self.fence not in FENCES:
            raise UsageError(f"invalid fence {self.fence!r}")
        if self.mode not in MODES:
            raise UsageError(f"invalid mode {self.mode!r}: this release supports {', '.join(MODES)}")
        if not 1 <= self.interval <= 86400 or not 1 <= self.replica_timeout <= 600:
            raise UsageError("continuous interval or replica timeout out of range")
        for v in (self.keep, self.keep_hourly, self.keep_daily):
            if not 0 <= v <= 100_000:
                raise UsageError("retention counts must be between 0 and 100000")
        if self.keep < 1 and not (self.keep_hourly or self.keep_daily):
            raise UsageError("retention must keep at least one point")

    def to_xml(self) -> str:
        attrs = {
            "target": self.target,
            "rpo": str(self.rpo),
            "keep": str(self.keep),
            "keep-hourly": str(self.keep_hourly),
            "keep-daily": str(self.keep_daily),
            "fence": self.fence,
            "app-consistent": "yes" if self.app_consistent else "no",
            "mode": self.mode,
        }
        if self.mode == "continuous":
            attrs["interval"] = str(self.interval)
            attrs["replica-timeout"] = str(self.replica_timeout)
        if self.group:
            attrs["group"] = self.group
            if self.members:
                attrs["members"] = ",".join(self.members)
        body = " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items())
        return f"<protection {body}/>"

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "rpo": self.rpo,
            "group": self.group,
            "members": list(self.members),
            "keep": self.keep,
            "keep_hourly": self.keep_hourly,
            "keep_daily": self.keep_daily,
            "fence": self.fence,
            "app_consistent": self.app_consistent,
            "mode": self.mode,
            "interval": self.interval,
            "replica_timeout": self.replica_timeout,
        }


def from_xml(xml: str) -> Protection:
    """Parse our metadata element (UsageError if it is malformed)."""
    try:
        el = etree.fromstring(xml.encode())
        return Protection(
            target=el.get("target", ""),
            rpo=int(el.get("rpo", "0")),
            group=el.get("group") or None,
            members=tuple(m for m in el.get("members", "").split(",") if m),
            keep=int(el.get("keep", "24")),
            keep_hourly=int(el.get("keep-hourly", "0")),
            keep_daily=int(el.get("keep-daily", "0")),
            fence=el.get("fence", "none"),
            app_consistent=el.get("app-consistent", "no") == "yes",
            mode=el.get("mode", "snapshot"),
            interval=int(el.get("interval", "60")),
            replica_timeout=int(el.get("replica-timeout", "5")),
        )
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise UsageError(f"malformed protection metadata: {exc}") from exc


def from_domain_xml(xml: str) -> Protection | None:
    """Our element inside a full domain XML (as hooks see it), or None."""
    root = etree.fromstring(xml.encode())
    el = root.find(f"metadata/{{{NS}}}protection")
    if el is None:
        return None
    return from_xml(etree.tostring(el).decode())


def group_problem(members: Sequence[Protection]) -> str | None:
    """Why the protections of one group's found members cannot make one group (None: they can).

    A group has one target, RPO and fence, and several domains are one cut only under fence suspend.
    """
    if not members:
        return None
    first = members[0]
    if any((m.target, m.rpo, m.fence) != (first.target, first.rpo, first.fence) for m in members):
        return "members disagree on target, RPO or fence"
    if len(members) > 1 and first.fence != "suspend":
        return "a group of several domains needs fence suspend"
    return None


def missing_members(found: Mapping[str, Protection]) -> tuple[str, ...]:
    """Declared members of a group (``found``: its members found, by name) that were not found, sorted."""
    declared = {d for p in found.values() if p.group for d in p.members}
    return tuple(sorted(declared - set(found)))


def check_joins(group: str, name: str, have: Protection, new: Protection) -> None:
    """UsageError unless member ``name`` of ``group`` (protected as ``have``) agrees with ``new`` on target, RPO, fence."""
    if (have.target, have.rpo, have.fence) != (new.target, new.rpo, new.fence):
        raise UsageError(
            f"group {group!r} member {name} has target {have.target}, RPO {format_duration(have.rpo)}, fence "
            f"{have.fence}: a group has one target, RPO and fence (name all its members to change them)"
        )


def missing_error(group: str, missing: Sequence[str]) -> StateError:
    """The error of a group cycle or lookup while declared members are missing."""
    return StateError(
        f"member {', '.join(missing)} of group {group!r} is missing: no partial group point "
        "('virt-cgrep unprotect' takes a member out of its group)"
    )
