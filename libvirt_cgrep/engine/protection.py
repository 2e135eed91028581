"""Protection in the domains' metadata: read (the agent's scan, ``sync --group``) and written (``protect``/``unprotect``).

Guarantees:

- metadata is read and written only through ``adapters.libvirt.protection_xml``/``set_protection_xml``;
- ``protect`` and ``unprotect`` keep every member's declared ``members`` list (core.protection's rules);
- nothing is written by ``protect`` until every named domain exists and every value is valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.errors import CgrepError, NotFoundError


@dataclass(frozen=True)
class Protected:
    """A domain carrying a readable protection element."""

    name: str
    dom: lv.Domain
    protection: prot.Protection
    #: running, paused or shutoff (only when read with states)
    state: str = "shutoff"


@dataclass(frozen=True)
class Scan:
    """Every protected domain by name, and the domains whose element is malformed (name -> why)."""

    found: dict[str, Protected]
    problems: dict[str, str]


def scan(conn: lv.Connection, *, states: bool = False) -> Scan:
    """Read every defined domain's protection element (and with ``states`` its state).

    A domain undefined meanwhile, or whose element cannot be read, is skipped; a listing failure raises.
    """
    found: dict[str, Protected] = {}
    problems: dict[str, str] = {}
    for dom in lv.list_domains(conn):
        try:
            xml = lv.protection_xml(dom, prot.NS)
            name = lv.domain_name(dom)
        except CgrepError:
            continue
        if xml is None:
            continue
        try:
            p = prot.from_xml(xml)
        except CgrepError as exc:
            problems[name] = str(exc)
            continue
        state = "shutoff"
        if states:
            try:
                word = lv.state(dom)
            except CgrepError:  # undefined since the listing: not a broken connection, skip it
                continue
            state = word if word in ("running", "paused") else "shutoff"
        found[name] = Protected(name, dom, p, state)
    return Scan(found, problems)


def write(dom: lv.Domain, name: str, p: prot.Protection | None) -> None:
    """Set (or with None remove) our element, live and persistent."""
    lv.set_protection_xml(dom, name, prot.NS, prot.PREFIX, None if p is None else p.to_xml())


def leave(found: dict[str, Protected], group: str, gone: set[str]) -> list[str]:
    """Drop ``gone`` from the declared members of ``group``'s other members; return who was rewritten."""
    done = []
    for n, d in sorted(found.items()):
        p = d.protection
        if p.group == group and n not in gone and set(p.members) & gone:
            write(d.dom, n, replace(p, members=tuple(m for m in p.members if m not in gone)))
            done.append(n)
    return done


def group_members(conn: lv.Connection, group: str) -> list[str]:
    """The members of protection group ``group``; StateError if a declared member is missing."""
    found = {n: d.protection for n, d in scan(conn).found.items() if d.protection.group == group}
    if not found:
        raise NotFoundError(f"no protected domain is in group {group!r}")
    missing = prot.missing_members(found)
    if missing:
        raise prot.missing_error(group, missing)
    return sorted(found)


def protect(conn: lv.Connection, names: Sequence[str], p: prot.Protection) -> tuple[str, ...]:
    """Write ``p`` on every named domain (and its group's members list on the others); return the members."""
    doms = [lv.lookup(conn, n) for n in names]  # every domain exists before anything is written
    found = scan(conn).found
    group = p.group
    members: tuple[str, ...] = ()
    others: list[Protected] = []
    if group:
        declared = set(names)
        for n, d in found.items():
            if d.protection.group != group:
                continue
            declared |= {n, *d.protection.members}
            if n not in names:
                prot.check_joins(group, n, d.protection, p)
                others.append(d)
        members = tuple(sorted(declared))
    # a domain moving to another group (or to none) leaves its old group first
    for n in names:
        old = found.get(n)
        if old is not None and old.protection.group and old.protection.group != group:
            leave(found, old.protection.group, {n})
    for n, dom in zip(names, doms, strict=True):
        write(dom, n, replace(p, members=members))
    for d in others:
        if d.protection.members != members:
            write(d.dom, d.name, replace(d.protection, members=members))
    return members


@dataclass(frozen=True)
class Unprotected:
    """What ``unprotect`` did for one name: removed its element (or it had none), left ``group`` (the others rewritten)."""

    name: str
    removed: bool
    group: str | None
    rest: tuple[str, ...]


def unprotect(
    conn: lv.Connection, names: Sequence[str], report: Callable[[Unprotected], None] = lambda u: None
) -> list[Unprotected]:
    """Remove each named domain's element and take it out of its group (by name when its domain or element is gone).

    ``report`` is called after each name is done.
    """
    found = scan(conn).found
    plan: list[tuple[str, lv.Domain | None, str | None]] = []
    for name in names:
        # a declared member whose domain or element is gone leaves its group by name
        groups = sorted(
            {d.protection.group for n, d in found.items() if d.protection.group and name in d.protection.members and n != name}
        )
        try:
            dom = lv.lookup(conn, name)
        except NotFoundError:
            if not groups:
                raise
            plan += [(name, None, g) for g in groups]
            continue
        if lv.protection_xml(dom, prot.NS) is None:
            if not groups:
                raise NotFoundError(f"{name} is not protected")
            plan += [(name, None, g) for g in groups]
            continue
        old = found.get(name)
        plan.append((name, dom, old.protection.group if old else None))
    done = []
    for name, dom, group in plan:
        if dom is not None:
            write(dom, name, None)
        rest = leave(found, group, {name}) if group else []
        done.append(Unprotected(name, dom is not None, group, tuple(rest)))
        report(done[-1])
    return done
