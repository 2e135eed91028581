"""libvirt domain XML (and qemu.conf) read and written as plain text. Pure.

The one parser of a domain's ``<disk>`` elements: :func:`disk_sources`
gives each element's facts in document order (backing chain included),
:func:`disks_of` the same disks as :class:`~libvirt_cgrep.core.model.Disk`
with the reason a disk cannot be protected. Nothing here talks to libvirt;
``adapters.libvirt`` fetches the XML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from lxml import etree

from libvirt_cgrep.core.model import Disk, Transaction


@dataclass(frozen=True)
class DiskSource:
    """A ``<disk>`` of a domain definition: enough to read or check its image.

    ``chain`` is the backing chain from ``<backingStore>``, active image first
    (``chain[0] == path``); empty when the disk has no medium.
    """

    target: str
    device: str
    kind: str
    path: str | None
    format: str | None
    readonly: bool
    shareable: bool
    chain: tuple[str, ...] = ()


def _path(node: etree._Element) -> str | None:
    src = node.find("source")
    return None if src is None else (src.get("file") or src.get("dev"))


def _chain(disk: etree._Element) -> tuple[str, ...]:
    out: list[str] = []
    node: etree._Element | None = disk
    while node is not None:
        path = _path(node)
        if path is None:
            break
        out.append(path)
        node = node.find("backingStore")
    return tuple(out)


def disk_sources(xml: str) -> tuple[DiskSource, ...]:
    """Parse the ``<disk>`` elements of a domain XML, in document order."""
    root = etree.fromstring(xml.encode())
    out: list[DiskSource] = []
    for d in root.iterfind("devices/disk"):
        drv = d.find("driver")
        tgt = d.find("target")
        out.append(
            DiskSource(
                target=tgt.get("dev", "") if tgt is not None else "",
                device=d.get("device", "disk"),
                kind=d.get("type", "file"),
                path=_path(d),
                format=drv.get("type") if drv is not None else None,
                readonly=d.find("readonly") is not None,
                shareable=d.find("shareable") is not None,
                chain=_chain(d),
            )
        )
    return tuple(out)


def _reason(s: DiskSource) -> str | None:
    """Why a disk cannot be protected, None if it can."""
    fmt = s.format or "raw"
    if s.device != "disk":
        return f"{s.device} device"
    if s.kind != "file":
        return f"{s.kind} disk (only file-backed disks are supported)"
    if not s.chain:
        return "no medium"
    if s.readonly:
        return "read-only"
    if s.shareable:
        return "shareable"
    if fmt != "qcow2":
        return f"{fmt} image (qcow2 is required)"
    return None


def disks_of(xml: str) -> tuple[Disk, ...]:
    """Every ``<disk>`` of a (live) domain XML, with its chain and, if unsupported, why."""
    out: list[Disk] = []
    for s in disk_sources(xml):
        reason = _reason(s)
        out.append(
            Disk(
                target=s.target or "?",
                image=s.chain[0] if s.chain else "",
                format=s.format or "raw",
                chain=s.chain,
                node=None,
                device=s.device,
                supported=reason is None,
                reason=reason,
            )
        )
    return tuple(out)


def chain_of(xml: str, target: str) -> tuple[str, ...] | None:
    """The backing chain (active image first) of disk ``target``; None if the domain has no such disk."""
    for d in disks_of(xml):
        if d.target == target:
            return d.chain
    return None


def snapshot_xml(txn: Transaction, all_targets: Sequence[str], *, relabel: bool = True) -> str:
    """The ``<domainsnapshot>`` for one atomic cut of ``txn`` (other disks: ``snapshot='no'``).

    ``relabel=False`` adds ``<seclabel model='dac' relabel='no'/>`` to each new
    source: libvirt then leaves the overlay's ownership alone (it must already
    belong to QEMU's user).
    """
    chosen = {a.target: a for a in txn.actions}
    seclabel = "" if relabel else "<seclabel model='dac' relabel='no'/>"
    parts = []
    for t in all_targets:
        a = chosen.get(t)
        if a is None:
            parts.append(f"<disk name='{t}' snapshot='no'/>")
        else:
            parts.append(
                f"<disk name='{t}' snapshot='external' type='file'><driver type='qcow2'/>"
                f"<source file={quoteattr(a.overlay)}>{seclabel}</source></disk>"
            )
    return f"<domainsnapshot><description>virt-cgrep point</description><disks>{''.join(parts)}</disks></domainsnapshot>"


#: Debian's build default for ``user`` and ``group`` in qemu.conf.
DEFAULT_QEMU_USER = "libvirt-qemu"
_CONF_LINE = re.compile(r'^\s*(user|group)\s*=\s*"([^"]*)"', re.MULTILINE)


def parse_qemu_owner(text: str) -> tuple[str, str]:
    """The ``user`` and ``group`` QEMU runs as, from qemu.conf text (defaults: ``libvirt-qemu``)."""
    found = dict(_CONF_LINE.findall(text))
    return found.get("user", DEFAULT_QEMU_USER), found.get("group", DEFAULT_QEMU_USER)
