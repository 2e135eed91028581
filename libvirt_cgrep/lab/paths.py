"""Where the lab keeps its files: one directory per lab domain and per lab group.

``$CGREP_LAB_DIR`` when set, else ``/var/lib/libvirt-cgrep/lab``. Shared by
:mod:`libvirt_cgrep.lab.domain` and :mod:`libvirt_cgrep.lab.relay` (so neither
imports the other for it).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LAB_DIR = Path("/var/lib/libvirt-cgrep/lab")


def lab_root() -> Path:
    """The lab's root directory, read from the environment on every call."""
    return Path(os.environ.get("CGREP_LAB_DIR", str(DEFAULT_LAB_DIR)))


def group_dir(group: str) -> Path:
    """The directory of lab group ``group``: its ``group.json`` and the relay's files."""
    return lab_root() / group
