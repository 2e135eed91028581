"""Lab domains: persistent TCG libvirt domains running the dependent-write workload.

A lab domain is marked by a ``<lab>`` element in our lab namespace inside its
``<metadata>``; ``lab down`` and ``lab list`` act only on domains so marked, so
the lab can never destroy an operator's VM. Its files live in one directory,
``$CGREP_LAB_DIR/NAME`` (default ``/var/lib/libvirt-cgrep/lab/NAME``).

``up`` either leaves a defined, running domain whose workload acknowledged
its first record, or changes nothing (it rolls back what it made).

A lab *group* G of V VMs (``group_up``) is V lab domains ``G-0 .. G-{V-1}``
whose dependent-write chain spans the VMs: record n is written by member
``n % V``, and only after a host-side relay (:mod:`libvirt_cgrep.lab.relay`)
saw record n-1 acknowledged on the previous member's console. The group's own
directory ``$CGREP_LAB_DIR/G`` holds ``group.json`` (the members), the relay's
pid file, status and log. ``down`` of the group name or of any member removes
the whole group, relay first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from lxml import etree

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.core.names import disk_target, validate_name
from libvirt_cgrep.errors import CgrepError, ConflictError, NotFoundError, StateError, UsageError
from libvirt_cgrep.lab import console, paths, relay

#: Where the lab's files live (lab/paths.py), under the names the lab's callers know.
lab_root = paths.lab_root
group_dir = paths.group_dir
LAB_NS = "urn:x-libvirt-cgrep:lab:1"
LAB_PREFIX = "cgreplab"
MODES = ("write", "scan", "idle")
GROUP_FILE = "group.json"
MAX_GROUP_VMS = 16


@dataclass(frozen=True)
class LabSpec:
    """Everything that defines a lab domain; plain data."""

    name: str
    disks: int
    size: int
    kernel: Path
    initrd: Path
    directory: Path
    mode: str = "write"
    rate: int = 0
    bs: int = 4096
    memory_mib: int = 192
    report_ms: int = 100
    #: QEMU I/O threads for the disks (0: the disks run in QEMU's main loop; N: disk i on thread i % N + 1)
    iothreads: int = 0
    group: str | None = None
    vm: int = 0
    vms: int = 1

    def images(self) -> tuple[Path, ...]:
        return tuple(self.directory / f"{disk_target(i)}.qcow2" for i in range(self.disks))

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    def cmdline(self) -> str:
        line = (
            "console=ttyS0 quiet loglevel=1 panic=-1 "
            f"cgrep.mode={self.mode} cgrep.bs={self.bs} cgrep.rate={self.rate} cgrep.report_ms={self.report_ms}"
        )
        if self.vms > 1:
            line += f" cgrep.vms={self.vms} cgrep.vm={self.vm}"
        return line


def _iothread(spec: LabSpec, disk: int) -> str:
    return f" iothread='{disk % spec.iothreads + 1}'" if spec.iothreads else ""


def domain_xml(spec: LabSpec, dom_uuid: str) -> str:
    """The libvirt definition of a lab domain (pure)."""
    disks = "\n".join(
        f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'{_iothread(spec, i)}/>
      <source file={quoteattr(str(img))}/>
      <target dev='{disk_target(i)}' bus='virtio'/>
      <serial>cgrep-d{i}</serial>
    </disk>"""
        for i, img in enumerate(spec.images())
    )
    group = f" group={quoteattr(spec.group)} vm='{spec.vm}' vms='{spec.vms}'" if spec.group else ""
    return f"""<domain type='qemu'>
  <name>{spec.name}</name>
  <uuid>{dom_uuid}</uuid>
  <metadata>
    <{LAB_PREFIX}:lab xmlns:{LAB_PREFIX}='{LAB_NS}' disks='{spec.disks}' size='{spec.size}' mode='{spec.mode}'
        rate='{spec.rate}' bs='{spec.bs}' dir={quoteattr(str(spec.directory))}{group}/>
  </metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>{f"<iothreads>{spec.iothreads}</iothreads>" if spec.iothreads else ""}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{spec.kernel}</kernel>
    <initrd>{spec.initrd}</initrd>
    <cmdline>{spec.cmdline()}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}
    <controller type='usb' model='none'/>
    <serial type='pty'>
      <log file={quoteattr(str(spec.console_log))} append='on'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass(frozen=True)
class LabDomain:
    """A lab domain as seen now."""

    name: str
    state: str
    disks: int
    size: int
    mode: str
    directory: Path
    images: tuple[Path, ...]
    last_ack: console.Ack | None
    console_error: str | None
    group: str | None = None
    vm: int = 0
    vms: int = 1
    last_done: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state,
            "disks": self.disks,
            "size": self.size,
            "mode": self.mode,
            "directory": str(self.directory),
            "images": [str(p) for p in self.images],
            "last_ack": self.last_ack.seq if self.last_ack else None,
            "last_ack_guest_ms": self.last_ack.t_ms if self.last_ack else None,
            "lat_max_us": self.last_ack.lat_max_us if self.last_ack else None,
            "console_error": self.console_error,
            "group": self.group,
            "vm": self.vm,
            "vms": self.vms,
            "last_done": self.last_done,
        }


def _lab_meta(dom: lv.Domain) -> etree._Element | None:
    xml = lv.metadata(dom, LAB_NS, f"reading metadata of {lv.domain_name(dom)!r}")
    return None if xml is None else etree.fromstring(xml.encode())


def read_console(path: Path, tail: int = 64 << 10) -> console.ConsoleState:
    """Parse the tail of a console log (empty state if there is none yet)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        text = ""
    return console.parse(text)


def _describe(conn: lv.Connection, dom: lv.Domain, meta: etree._Element) -> LabDomain:
    directory = Path(meta.get("dir", ""))
    cons = read_console(directory / "console.log")
    images = tuple(Path(d.path) for d in lv.disks_from_xml(lv.persistent_xml(dom)) if d.path and d.device == "disk")
    return LabDomain(
        name=dom.name(),
        state=lv.state(dom),
        disks=int(meta.get("disks", "0")),
        size=int(meta.get("size", "0")),
        mode=meta.get("mode", "write"),
        directory=directory,
        images=images,
        last_ack=cons.ack,
        console_error=cons.error,
        group=meta.get("group"),
        vm=int(meta.get("vm", "0")),
        vms=int(meta.get("vms", "1")),
        last_done=cons.done,
    )


def get(conn: lv.Connection, name: str) -> LabDomain:
    """The lab domain ``name``; NotFoundError, or UsageError if it is not a lab domain."""
    validate_name(name, "domain name")
    dom = lv.lookup(conn, name)
    meta = _lab_meta(dom)
    if meta is None:
        raise StateError(f"domain {name!r} is not a lab domain (it has no lab metadata); the lab leaves it alone")
    return _describe(conn, dom, meta)


def list_all(conn: lv.Connection) -> tuple[LabDomain, ...]:
    """Every lab domain on the connection, sorted by name."""
    out = []
    for dom in lv.call("listing domains", conn.listAllDomains, 0):
        try:
            meta = _lab_meta(dom)
            if meta is not None:
                out.append(_describe(conn, dom, meta))
        except NotFoundError:
            continue  # undefined meanwhile
    return tuple(sorted(out, key=lambda d: d.name))


def wait_for_ack(path: Path, *, after: int = -2, timeout: float = 90.0) -> console.Ack:
    """Wait until the console shows an ACK with ``seq > after``; StateError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_console(path)
        if st.error:
            raise StateError(f"lab workload failed: {st.error}")
        if st.ack is not None and st.ack.seq > after:
            return st.ack
        if time.monotonic() > deadline:
            raise StateError(f"lab guest showed no workload progress within {timeout:.0f} s (see {path})")
        time.sleep(0.1)


def wait_for_scan(path: Path, *, timeout: float = 90.0) -> dict[str, str]:
    """Wait for the workload's SCAN line (scan mode) and return its fields."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_console(path)
        if st.scan is not None:
            return st.scan
        if st.error:
            raise StateError(f"lab workload failed: {st.error}")
        if time.monotonic() > deadline:
            raise StateError(f"lab guest did not finish its scan within {timeout:.0f} s (see {path})")
        time.sleep(0.1)


def up(conn: lv.Connection, spec: LabSpec, *, wait: bool = True, timeout: float = 90.0) -> LabDomain:
    """Create, define and start a lab domain; on any failure, undo everything."""
    validate_name(spec.name, "domain name")
    if spec.mode not in MODES:
        raise UsageError(f"invalid lab mode {spec.mode!r}: expected one of {', '.join(MODES)}")
    try:
        lv.lookup(conn, spec.name)
    except NotFoundError:
        pass
    else:
        raise ConflictError(f"domain {spec.name!r} already exists")
    if spec.directory.exists():
        raise ConflictError(
            f"lab directory {str(spec.directory)!r} already exists (left over? run 'virt-cgrep lab down {spec.name}')"
        )
    dom: lv.Domain | None = None
    try:
        spec.directory.mkdir(parents=True, mode=0o755)
        os.chmod(spec.directory.parent, 0o755)
        for img in spec.images():
            qemu_img.create_qcow2(img, spec.size)
        dom = lv.call(f"defining domain {spec.name!r}", conn.defineXML, domain_xml(spec, str(uuid.uuid4())))
        lv.call(f"starting domain {spec.name!r}", dom.create)
        if wait:
            if spec.mode == "write":
                wait_for_ack(spec.console_log, timeout=timeout)
            elif spec.mode == "scan":
                wait_for_scan(spec.console_log, timeout=timeout)
        return get(conn, spec.name)
    except BaseException:
        _remove(dom, spec.directory)
        raise


def _remove(dom: lv.Domain | None, directory: Path) -> None:
    """Destroy and undefine ``dom`` (if any) and remove ``directory``; best effort."""
    if dom is not None:
        lv.discard(dom)
    shutil.rmtree(directory, ignore_errors=True)


def down(conn: lv.Connection, name: str) -> None:
    """Destroy a lab domain, undefine it and remove its directory (idempotent on leftovers).

    For a lab group, or any member of one, the whole group goes (:func:`group_down`).
    """
    validate_name(name, "domain name")
    try:
        dom = lv.lookup(conn, name)
    except NotFoundError:
        leftover = lab_root() / name
        if (leftover / GROUP_FILE).is_file():
            group_down(conn, name)
            return
        if leftover.is_dir():
            shutil.rmtree(leftover)
            return
        raise
    meta = _lab_meta(dom)
    if meta is None:
        raise StateError(f"domain {name!r} is not a lab domain (it has no lab metadata); refusing to destroy it")
    group = meta.get("group")
    if group:
        group_down(conn, group)
        return
    directory = Path(meta.get("dir", ""))
    if not directory.is_absolute() or directory.name != name:
        raise StateError(f"lab metadata of {name!r} names an unexpected directory {str(directory)!r}; refusing")
    _remove(dom, directory)
    try:
        lv.lookup(conn, name)
    except NotFoundError:
        return
    raise CgrepError(f"domain {name!r} could not be removed")


# ------------------------------------------------------------------ groups


@dataclass(frozen=True)
class LabGroup:
    """A lab group as seen now: its members and its relay."""

    name: str
    directory: Path
    members: tuple[LabDomain, ...]
    missing: tuple[str, ...]
    relay: relay.RelayStatus

    @property
    def last_done(self) -> int | None:
        done = [m.last_done for m in self.members if m.last_done is not None]
        return max(done) if done else None

    def images(self) -> tuple[Path, ...]:
        return tuple(img for m in self.members for img in m.images)

    def as_dict(self) -> dict[str, object]:
        return {
            "group": self.name,
            "directory": str(self.directory),
            "vms": len(self.members) + len(self.missing),
            "members": [m.as_dict() for m in self.members],
            "missing": list(self.missing),
            "last_done": self.last_done,
            "relay": self.relay.as_dict(),
        }


def member_names(group: str, vms: int) -> tuple[str, ...]:
    """The domain names of a group's members: ``G-0 .. G-{V-1}``."""
    return tuple(validate_name(f"{group}-{i}", "domain name") for i in range(vms))


def _group_file_members(group: str) -> tuple[str, ...]:
    try:
        data = json.loads((group_dir(group) / GROUP_FILE).read_text())
    except (OSError, ValueError):
        return ()
    names = data.get("members") if isinstance(data, dict) else None
    if not isinstance(names, list):
        return ()
    return tuple(n for n in names if isinstance(n, str))


def is_group(conn: lv.Connection, name: str) -> bool:
    """True if ``name`` names a lab group (its directory or a member says so)."""
    validate_name(name, "group name")
    if (group_dir(name) / GROUP_FILE).is_file():
        return True
    return any(d.group == name for d in list_all(conn))


def get_group(conn: lv.Connection, group: str) -> LabGroup:
    """The lab group ``group``; NotFoundError if it has neither members nor a directory."""
    validate_name(group, "group name")
    names = _group_file_members(group) or tuple(d.name for d in list_all(conn) if d.group == group)
    if not names and not (group_dir(group) / GROUP_FILE).is_file():
        raise NotFoundError(f"lab group {group!r} not found")
    members: list[LabDomain] = []
    missing: list[str] = []
    for name in names:
        try:
            member = get(conn, name)
        except NotFoundError:
            missing.append(name)
            continue
        if member.group != group:
            raise StateError(f"domain {name!r} is not a member of lab group {group!r}")
        members.append(member)
    members.sort(key=lambda m: m.vm)
    return LabGroup(group, group_dir(group), tuple(members), tuple(missing), relay.status(group_dir(group)))


def wait_for_done(paths: Sequence[Path], *, after: int = -1, timeout: float = 90.0) -> int:
    """Wait until every console shows a DONE line with ``seq > after``; return the highest DONE seen."""
    deadline = time.monotonic() + timeout
    while True:
        states = [read_console(p) for p in paths]
        for p, st in zip(paths, states, strict=True):
            if st.error:
                raise StateError(f"lab workload failed: {st.error} (see {p})")
        done = [st.done for st in states]
        if all(d is not None and d > after for d in done):
            return max(d for d in done if d is not None)
        if time.monotonic() > deadline:
            slow = [str(p) for p, d in zip(paths, done, strict=True) if d is None or d <= after]
            raise StateError(f"lab group showed no progress on every member within {timeout:.0f} s (see {', '.join(slow)})")
        time.sleep(0.1)


def group_up(conn: lv.Connection, group: str, specs: Sequence[LabSpec], *, wait: bool = True, timeout: float = 120.0) -> LabGroup:
    """Create a lab group from its members' specs (made by :func:`group_specs`); on any failure, undo everything.

    Starts every member, waits for each one's scan, starts the relay (write
    mode) and waits until the chain ran across every member.
    """
    validate_name(group, "group name")
    if len(specs) < 2:
        raise UsageError("a lab group needs at least 2 VMs")
    for i, spec in enumerate(specs):
        if spec.group != group or spec.vm != i or spec.vms != len(specs):
            raise UsageError(f"member {spec.name!r} is not member {i} of {len(specs)} of group {group!r}")
    gdir = group_dir(group)
    if gdir.exists():
        raise ConflictError(f"lab directory {str(gdir)!r} already exists (left over? run 'virt-cgrep lab down {group}')")
    for name in (group, *(s.name for s in specs)):
        try:
            lv.lookup(conn, name)
        except NotFoundError:
            continue
        raise ConflictError(f"domain {name!r} already exists")
    made: list[LabSpec] = []
    try:
        gdir.mkdir(parents=True, mode=0o755)
        record = {"group": group, "vms": len(specs), "members": [s.name for s in specs], "mode": specs[0].mode}
        (gdir / GROUP_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for spec in specs:
            up(conn, spec, wait=False)
            made.append(spec)
        if wait or specs[0].mode == "write":
            for spec in specs:
                if spec.mode in ("write", "scan"):
                    wait_for_scan(spec.console_log, timeout=timeout)
        if specs[0].mode == "write":
            relay.start(gdir, group, [s.name for s in specs], uri=lv.call("reading the connection URI", conn.getURI))
            if wait:
                wait_for_done([s.console_log for s in specs], timeout=timeout)
        return get_group(conn, group)
    except BaseException:
        relay.stop(gdir, group)
        for spec in made:
            try:
                dom: lv.Domain | None = lv.lookup(conn, spec.name)
            except CgrepError:
                dom = None
            _remove(dom, spec.directory)
        shutil.rmtree(gdir, ignore_errors=True)
        raise


def group_specs(group: str, vms: int, **kw: object) -> tuple[LabSpec, ...]:
    """The member specs of group ``group``: ``kw`` as for :class:`LabSpec` (without name, directory and group fields)."""
    validate_name(group, "group name")
    if not 2 <= vms <= MAX_GROUP_VMS:
        raise UsageError(f"a lab group has 2-{MAX_GROUP_VMS} VMs, got {vms}")
    return tuple(
        LabSpec(name=name, directory=lab_root() / name, group=group, vm=i, vms=vms, **kw)  # type: ignore[arg-type]
        for i, name in enumerate(member_names(group, vms))
    )


def group_down(conn: lv.Connection, group: str) -> tuple[str, ...]:
    """Stop the relay, remove every member and the group directory; returns the members removed."""
    validate_name(group, "group name")
    gdir = group_dir(group)
    relay.stop(gdir, group)
    names = set(_group_file_members(group))
    names.update(d.name for d in list_all(conn) if d.group == group)
    if not names and not gdir.is_dir():
        raise NotFoundError(f"lab group {group!r} not found")
    removed = []
    for name in sorted(names):
        try:
            dom = lv.lookup(conn, name)
        except NotFoundError:
            shutil.rmtree(lab_root() / name, ignore_errors=True)
            continue
        meta = _lab_meta(dom)
        if meta is None or meta.get("group") != group:
            raise StateError(f"domain {name!r} is not a member of lab group {group!r}; refusing to destroy it")
        directory = Path(meta.get("dir", ""))
        if not directory.is_absolute() or directory.name != name:
            raise StateError(f"lab metadata of {name!r} names an unexpected directory {str(directory)!r}; refusing")
        _remove(dom, directory)
        removed.append(name)
    for name in removed:
        try:
            lv.lookup(conn, name)
        except NotFoundError:
            continue
        raise CgrepError(f"domain {name!r} could not be removed")
    shutil.rmtree(gdir, ignore_errors=True)
    return tuple(removed)
