"""Failover and test failover on the replica side; test cleanup. The I/O around core/recovery.py.

Guarantees:

- the replica's chain is never written: each recovered disk is a NEW qcow2
  overlay (``qemu-img create -b <point image>``) in the run's own directory
  ``TARGET/SET/recovery/RUN/``; the point and every older point are held
  (never pruned) while the run is not done;
- a refused failover (bad name, unknown point, a device that cannot exist
  here, a running original without ``--force``) changes nothing;
- every step is recorded in the run's journal ``TARGET/SET/recovery/RUN.json``
  before the next one starts, and each step checks what is already done, so
  running the same command again finishes an interrupted run;
- ``cleanup_tests`` removes exactly what its runs created (domains carrying the
  run's recovery metadata, the networks the journal lists, the run's
  directory and journal) and restores the directory modes it widened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from lxml import etree

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.adapters.fs import fsync_dir, save_file
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core import recovery as rc
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.core.protection import NS as PROTECTION_NS
from libvirt_cgrep.errors import ConflictError, NotFoundError, StateError, UsageError
from libvirt_cgrep.recovery.journal import (
    journal_path,
    journals,
    locked,
    recovery_dir,
    remove_journal,
    save_journal,
    unfinished,
    utcnow,
)
from libvirt_cgrep.replica.store import Store

log = logging.getLogger(__name__)
TEST_SUFFIX = "-test"


def _ts() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


# ------------------------------------------------------------------ the target


@dataclass(frozen=True)
class Selection:
    set_name: str
    point: mf.Manifest
    domains: tuple[mf.DomainRecord, ...]


def select(store: Store, name: str, point: str = "latest") -> Selection:
    """GROUP (a set on the target) or DOMAIN (a domain of some set), at ``point`` (an id or ``latest``)."""
    validate_name(name, "group or domain name")
    sets = store.sets()
    if name in sets:
        set_name, only = name, None
    else:
        owners = [s for s in sets if (pts := store.points(s)) and any(d.name == name for d in pts[-1].domains)]
        if not owners:
            raise NotFoundError(f"no set and no domain named {name!r} on target {store.root}")
        if len(owners) > 1:
            raise UsageError(f"domain {name!r} is in several sets ({', '.join(owners)}): name the set")
        set_name, only = owners[0], name
    pts = store.points(set_name)
    if not pts:
        raise NotFoundError(f"set {set_name!r} has no committed point")
    m = pts[-1] if point == "latest" else store.point(set_name, point)
    doms = tuple(d for d in m.domains if only is None or d.name == only)
    if not doms:
        raise NotFoundError(f"point {m.point_id} of set {set_name!r} has no domain {only!r}")
    if any(not d.xml for d in doms):
        raise StateError(f"point {m.point_id} holds no domain XML (bare QEMU guest): nothing to define")
    return Selection(set_name, m, doms)


# ------------------------------------------------------------------ host facts


def host_facts(conn: lv.Connection, xmls: list[str]) -> rc.HostFacts:
    nets = frozenset(lv.call("listing networks", conn.listNetworks))
    sysnet = Path("/sys/class/net")
    bridges = frozenset(p.name for p in sysnet.iterdir() if (p / "bridge").is_dir()) if sysnet.is_dir() else frozenset()
    paths = {p for x in xmls for p in rc.xml_paths(x)}
    return rc.HostFacts(nets, bridges, frozenset(p for p in paths if os.path.exists(p)))


def _recovery_meta(dom: lv.Domain) -> dict[str, str]:
    xml = lv.metadata_or_none(dom, rc.RECOVERY_NS)
    if xml is None:
        return {}
    return {str(k): str(v) for k, v in etree.fromstring(xml.encode()).attrib.items()}


def _existing(conn: lv.Connection, name: str, run_id: str) -> rc.Existing | None:
    dom = lv.find(conn, name)
    if dom is None:
        return None
    return rc.Existing(name, lv.uuid_of(dom), lv.is_active(dom), _recovery_meta(dom).get("run") == run_id)


def _uuid_taken(conn: lv.Connection, uuid: str, name: str) -> bool:
    owner = lv.uuid_owner(conn, uuid)
    return owner is not None and owner != name


def isolated_network_name(set_name: str) -> str:
    return f"cgrep-{set_name}-isolated"[:60]


def _isolated_network_xml(name: str) -> str:
    # no <forward>, no <ip>: an L2 segment on a bridge of its own, reaching nothing else
    return f"<network><name>{name}</name><bridge stp='off'/></network>"


# ------------------------------------------------------------------ failover


@dataclass(frozen=True)
class Result:
    journal: rc.Journal
    resumed: bool
    seconds: float

    def as_dict(self) -> dict[str, object]:
        j = self.journal
        return {
            "run": j.run,
            "kind": j.kind,
            "set": j.set_name,
            "point_id": j.point_id,
            "state": j.state,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "directory": j.directory,
            "domains": [
                {"original": d.original, "name": d.name, "uuid": d.uuid, "step": d.step, "disks": dict(d.overlays)}
                for d in j.domains
            ],
            "networks": list(j.networks),
            "findings": [f.text() for f in j.findings],
        }


def _modes_file(root: Path, set_name: str) -> Path:
    return recovery_dir(root, set_name) / "modes.json"


def _widen(root: Path, set_name: str, paths: list[Path]) -> None:
    """Give QEMU's user search (x) permission on each directory; the old modes go to recovery/modes.json first."""
    f = _modes_file(root, set_name)
    modes: dict[str, int] = json.loads(f.read_bytes()) if f.exists() else {}
    todo = [(p, p.stat().st_mode & 0o7777) for p in paths]
    for p, st in todo:
        if st & 0o011 != 0o011:
            modes.setdefault(str(p), st)
    f.parent.mkdir(mode=0o755, exist_ok=True)
    save_file(f, json.dumps(modes).encode(), 0o600)
    for p, st in todo:
        if st & 0o011 != 0o011:
            os.chmod(p, st | 0o011)


def _restore_modes(root: Path, set_name: str) -> None:
    f = _modes_file(root, set_name)
    if not f.exists():
        return
    for path, mode in json.loads(f.read_bytes()).items():
        with contextlib.suppress(OSError):
            os.chmod(path, int(mode))
    f.unlink()


def _check_reachable(root: Path) -> None:
    """StateError if QEMU (not root) could not reach the target: an ancestor is not searchable by others."""
    owner = lv.qemu_owner()
    if owner is not None and owner[0] == 0:
        return
    for p in root.parents:
        if p.stat().st_mode & 0o001 == 0:
            raise StateError(f"QEMU's user cannot reach {root}: {p} is not searchable by others (chmod o+x {p})")


def _dirs_to_widen(root: Path, set_name: str, m: mf.Manifest, domains: set[str]) -> list[Path]:
    sdir = root / set_name
    out = {root, sdir, sdir / "disks"}
    for d in m.disks:
        if d.domain in domains:
            img = sdir / d.image
            out.update({img.parent, img.parent.parent})
    return sorted(out)


def failover(
    conn: lv.Connection,
    uri: str,
    root: Path,
    name: str,
    *,
    kind: str = "failover",
    point: str = "latest",
    network: str | None = None,
    nics: str | None = None,
    force: bool = False,
    suffix: str = TEST_SUFFIX,
    start: bool = True,
    run_id: str | None = None,
    xml_override: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> Result:
    """Define and start the point's domains on new overlays (see the module docstring)."""
    t0 = time.monotonic()
    if kind not in rc.KINDS:
        raise UsageError(f"unknown recovery kind {kind!r}")
    validate_name(suffix.lstrip("-") or "x", "suffix")
    if network is not None:
        validate_name(network, "network name")
    ro = Store.open(root, create=False, readonly=True)
    sel = select(ro, name, point)
    _check_reachable(root)
    live = rc.active_run(journals(root, sel.set_name), kind)
    if live is not None:
        if point not in ("latest", live.point_id):
            raise ConflictError(f"{kind} run {live.run} of set {sel.set_name} (point {live.point_id}) is not finished")
        progress(f"resuming {live.run}")
        j = _execute(conn, root, live, start, progress)
        return Result(j, True, time.monotonic() - t0)
    if kind == "failover":
        other = rc.active_run(journals(root, sel.set_name), "failover")
        if other is not None:
            raise ConflictError(f"set {sel.set_name} is already failed over (run {other.run})")
    nic_mode = nics or ("isolate" if kind == "test-failover" else "keep")
    if nic_mode not in ("keep", "isolate", "remove"):
        raise UsageError(f"invalid --nics {nic_mode!r}: keep, isolate or remove")
    net = network
    if nic_mode == "isolate":
        net = network or isolated_network_name(sel.set_name)
    run_id = run_id or rc.run_id(kind, _ts())
    rundir = recovery_dir(root, sel.set_name) / run_id
    xml_of = {d.name: (xml_override or {}).get(d.name, d.xml) for d in sel.domains}
    facts = host_facts(conn, list(xml_of.values()))
    sdir = root / sel.set_name
    doms: list[rc.DomainRun] = []
    findings: list[rc.Finding] = []
    new_nets: list[str] = []
    has_nics = any(rc.networks_needed(x) for x in xml_of.values())
    if nic_mode == "isolate" and has_nics and net is not None and net not in facts.networks:
        new_nets.append(net)
        facts = replace(facts, networks=facts.networks | {net})
    for rec in sel.domains:
        home = (names or {}).get(rec.name, rec.name)
        ex = _existing(conn, home, run_id)
        ident = rc.choose_identity(kind, home, rec.uuid, ex, force=force, suffix=suffix, new_uuid=str(uuidlib.uuid4()))
        uid = ident.uuid
        if not ident.replaces and _uuid_taken(conn, uid, ident.name):
            uid = str(uuidlib.uuid4())
        validate_name(ident.name, "domain name")
        files = rundir / home
        overlays = tuple((d.target, str(files / f"{d.target}.qcow2")) for d in sel.point.disks if d.domain == rec.name)
        rw = rc.rewrite_domain_xml(
            xml_of[rec.name],
            name=ident.name,
            uuid=uid,
            overlays=dict(overlays),
            files_dir=str(files),
            nics=rc.NicPolicy(nic_mode, net),
            host=facts,
            recovery={"run": run_id, "kind": kind, "set": sel.set_name, "point": sel.point.point_id, "original": rec.name},
            fresh_macs=kind == "test-failover",
            keep_ns=(PROTECTION_NS,) if kind == "failback" else (),
        )
        findings.extend(rw.findings)
        if ident.note:
            findings.append(rc.Finding(rec.name, "domain", ident.note, f"recovered as {ident.name}"))
        replaced = None
        if ident.replaces:
            replaced = lv.persistent_xml(lv.lookup(conn, home))
        doms.append(rc.DomainRun(rec.name, ident.name, uid, rw.xml, replaced, overlays))
    blocking = [f for f in findings if f.severity == rc.BLOCKING]
    if blocking:
        raise StateError("cannot recover: " + "; ".join(f.text() for f in blocking))
    now = utcnow()
    j = rc.Journal(
        run=run_id,
        kind=kind,
        set_name=sel.set_name,
        point_id=sel.point.point_id,
        uri=uri,
        state="preparing",
        created_utc=now,
        updated_utc=now,
        directory=str(rundir),
        domains=tuple(doms),
        networks=tuple(new_nets),
        findings=tuple(findings),
        log=((now, f"planned {kind} of {', '.join(d.name for d in sel.domains)} at point {sel.point.point_id}"),),
    )
    # Register the hold under the writer lock: no prune can remove the point after this.
    with locked(root) as store:
        store.point(sel.set_name, sel.point.point_id)
        _widen(root, sel.set_name, _dirs_to_widen(root, sel.set_name, sel.point, {d.original for d in doms}))
        j = replace(j, extra={"images": {f"{d.domain}/{d.target}": str(sdir / d.image) for d in sel.point.disks}})
        save_journal(root, j)
    progress(f"journal {journal_path(root, sel.set_name, run_id)}")
    j = _execute(conn, root, j, start, progress)
    return Result(j, False, time.monotonic() - t0)


def _execute(conn: lv.Connection, root: Path, j: rc.Journal, start: bool, progress: Callable[[str], None]) -> rc.Journal:
    """Run (or finish) every step of a planned run; each step is skipped when already done."""
    images: dict[str, str] = j.extra.get("images", {})
    rundir = Path(j.directory)
    rundir.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(rundir.parent, os.stat(rundir.parent).st_mode | 0o011)
    for net in j.networks:
        if lv.find_network(conn, net) is None:
            lv.call(f"creating network {net!r}", conn.networkCreateXML, rc_net_xml(net))
            j = j.step(utcnow(), f"network {net} created")
            save_journal(root, j)
    for d in j.domains:
        if d.step == "planned":
            files = Path(d.overlays[0][1]).parent if d.overlays else rundir / d.name
            files.mkdir(mode=0o755, exist_ok=True)
            for target, path in d.overlays:
                p = Path(path)
                if p.exists():
                    continue
                tmp = p.with_name(f".{p.name}.tmp")
                tmp.unlink(missing_ok=True)
                base = images[f"{d.original}/{target}"]
                qemu_img.create_overlay(tmp, base)
                os.replace(tmp, p)
            fsync_dir(files)
            d = replace(d, step="overlays")
            j = j.with_domain(d).step(utcnow(), f"{d.name}: overlays created")
            save_journal(root, j)
        if d.step == "overlays":
            ex = _existing(conn, d.name, j.run)
            if ex is None or ex.ours or d.replaced_xml is not None:
                lv.call(f"defining {d.name!r}", conn.defineXML, d.xml)
            else:
                raise ConflictError(f"domain {d.name!r} appeared meanwhile and is not this run's; nothing started")
            d = replace(d, step="defined")
            j = j.with_domain(d).step(utcnow(), f"{d.name}: defined")
            save_journal(root, j)
            progress(f"{d.name}: defined")
    if start:
        for d in j.domains:
            if d.step not in ("defined", "started"):
                continue
            dom = lv.lookup(conn, d.name)
            if not lv.is_active(dom):
                lv.call(f"starting {d.name!r}", dom.create)
            if d.step != "started":
                d = replace(d, step="started")
                j = j.with_domain(d).step(utcnow(), f"{d.name}: started")
                save_journal(root, j)
                progress(f"{d.name}: started")
    if j.state == "preparing":
        j = j.step(utcnow(), "active", state="active")
        save_journal(root, j)
    return j


def rc_net_xml(name: str) -> str:
    return _isolated_network_xml(name)


# ------------------------------------------------------------------ cleanup


def _remove_domain(conn: lv.Connection, d: rc.DomainRun, run_id: str) -> str | None:
    """Destroy and undefine the run's domain; never one that lacks this run's metadata."""
    dom = lv.find(conn, d.name)
    if dom is None:
        return None
    meta = _recovery_meta(dom)
    if meta.get("run") != run_id:
        return f"{d.name}: not this run's domain (recovery run {meta.get('run')!r}); left alone"
    if lv.is_active(dom):
        lv.call(f"stopping {d.name!r}", dom.destroy)
    if d.replaced_xml:
        lv.call(f"restoring the definition of {d.name!r}", conn.defineXML, d.replaced_xml)
        return None
    lv.undefine(dom, f"undefining {d.name!r}")
    return None


def cleanup_run(conn: lv.Connection, root: Path, j: rc.Journal) -> list[str]:
    """Remove what run ``j`` created (idempotent); returns what was left alone and why."""
    left: list[str] = []
    if j.state != "cleaning":
        j = j.step(utcnow(), "cleaning", state="cleaning")
        save_journal(root, j)
    for d in j.domains:
        note = _remove_domain(conn, d, j.run)
        if note:
            left.append(note)
    for net in j.networks:
        n = lv.find_network(conn, net)
        if n is None:
            continue
        persistent = bool(lv.call(f"reading network {net!r}", n.isPersistent))
        if lv.call(f"reading network {net!r}", n.isActive):
            lv.call(f"stopping network {net!r}", n.destroy)
        if persistent:
            lv.call(f"undefining network {net!r}", n.undefine)
    rundir = Path(j.directory)
    if rundir.is_dir() and rundir.parent == recovery_dir(root, j.set_name):
        shutil.rmtree(rundir)
    others = [o for o in journals(root, j.set_name) if o.run != j.run and o.state != "done"]
    if not others:
        _restore_modes(root, j.set_name)
    remove_journal(root, j)
    rdir = recovery_dir(root, j.set_name)
    with contextlib.suppress(OSError):
        rdir.rmdir()  # only when empty
    fsync_dir(root / j.set_name)
    return left


def rollback(conn: lv.Connection, root: Path, name: str) -> list[str]:
    """Undo the unfinished failover of set (or domain) ``name``: its domains go (replaced definitions come back)."""
    ro = Store.open(root, create=False, readonly=True)
    runs = unfinished(root, ro, name, "failover")
    if not runs:
        raise NotFoundError(f"no unfinished failover of {name!r} on target {root}")
    notes: list[str] = []
    for j in runs:
        notes += cleanup_run(conn, root, j)
    return notes


def cleanup_tests(conn: lv.Connection, root: Path, name: str) -> tuple[list[str], list[str]]:
    """Remove every unfinished test failover of set (or domain) ``name``: (runs removed, notes)."""
    validate_name(name, "group or domain name")
    ro = Store.open(root, create=False, readonly=True)
    runs = unfinished(root, ro, name, "test-failover")
    if not runs:
        raise NotFoundError(f"no test failover of {name!r} on target {root}")
    notes: list[str] = []
    for j in runs:
        notes += cleanup_run(conn, root, j)
    return [j.run for j in runs], notes
