"""The receiver's ``failback-start``: start a failback's originals on this (the original) site's libvirt.

Kept out of :mod:`libvirt_cgrep.server.receiver` (which takes it as an
argument): it needs libvirt and the recovery, which the lean local receiver
a sync starts every cycle (:mod:`libvirt_cgrep.server.serve`) does not load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.recovery.reverse import HomeStart, start_home


def failback_start(root: Path, set_name: str, start: dict[str, Any] | None) -> tuple[str, str, tuple[str, ...]]:
    """Start (``start``: a :class:`HomeStart` as a dict) or finish (None) a failback over ``root``'s final point.

    Returns (point id, failover run, the domains started), as ``start_home``.
    """
    home = HomeStart(**start) if start else None
    uri = lv.default_uri()
    conn = lv.connect(uri)
    try:
        point, run, names = start_home(conn, uri, root, set_name, home)
    finally:
        conn.close()
    return point, run, tuple(names)
