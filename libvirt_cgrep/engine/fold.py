"""Fold shipped overlays back into the primary's base, through libvirt only.

``virDomainBlockCommit(disk, base, top, DELETE)`` of a non-active ``top``
merges every layer from ``top`` down to just above ``base`` into ``base``;
the job finishes by itself, libvirt rewrites the chain in the live and
persistent definitions and deletes the merged files. A fold never touches
the active image, so the guest keeps writing throughout.
"""

from __future__ import annotations

import time

import libvirt

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.engine.libvirt_backend import disks_of
from libvirt_cgrep.errors import LibvirtError, StateError


def live_chain(dom: libvirt.virDomain, target: str) -> tuple[str, ...]:
    for d in disks_of(lv.live_xml(dom)):
        if d.target == target:
            return d.chain
    raise LibvirtError(f"{dom.name()}: no disk {target}")


def check_fold(chain: tuple[str, ...], base: str, top: str, name: str, target: str) -> None:
    """StateError unless ``top`` is a non-active layer strictly above ``base`` in ``chain``. Pure."""
    if top not in chain[1:] or base not in chain or chain.index(base) <= chain.index(top):
        raise StateError(f"{name}/{target}: cannot fold {top} into {base}: not in the chain below the active image")


def fold(dom: libvirt.virDomain, target: str, base: str, top: str, *, timeout: float = 3600.0) -> None:
    """Merge ``top`` (and anything between it and ``base``) into ``base``; wait until done."""
    chain = live_chain(dom, target)
    check_fold(chain, base, top, dom.name(), target)
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE
    lv.call(f"folding {target} of {dom.name()!r}", dom.blockCommit, target, base, top, 0, flags)
    end = time.monotonic() + timeout
    while True:
        info = lv.call("reading the block job", dom.blockJobInfo, target, 0)
        if not info:
            break
        if time.monotonic() > end:
            raise LibvirtError(f"{dom.name()}/{target}: fold did not finish within {timeout:.0f} s")
        time.sleep(0.02)
    after = live_chain(dom, target)
    if top in after:
        raise LibvirtError(f"{dom.name()}/{target}: the fold of {top} failed (still in the chain)")
