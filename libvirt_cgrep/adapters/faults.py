"""Test-only fault switches, in one place.

The real-QEMU tests inject faults through environment variables named
``CGREP_FAULT_<NAME>``; production code asks this module and nothing else
reads them. Unset (the normal case), every function here is a no-op that
returns the neutral value. Each switch is listed in :data:`SWITCHES`.
"""

from __future__ import annotations

import os
import time

#: Every switch, by the name passed to the functions below, and what it does.
SWITCHES = {
    "BEFORE_FOLD_MS": "engine/sync: sleep this many ms between the commit and the fold",
    "HOLD_SLEEP_MS": "engine/point: sleep this many ms inside a hold, after the fence",
    "COPY_BANDWIDTH": "continuous/session: limit each mirror's copy to this many bytes/s",
    "SPLIT_CUT_MS": "server/live: sleep this many ms between the cuts of a continuous point",
    "FINAL_DIGEST": "server/live: the final point's digests differ (any non-empty value)",
    "RECEIVER": "replica/store: the receiver dies (exit 99) at the named step",
    "FAILBACK": "recovery/reverse: failback dies (exit 99) at the named step",
}

#: The exit status of a process killed by a fault switch.
FAULT_EXIT = 99


def _raw(name: str) -> str:
    if name not in SWITCHES:
        raise KeyError(f"unknown fault switch {name}")
    return os.environ.get(f"CGREP_FAULT_{name}", "")


def env_name(name: str) -> str:
    """The environment variable that sets switch ``name`` (for tests)."""
    _raw(name)
    return f"CGREP_FAULT_{name}"


def value(name: str) -> str:
    """The switch's value, ``""`` when unset."""
    return _raw(name)


def number(name: str) -> float:
    """The switch as a number, 0 when unset."""
    return float(_raw(name) or 0)


def sleep_ms(name: str) -> None:
    """Sleep for the switch's milliseconds (nothing when unset)."""
    ms = number(name)
    if ms > 0:
        time.sleep(ms / 1000)


def die_at(name: str, where: str) -> None:
    """End this process at once (exit :data:`FAULT_EXIT`, no clean-up) when the switch names ``where``."""
    if _raw(name) == where:
        os._exit(FAULT_EXIT)
