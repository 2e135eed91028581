"""Fold shipped overlays back into the primary's base, through libvirt only.

``virDomainBlockCommit(disk, base, top, DELETE)`` of a non-active ``top``
merges every layer from ``top`` down to just above ``base`` into ``base``;
the job finishes by itself, libvirt rewrites the chain in the live and
persistent definitions and deletes the merged files. A fold never touches
the active image, so the guest keeps writing throughout.
"""

from __future__ import annotations

import time

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.core.chain import check_fold
from libvirt_cgrep.errors import LibvirtError


def fold(dom: lv.Domain, target: str, base: str, top: str, *, timeout: float = 3600.0) -> None:
    """Merge ``top`` (and anything between it and ``base``) into ``base``; wait until done."""
    name = lv.domain_name(dom)
    chain = lv.live_chain(dom, target)
    check_fold(chain, base, top, name, target)
    lv.block_commit(dom, target, base, top)
    end = time.monotonic() + timeout
    while lv.block_job_running(dom, target):
        if time.monotonic() > end:
            raise LibvirtError(f"{name}/{target}: fold did not finish within {timeout:.0f} s")
        time.sleep(0.02)
    after = lv.live_chain(dom, target)
    if top in after:
        raise LibvirtError(f"{name}/{target}: the fold of {top} failed (still in the chain)")
