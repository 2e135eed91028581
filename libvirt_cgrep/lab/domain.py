"""Lab domains: persistent TCG libvirt domains running the dependent-write workload.

A lab domain is marked by a ``<lab>`` element in our lab namespace inside its
``<metadata>``; ``lab down`` and ``lab list`` act only on domains so marked, so
the lab can never destroy an operator's VM. Its files live in one directory,
``$CGREP_LAB_DIR/NAME`` (default ``/var/lib/libvirt-cgrep/lab/NAME``).

``up`` either leaves a defined, running domain whose workload acknowledged
its first record, or changes nothing (it rolls back what it made).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt
from lxml import etree

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.core.names import disk_target, validate_name
from libvirt_cgrep.errors import CgrepError, ConflictError, NotFoundError, StateError, UsageError
from libvirt_cgrep.lab import console

LAB_NS = "urn:x-libvirt-cgrep:lab:1"
LAB_PREFIX = "cgreplab"
DEFAULT_LAB_DIR = Path("/var/lib/libvirt-cgrep/lab")
MODES = ("write", "scan", "idle")


def lab_root() -> Path:
    return Path(os.environ.get("CGREP_LAB_DIR", str(DEFAULT_LAB_DIR)))


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

    def images(self) -> tuple[Path, ...]:
        return tuple(self.directory / f"{disk_target(i)}.qcow2" for i in range(self.disks))

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    def cmdline(self) -> str:
        return (
            "console=ttyS0 quiet loglevel=1 panic=-1 "
            f"cgrep.mode={self.mode} cgrep.bs={self.bs} cgrep.rate={self.rate} cgrep.report_ms={self.report_ms}"
        )


def domain_xml(spec: LabSpec, dom_uuid: str) -> str:
    """The libvirt definition of a lab domain (pure)."""
    disks = "\n".join(
        f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source file={quoteattr(str(img))}/>
      <target dev='{disk_target(i)}' bus='virtio'/>
      <serial>cgrep-d{i}</serial>
    </disk>"""
        for i, img in enumerate(spec.images())
    )
    return f"""<domain type='qemu'>
  <name>{spec.name}</name>
  <uuid>{dom_uuid}</uuid>
  <metadata>
    <{LAB_PREFIX}:lab xmlns:{LAB_PREFIX}='{LAB_NS}' disks='{spec.disks}' size='{spec.size}' mode='{spec.mode}'
        rate='{spec.rate}' bs='{spec.bs}' dir={quoteattr(str(spec.directory))}/>
  </metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
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
        }


def _lab_meta(dom: libvirt.virDomain) -> etree._Element | None:
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, LAB_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise lv.translate(exc, f"reading metadata of {dom.name()!r}") from exc
    return etree.fromstring(xml.encode())


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


def _describe(conn: libvirt.virConnect, dom: libvirt.virDomain, meta: etree._Element) -> LabDomain:
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
    )


def get(conn: libvirt.virConnect, name: str) -> LabDomain:
    """The lab domain ``name``; NotFoundError, or UsageError if it is not a lab domain."""
    validate_name(name, "domain name")
    dom = lv.lookup(conn, name)
    meta = _lab_meta(dom)
    if meta is None:
        raise StateError(f"domain {name!r} is not a lab domain (it has no lab metadata); the lab leaves it alone")
    return _describe(conn, dom, meta)


def list_all(conn: libvirt.virConnect) -> tuple[LabDomain, ...]:
    """Every lab domain on the connection, sorted by name."""
    out = []
    for dom in lv.call("listing domains", conn.listAllDomains, 0):
        meta = _lab_meta(dom)
        if meta is not None:
            out.append(_describe(conn, dom, meta))
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


def up(conn: libvirt.virConnect, spec: LabSpec, *, wait: bool = True, timeout: float = 90.0) -> LabDomain:
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
    dom: libvirt.virDomain | None = None
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


def _remove(dom: libvirt.virDomain | None, directory: Path) -> None:
    """Destroy and undefine ``dom`` (if any) and remove ``directory``; best effort."""
    if dom is not None:
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
        try:
            flags = (
                libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            )
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            pass
    shutil.rmtree(directory, ignore_errors=True)


def down(conn: libvirt.virConnect, name: str) -> None:
    """Destroy a lab domain, undefine it and remove its directory (idempotent on leftovers)."""
    validate_name(name, "domain name")
    try:
        dom = lv.lookup(conn, name)
    except NotFoundError:
        leftover = lab_root() / name
        if leftover.is_dir():
            shutil.rmtree(leftover)
            return
        raise
    meta = _lab_meta(dom)
    if meta is None:
        raise StateError(f"domain {name!r} is not a lab domain (it has no lab metadata); refusing to destroy it")
    directory = Path(meta.get("dir", ""))
    if not directory.is_absolute() or directory.name != name:
        raise StateError(f"lab metadata of {name!r} names an unexpected directory {str(directory)!r}; refusing")
    _remove(dom, directory)
    try:
        lv.lookup(conn, name)
    except NotFoundError:
        return
    raise CgrepError(f"domain {name!r} could not be removed")
