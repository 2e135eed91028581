"""A domain restart without a full recopy, primary side: identities, digests, the offline overlay, the fold.

Guarantees:

- :func:`add_overlays` changes a shut-off domain's chains only through
  libvirt (``virDomainSnapshotCreateXML(DISK_ONLY|ATOMIC|NO_METADATA)``:
  libvirt creates each overlay and updates the definition), all disks or
  none; it refuses a domain that is running;
- :func:`fold_previous` folds a previous restart's overlay (just below the
  active image) into the image below it through ``virDomainBlockCommit``,
  which never touches the active image: the guest keeps writing;
- :func:`file_id` reads no content: any write to the file changes its
  ``mtime_ns`` (the kernel stamps every write).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.core import continuous as cc
from libvirt_cgrep.core.domxml import disks_of
from libvirt_cgrep.engine.fold import fold
from libvirt_cgrep.errors import StateError


def file_id(path: str) -> cc.FileId | None:
    """The file's identity now, None if it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return cc.FileId(path, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns)


def chains(dom: lv.Domain, targets: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each target's chain, active image first, as real paths: running or shut off alike.

    The active image is the definition's (live if running, else persistent);
    the images below it are read from the headers (a shut-off domain's
    definition names no backing chain).
    """
    xml = lv.live_xml(dom) if lv.is_active(dom) else lv.persistent_xml(dom)
    tops = {d.target: d.image for d in disks_of(xml)}
    out: dict[str, tuple[str, ...]] = {}
    for t in targets:
        top = tops.get(t)
        if not top:
            out[t] = ()
            continue
        below = [os.path.realpath(i.path) for i in qemu_img.chain(Path(top))[1:]]
        out[t] = (os.path.realpath(top), *below)
    return out


def add_overlays(dom: lv.Domain, overlays: Mapping[str, str]) -> None:
    """One external disk-only snapshot of the shut-off domain: ``overlays`` {target: new active image}."""
    name = lv.domain_name(dom)
    if lv.is_active(dom):
        raise StateError(f"{name} is running again: no overlay added")
    all_targets = [d.target for d in disks_of(lv.persistent_xml(dom))]
    parts = []
    for t in all_targets:
        if t in overlays:
            parts.append(
                f"<disk name='{t}' snapshot='external' type='file'><driver type='qcow2'/>"
                f"<source file={quoteattr(overlays[t])}/></disk>"
            )
        else:
            parts.append(f"<disk name='{t}' snapshot='no'/>")
    xml = f"<domainsnapshot><description>virt-cgrep restart</description><disks>{''.join(parts)}</disks></domainsnapshot>"
    lv.snapshot_disk_only(dom, f"adding restart overlays to {name!r}", xml)


def fold_previous(dom: lv.Domain, target: str) -> str | None:
    """Fold a previous restart's overlay below the active image into the image below it; what was folded, or None."""
    plan = cc.fold_plan(lv.live_chain(dom, target))
    if plan is None:
        return None
    base, top = plan
    fold(dom, target, base, top)
    return top
