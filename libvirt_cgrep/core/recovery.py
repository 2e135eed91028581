"""Recovery planning. Pure: manifests' domain XML and plain facts about the host in, a plan and a new XML out.

What this module decides (docs/recovery.md):

- the identity of a recovered domain: a test failover always takes
  ``NAME<suffix>`` and a new UUID; a failover keeps name and UUID when the
  name is free on the connection, replaces a shut-off original's definition
  only with ``force`` (the old definition goes into the journal), and with
  ``force`` next to a still running original takes ``NAME-failover`` and a
  new UUID (one name cannot run twice);
- the rewrite of a domain XML from a manifest: every protected disk on its
  new overlay (never on a point's image), unprotected disks removed,
  removable media ejected, NICs remapped / isolated / removed, host devices
  removed, per-domain files (serial logs, NVRAM) moved into the run's
  directory, our protection and lab metadata replaced by a recovery element;
  every change is reported;
- the journal record of a run (format ``libvirt-cgrep-recovery`` v1), and
  which points running copies hold (those and older are never pruned).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lxml import etree

from libvirt_cgrep.errors import ConflictError, StateError, UsageError

JOURNAL_FORMAT = "libvirt-cgrep-recovery"
JOURNAL_VERSION = 1
RECOVERY_NS = "urn:x-libvirt-cgrep:recovery:1"
OUR_NS_PREFIX = "urn:x-libvirt-cgrep:"
KINDS = ("failover", "test-failover", "failback")
#: Run states. ``active``: the run's domains exist (they may have been stopped since); ``done``: removed or handed over.
STATES = ("preparing", "active", "cleaning", "done")
_RUN = re.compile(r"(failover|test|failback)-[0-9]{8}T[0-9]{6}\.[0-9]{6}Z")

BLOCKING = "blocking"
CHANGED = "changed"


@dataclass(frozen=True)
class Finding:
    """One device (or file) the recovered domain cannot have as it was, and what the rewrite did."""

    domain: str
    device: str
    problem: str
    action: str
    severity: str = CHANGED  # BLOCKING: the failover is refused (nothing changed)

    def text(self) -> str:
        return f"{self.domain}: {self.device}: {self.problem}; {self.action}"


@dataclass(frozen=True)
class HostFacts:
    """What the recovery host offers (gathered by the adapter)."""

    networks: frozenset[str]  # active libvirt networks
    bridges: frozenset[str]  # host bridges
    existing_files: frozenset[str]  # those of the XML's kernel/initrd/loader paths that exist


@dataclass(frozen=True)
class NicPolicy:
    """How NICs are handled: ``keep`` (remap missing ones to ``network``), ``isolate`` onto ``network``, or ``remove``."""

    mode: str = "keep"
    network: str | None = None


@dataclass(frozen=True)
class Rewrite:
    xml: str
    findings: tuple[Finding, ...]


def _local(tag: object) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def rewrite_domain_xml(
    xml: str,
    *,
    name: str,
    uuid: str,
    overlays: Mapping[str, str],
    files_dir: str,
    nics: NicPolicy,
    host: HostFacts,
    recovery: Mapping[str, str],
    fresh_macs: bool = False,
    keep_ns: tuple[str, ...] = (),
) -> Rewrite:
    """The definition of a recovered domain. Pure; raises nothing for host problems: it reports them.

    ``overlays`` maps each protected disk target to its new overlay file;
    ``files_dir`` receives per-domain files (serial logs, NVRAM);
    ``recovery`` becomes the attributes of the recovery metadata element.
    """
    parser = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True)
    root = etree.fromstring(xml.encode(), parser)
    original = root.findtext("name") or "?"
    found: list[Finding] = []

    def note(device: str, problem: str, action: str, severity: str = CHANGED) -> None:
        found.append(Finding(original, device, problem, action, severity))

    _set_text(root, "name", name)
    _set_text(root, "uuid", uuid)
    for tag in ("id",):
        if root.get(tag) is not None:
            del root.attrib[tag]

    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    seen: set[str] = set()
    for disk in list(devices.iterfind("disk")):
        tgt = disk.find("target")
        target = tgt.get("dev", "?") if tgt is not None else "?"
        device = disk.get("device", "disk")
        if target in overlays:
            seen.add(target)
            for child in list(disk):
                if _local(child.tag) in ("source", "backingStore"):
                    disk.remove(child)
            disk.set("type", "file")
            drv = disk.find("driver")
            if drv is None:
                drv = etree.Element("driver", name="qemu")
                disk.insert(0, drv)
            drv.set("type", "qcow2")
            src = etree.Element("source", file=overlays[target])
            drv.addnext(src)
            continue
        if device in ("cdrom", "floppy"):
            src = disk.find("source")
            if src is not None:
                disk.remove(src)
                note(f"{device} {target}", "removable medium not replicated", "ejected")
            continue
        devices.remove(disk)
        note(f"disk {target}", "not replicated (not in the point)", "removed")
    missing = sorted(set(overlays) - seen)
    if missing:
        raise UsageError(f"{original}: the point names disks {', '.join(missing)} that its domain XML lacks")

    for nic in list(devices.iterfind("interface")):
        _rewrite_nic(devices, nic, nics, host, note, fresh_macs=fresh_macs)

    for tag in ("hostdev", "redirdev", "smartcard"):
        for dev in list(devices.iterfind(tag)):
            devices.remove(dev)
            note(tag, "a host device cannot follow the VM to another host", "removed")

    for n, chardev in enumerate([*devices.iterfind("serial"), *devices.iterfind("console"), *devices.iterfind("channel")]):
        log = chardev.find("log")
        if log is not None and log.get("file"):
            log.set("file", f"{files_dir}/{_local(chardev.tag)}{n}.log")
        src = chardev.find("source")
        if chardev.get("type") == "file" and src is not None and src.get("path"):
            src.set("path", f"{files_dir}/{_local(chardev.tag)}{n}.out")
    for g in devices.iterfind("graphics"):
        if g.get("port") not in (None, "-1") or g.get("autoport") == "no":
            g.set("autoport", "yes")
            if "port" in g.attrib:
                del g.attrib["port"]
            note(f"graphics {g.get('type')}", "fixed port", "autoport")

    os_el = root.find("os")
    if os_el is not None:
        nvram = os_el.find("nvram")
        if nvram is not None:
            nvram.text = f"{files_dir}/nvram.fd"
            note("nvram", "UEFI variables are not replicated", "start from the firmware's template")
        for tag in ("kernel", "initrd", "loader"):
            el = os_el.find(tag)
            if el is not None and el.text and el.text not in host.existing_files:
                note(tag, f"{el.text} does not exist on this host", "refused", BLOCKING)
    if devices.find("tpm") is not None:
        note("tpm", "TPM state is not replicated", "a new, empty TPM")

    meta = root.find("metadata")
    if meta is None:
        meta = etree.Element("metadata")
        root.insert(3, meta)
    for child in list(meta):
        ns = etree.QName(child.tag).namespace if isinstance(child.tag, str) else None
        if ns and ns.startswith(OUR_NS_PREFIX) and ns not in keep_ns:
            meta.remove(child)
    el = etree.SubElement(meta, f"{{{RECOVERY_NS}}}recovery", nsmap={"cgreprec": RECOVERY_NS})
    for k, v in sorted(recovery.items()):
        el.set(k, v)
    return Rewrite(etree.tostring(root, encoding="unicode"), tuple(found))


def _set_text(root: etree._Element, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = etree.SubElement(root, tag)
    el.text = text


def _rewrite_nic(
    devices: etree._Element, nic: etree._Element, pol: NicPolicy, host: HostFacts, note: Any, *, fresh_macs: bool
) -> None:
    kind = nic.get("type", "")
    src = nic.find("source")
    where = "" if src is None else (src.get("network") or src.get("bridge") or src.get("dev") or "")
    mac_el = nic.find("mac")
    label = f"interface {mac_el.get('address') if mac_el is not None else kind}"
    if pol.mode == "remove":
        devices.remove(nic)
        note(label, f"{kind} {where}".strip(), "removed (test failover without NICs)")
        return
    if pol.mode == "isolate":
        _attach(nic, str(pol.network))
        note(label, f"{kind} {where}".strip(), f"attached to the isolated network {pol.network}")
    else:
        present = (
            (kind == "network" and where in host.networks)
            or (kind == "bridge" and where in host.bridges)
            or kind in ("user", "ethernet")
        )
        if not present:
            if pol.network:
                _attach(nic, pol.network)
                note(label, f"{kind} {where!r} does not exist on this host", f"remapped to network {pol.network}")
            else:
                note(label, f"{kind} {where!r} does not exist on this host", "refused: remap it with --network NAME", BLOCKING)
    if fresh_macs and mac_el is not None:
        nic.remove(mac_el)


def _attach(nic: etree._Element, network: str) -> None:
    nic.set("type", "network")
    for child in list(nic):
        if _local(child.tag) in ("source", "virtualport", "target"):
            nic.remove(child)
    src = etree.Element("source", network=network)
    mac = nic.find("mac")
    if mac is not None:
        mac.addnext(src)
    else:
        nic.insert(0, src)


def xml_paths(xml: str) -> tuple[str, ...]:
    """The kernel/initrd/loader paths a domain XML needs on the host. Pure."""
    root = etree.fromstring(xml.encode())
    return tuple(el.text for tag in ("kernel", "initrd", "loader") if (el := root.find(f"os/{tag}")) is not None and el.text)


def networks_needed(xml: str) -> tuple[tuple[str, str], ...]:
    """(type, name) of every NIC's network or bridge. Pure."""
    root = etree.fromstring(xml.encode())
    out = []
    for nic in root.iterfind("devices/interface"):
        src = nic.find("source")
        out.append((nic.get("type", ""), "" if src is None else (src.get("network") or src.get("bridge") or "")))
    return tuple(out)


# ------------------------------------------------------------------ identity


@dataclass(frozen=True)
class Existing:
    """A domain already defined on the recovery connection under the original's name."""

    name: str
    uuid: str
    running: bool
    ours: bool  # it is one of this run's own recovered domains (a resumed run)


@dataclass(frozen=True)
class Identity:
    name: str
    uuid: str
    replaces: bool  # the definition replaces a shut-off original's (saved in the journal first)
    note: str | None


FAILOVER_SUFFIX = "-failover"


def choose_identity(
    kind: str, original: str, original_uuid: str | None, existing: Existing | None, *, force: bool, suffix: str, new_uuid: str
) -> Identity:
    """Name and UUID of a recovered domain (see the module docstring). Pure.

    StateError next to a running original without ``force``; ConflictError over a
    shut-off original's definition without ``force``.
    """
    if kind == "test-failover":
        return Identity(f"{original}{suffix}", new_uuid, False, None)
    if existing is None or existing.ours:
        return Identity(original, original_uuid or new_uuid, False, None)
    if existing.running:
        if not force:
            raise StateError(
                f"domain {original!r} is running on this connection: failing over next to it needs --force "
                "(the copy then runs as " + repr(original + FAILOVER_SUFFIX) + " with a new UUID)"
            )
        return Identity(f"{original}{FAILOVER_SUFFIX}", new_uuid, False, f"{original} is running: recovered as a copy")
    if not force:
        raise ConflictError(
            f"domain {original!r} is defined on this connection (shut off): --force replaces its definition "
            "(the old one is kept in the recovery journal)"
        )
    return Identity(original, existing.uuid, True, f"the shut-off definition of {original} is replaced (saved in the journal)")


# ------------------------------------------------------------------ journal


@dataclass(frozen=True)
class DomainRun:
    """One recovered domain of a run."""

    original: str
    name: str
    uuid: str
    xml: str = ""  # the definition we define ('' until planned)
    replaced_xml: str | None = None  # the original's definition we replaced (failover --force)
    overlays: tuple[tuple[str, str], ...] = ()  # (disk target, overlay path)
    step: str = "planned"  # planned -> overlays -> defined -> started


@dataclass(frozen=True)
class Journal:
    """The record of one recovery run, kept in the target at SET/recovery/RUN.json."""

    run: str
    kind: str
    set_name: str
    point_id: str
    uri: str
    state: str
    created_utc: str
    updated_utc: str
    directory: str  # the run's directory (overlays, logs)
    domains: tuple[DomainRun, ...] = ()
    networks: tuple[str, ...] = ()  # networks this run created (removed by cleanup)
    findings: tuple[Finding, ...] = ()
    log: tuple[tuple[str, str], ...] = ()  # (utc, what happened)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = JOURNAL_FORMAT
    version: int = JOURNAL_VERSION

    def step(self, utc: str, what: str, **changes: Any) -> Journal:
        return replace(self, updated_utc=utc, log=(*self.log, (utc, what)), **changes)

    def with_domain(self, d: DomainRun) -> Journal:
        doms = tuple(d if x.original == d.original else x for x in self.domains)
        if not any(x.original == d.original for x in self.domains):
            doms = (*self.domains, d)
        return replace(self, domains=doms)

    def domain(self, original: str) -> DomainRun | None:
        return next((d for d in self.domains if d.original == original), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log"] = [list(x) for x in self.log]
        d["domains"] = [{**asdict(x), "overlays": [list(o) for o in x.overlays]} for x in self.domains]
        return d


def journal_from_dict(d: Mapping[str, Any]) -> Journal:
    """Parse a journal; UsageError for another format or version (a reader must not guess)."""
    if d.get("format") != JOURNAL_FORMAT or d.get("version") != JOURNAL_VERSION:
        raise UsageError(f"recovery journal {d.get('format')!r} v{d.get('version')!r} is not supported (this reader: v1)")
    try:
        return Journal(
            run=d["run"],
            kind=d["kind"],
            set_name=d["set_name"],
            point_id=d["point_id"],
            uri=d["uri"],
            state=d["state"],
            created_utc=d["created_utc"],
            updated_utc=d["updated_utc"],
            directory=d["directory"],
            domains=tuple(
                DomainRun(**{**x, "overlays": tuple((str(a), str(b)) for a, b in x.get("overlays", ()))}) for x in d["domains"]
            ),
            networks=tuple(d.get("networks", ())),
            findings=tuple(Finding(**x) for x in d.get("findings", ())),
            log=tuple((str(a), str(b)) for a, b in d.get("log", ())),
            extra=dict(d.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"malformed recovery journal: {exc}") from exc


def run_id(kind: str, point_like_ts: str) -> str:
    """A run's id from its kind and a UTC timestamp ``YYYYmmddTHHMMSS.ffffffZ``."""
    prefix = {"failover": "failover", "test-failover": "test", "failback": "failback"}[kind]
    rid = f"{prefix}-{point_like_ts}"
    if not _RUN.fullmatch(rid):
        raise UsageError(f"invalid run id {rid!r}")
    return rid


def valid_run_id(rid: str) -> bool:
    return bool(_RUN.fullmatch(rid))


def held_points(journals: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """Points that running copies use: the points of every run not ``done``. Pure.

    Unreadable journals hold everything (the caller passes their point as ``"~"``,
    which sorts after every id).
    """
    return tuple(sorted({str(j.get("point_id", "~")) for j in journals if j.get("state") != "done"}))


def prunable(doomed: Sequence[str], held: Sequence[str]) -> tuple[str, ...]:
    """Of the points retention would delete, those no running copy needs: never a held point or an older one. Pure.

    Deleting point X writes into X's image and replaces its child's, so a point
    below a held one must stay too.
    """
    if not held:
        return tuple(doomed)
    top = max(held)
    return tuple(p for p in doomed if p > top)


def active_run(journals: Sequence[Journal], kind: str) -> Journal | None:
    """The unfinished run of ``kind`` (at most one per set and kind), newest first."""
    live = [j for j in journals if j.kind == kind and j.state != "done"]
    return max(live, key=lambda j: j.run) if live else None
