"""Unit tests of the pure record format and verdict, and of scan_raw on synthetic raw files."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_cgrep.core import writeorder as wo
from libvirt_cgrep.lab.check import check_images, scan_raw

GEOM = {"nvms": 1, "ndisks": 4, "slots": 16}


def write_disks(tmp: Path, seqs: list[int], *, ndisks: int = 4, slots: int = 16, bs: int = 4096) -> list[Path]:
    paths = [tmp / f"d{i}.raw" for i in range(ndisks)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(slots * bs)
    for s in seqs:
        _, disk, slot = wo.place(s, 1, ndisks, slots)
        with open(paths[disk], "r+b") as f:
            f.seek(slot * bs)
            f.write(wo.encode(s, nvms=1, ndisks=ndisks, slots=slots, bs=bs))
    return paths


def recs(seqs: list[int]) -> list[wo.Record]:
    out = []
    for s in seqs:
        _vm, _disk, slot = wo.place(s, 1, 4, 16)
        out.append(wo.decode(wo.encode(s, **GEOM), slot * 4096))
    return [r for r in out if r is not None]


def test_encode_decode_roundtrip() -> None:
    data = wo.encode(77, nvms=1, ndisks=4, slots=16, bs=8192)
    _, _, slot = wo.place(77, 1, 4, 16)
    r = wo.decode(data, slot * 8192)
    assert r is not None and r.valid and r.seq == 77 and r.bs == 8192 and r.disk == 77 % 4


def test_decode_rejects_bad_crc_and_wrong_place() -> None:
    data = bytearray(wo.encode(5, **GEOM))
    _, _, slot = wo.place(5, 1, 4, 16)
    data[100] ^= 1
    r = wo.decode(bytes(data), slot * 4096)
    assert r is not None and not r.valid
    r2 = wo.decode(wo.encode(5, **GEOM), (slot + 1) * 4096)
    assert r2 is not None and not r2.valid
    assert wo.decode(b"\0" * 4096, 0) is None


def test_contiguous_is_consistent() -> None:
    v = wo.evaluate(recs(list(range(40))))
    assert v.consistent and v.max == 39 and v.count == 40 and v.window == (0, 39)


def test_hole_is_found_first() -> None:
    v = wo.evaluate(recs([s for s in range(40) if s not in (7, 9)]))
    assert not v.consistent and v.holes == 2 and v.first_hole == 7 and v.hole_sample == (7, 9)


def test_wrapped_ring_window() -> None:
    # capacity 64: after writing 0..99 the rings hold 36..99
    v = wo.evaluate(recs(list(range(36, 100))))
    assert v.consistent and v.window == (36, 99)
    # slot of 90 still holds the stale 26: 90 is a hole
    v2 = wo.evaluate(recs([s for s in range(36, 100) if s != 90] + [90 - 64]))
    assert not v2.consistent and v2.first_hole == 90 and v2.holes == 1


def test_empty_is_vacuously_consistent() -> None:
    v = wo.evaluate([])
    assert v.consistent and v.max == -1 and v.count == 0


def test_duplicates_are_bad() -> None:
    r = recs([0, 1, 2])
    v = wo.evaluate(r + r[:1])
    assert not v.consistent and v.bad == 1


def test_scan_raw_and_check_images(tmp_path: Path) -> None:
    paths = write_disks(tmp_path, list(range(50)))
    assert sorted(r.seq for p in paths for r in scan_raw(p)) == list(range(50))
    assert check_images(paths).consistent
    (tmp_path / "holed").mkdir()
    holed = write_disks(tmp_path / "holed", [s for s in range(50) if s != 21])
    v = check_images(holed)
    assert not v.consistent and v.first_hole == 21


@pytest.mark.parametrize("bs", [4096, 16384])
def test_scan_raw_block_sizes(tmp_path: Path, bs: int) -> None:
    paths = write_disks(tmp_path, list(range(30)), bs=bs)
    assert check_images(paths).consistent
