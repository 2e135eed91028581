"""Parse the lab workload's console lines. Pure.

The workload prints, at least every report interval (100 ms by default)::

    CGREP ACK seq=<n> t_ms=<guest ms> n=<records> lat_max_us=<us> lat_avg_us=<us>

``seq`` is the last acknowledged record (-1 before the first). The guest clock
stops while the VM is paused, so ``t_ms`` says nothing about a host-side hold.

A member of a lab group (``cgrep.vms`` > 1) writes a record only when the host
relay sends it ``GO <n>``, and then prints ``CGREP DONE seq=<n>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"CGREP (READY|ACK|SCAN|ERROR|EXIT|SCANDONE|DONE)\b([^\r\n]*)")
_READY = "CGREP READY"
_KV = re.compile(r"(\w+)=(-?\w+)")


@dataclass(frozen=True)
class Ack:
    seq: int
    t_ms: int
    n: int
    lat_max_us: int
    lat_avg_us: int


@dataclass(frozen=True)
class ConsoleState:
    """What the console says so far; every field is the latest such line."""

    ready: dict[str, str] | None
    ack: Ack | None
    scan: dict[str, str] | None
    error: str | None
    acks: tuple[Ack, ...]
    done: int | None = None
    """The highest ``seq`` of the DONE lines (group members only)."""


def _int(kv: dict[str, str], key: str) -> int:
    try:
        return int(kv.get(key, "0"))
    except ValueError:
        return 0


def parse(text: str) -> ConsoleState:
    """Read every CGREP line of ``text`` (the whole console log or its tail)."""
    ready: dict[str, str] | None = None
    scan: dict[str, str] | None = None
    error: str | None = None
    acks: list[Ack] = []
    done: int | None = None
    for m in _LINE.finditer(text):
        kind, rest = m.group(1), m.group(2)
        kv = dict(_KV.findall(rest))
        if kind == "READY":
            ready = kv
        elif kind == "ACK" and "seq" in kv:
            acks.append(Ack(_int(kv, "seq"), _int(kv, "t_ms"), _int(kv, "n"), _int(kv, "lat_max_us"), _int(kv, "lat_avg_us")))
        elif kind == "SCAN":
            scan = kv
        elif kind == "DONE" and "seq" in kv:
            seq = _int(kv, "seq")
            done = seq if done is None else max(done, seq)
        elif kind in ("ERROR", "EXIT"):
            error = f"{kind} {rest.strip()}"
    return ConsoleState(ready, acks[-1] if acks else None, scan, error, tuple(acks), done)


def last_boot(text: str) -> str:
    """The part of ``text`` from the last READY line on (all of it if there is none)."""
    i = text.rfind(_READY)
    return text if i < 0 else text[i:]


def done_seqs(text: str) -> list[int]:
    """Every DONE ``seq`` of ``text``, in order."""
    out = []
    for m in _LINE.finditer(text):
        if m.group(1) == "DONE":
            kv = dict(_KV.findall(m.group(2)))
            if "seq" in kv:
                out.append(_int(kv, "seq"))
    return out
