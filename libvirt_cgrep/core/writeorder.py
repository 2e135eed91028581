"""The lab workload's record format (v1) and the write-order verdict. Pure.

The lab workload writes a dependent-write chain: record ``n+1`` is issued only
after record ``n`` was acknowledged (pwrite + fdatasync). Record ``n`` lives at a
fixed place: ``vm = n % V``, ``k = n // V``, ``disk = k % D``,
``slot = (k // D) % S``, byte offset ``slot * bs`` of that disk. The disks are
rings of ``S`` slots, so once the chain wraps, record ``n`` overwrites record
``n - V*D*S``.

**Guarantee of the verdict.** A set of images is a consistent cut iff, with
``max`` the highest sequence number found, every record of the window
``[max(0, max - V*D*S + 1), max]`` is present with a valid checksum at its place.
Before the ring wraps the window is ``{0..max}``. A cut that contains record
``n`` but lacks an earlier record of the window broke write order.

Record layout (little-endian), one block of ``bs`` bytes::

    0  magic "CGREPRC1"      8  u64 seq        16 u32 vm     20 u32 nvms
    24 u32 disk              28 u32 ndisks     32 u64 slot   40 u64 slots
    48 u32 bs                52 u32 0          56 u64 run id
    64 .. bs-4 filler        bs-4 u32 CRC-32 (zlib) of bytes [0, bs-4)
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC = b"CGREPRC1"
HEADER = struct.Struct("<8sQIIIIQQII Q")
HEADER_SIZE = HEADER.size  # 64
BLOCK = 4096
MAX_BS = 1 << 20


@dataclass(frozen=True)
class Record:
    """One decoded record header; ``valid`` is False for a bad checksum or place."""

    seq: int
    vm: int
    nvms: int
    disk: int
    ndisks: int
    slot: int
    slots: int
    bs: int
    run: int
    valid: bool = True

    @property
    def capacity(self) -> int:
        """Records the rings hold before record n overwrites record n - capacity."""
        return self.nvms * self.ndisks * self.slots

    def expected_place(self) -> tuple[int, int, int]:
        """(vm, disk, slot) where this record's ``seq`` must live."""
        return place(self.seq, self.nvms, self.ndisks, self.slots)


def place(seq: int, nvms: int, ndisks: int, slots: int) -> tuple[int, int, int]:
    """(vm, disk, slot) of record ``seq`` for the given geometry."""
    k = seq // nvms
    return seq % nvms, k % ndisks, (k // ndisks) % slots


def encode(seq: int, *, nvms: int, ndisks: int, slots: int, bs: int = BLOCK, run: int = 0) -> bytes:
    """Build record ``seq`` as the workload does (used by tests and tools)."""
    vm, disk, slot = place(seq, nvms, ndisks, slots)
    head = HEADER.pack(MAGIC, seq, vm, nvms, disk, ndisks, slot, slots, bs, 0, run)
    filler = bytes(((seq * 131 + i) & 0xFF) for i in range(HEADER_SIZE, bs - 4))
    body = head + filler
    return body + struct.pack("<I", zlib.crc32(body))


def decode(block: bytes | memoryview, offset: int) -> Record | None:
    """Decode the record at byte ``offset`` of its disk from ``block`` (>= its bs bytes).

    Returns None when there is no record magic. A record whose checksum or
    place does not match is returned with ``valid=False``.
    """
    if bytes(block[:8]) != MAGIC or len(block) < HEADER_SIZE:
        return None
    _, seq, vm, nvms, disk, ndisks, slot, slots, bs, _, run = HEADER.unpack_from(block, 0)
    ok = (
        BLOCK <= bs <= MAX_BS
        and bs % BLOCK == 0
        and len(block) >= bs
        and nvms >= 1
        and ndisks >= 1
        and slots >= 1
        and offset == slot * bs
    )
    if ok:
        (crc,) = struct.unpack_from("<I", block, bs - 4)
        ok = zlib.crc32(block[: bs - 4]) == crc and place(seq, nvms, ndisks, slots) == (vm, disk, slot)
    return Record(seq, vm, nvms, disk, ndisks, slot, slots, bs, run, ok)


@dataclass(frozen=True)
class Verdict:
    """The checker's answer. ``consistent`` is the only thing a caller may trust."""

    max: int
    count: int
    holes: int
    first_hole: int | None
    hole_sample: tuple[int, ...]
    bad: int
    window: tuple[int, int] | None
    problems: tuple[str, ...]

    @property
    def consistent(self) -> bool:
        return self.holes == 0 and self.bad == 0 and not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "consistent": self.consistent,
            "max": self.max,
            "count": self.count,
            "holes": self.holes,
            "first_hole": self.first_hole,
            "hole_sample": list(self.hole_sample),
            "bad": self.bad,
            "window": list(self.window) if self.window else None,
            "problems": list(self.problems),
        }


def evaluate(records: Iterable[Record], *, sample: int = 10) -> Verdict:
    """Judge a set of records gathered from every image of one cut."""
    seen: set[int] = set()
    bad = 0
    geometries: set[tuple[int, int, int]] = set()
    problems: list[str] = []
    for r in records:
        if not r.valid:
            bad += 1
            continue
        if r.seq in seen:
            bad += 1
            problems.append(f"record {r.seq} found twice")
            continue
        seen.add(r.seq)
        geometries.add((r.nvms, r.ndisks, r.slots))
    if not seen:
        return Verdict(-1, 0, 0, None, (), bad, None, tuple(problems[:sample]))
    if len(geometries) > 1:
        problems.append(f"records disagree on the geometry (vms, disks, slots): {sorted(geometries)}")
    nvms, ndisks, slots = max(geometries)
    top = max(seen)
    lo = max(0, top - nvms * ndisks * slots + 1)
    in_window = sum(1 for s in seen if s >= lo)
    holes = (top - lo + 1) - in_window
    hole_sample: list[int] = []
    if holes:
        for s in range(lo, top + 1):
            if s not in seen:
                hole_sample.append(s)
                if len(hole_sample) >= sample:
                    break
    first = hole_sample[0] if hole_sample else None
    return Verdict(top, in_window, holes, first, tuple(hole_sample), bad, (lo, top), tuple(problems[:sample]))
