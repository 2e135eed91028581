"""adapters.qemu_img.content_digest on images written by QEMU's own tools.

The same guest-visible bytes, laid out differently (one image, a chain,
raw, allocated zeros, preallocation), must give one digest, equal to a plain
reference over the bytes ``qemu-img convert`` reads; any other content or
virtual size must give another.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from libvirt_cgrep.adapters.qemu_img import DIGEST_CHUNK, content_digest
from libvirt_cgrep.errors import CommandError, NotFoundError

MIB = 1 << 20
KIB = 1 << 10
SIZE = 6 * MIB + 200 * KIB  # the last chunk is 200 KiB

#: (pattern, offset, length) of the reference content; the rest reads as zeros.
WRITES = [
    (0x5A, 0, 64 * KIB),
    (0x11, MIB + 4096, 300 * KIB),
    (0x77, 3 * MIB - 8192, 16 * KIB),  # across a chunk boundary; then two whole chunks of zeros
    (0xA5, 6 * MIB + 100_000, 5000),  # in the last, shorter chunk, unaligned
]


def sh(*argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, cwd=cwd).stdout


def create(path: Path, size: int = SIZE, fmt: str = "qcow2", *opts: str) -> Path:
    sh("qemu-img", "create", "-q", "-f", fmt, *opts, str(path), str(size))
    return path


def io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    sh(*argv, str(path))


def writes(items: list[tuple[int, int, int]]) -> list[str]:
    return [f"write -P {pat:#x} {off} {n}" for pat, off, n in items]


def reference(path: Path, fmt: str, tmp: Path) -> str:
    """The digest's definition, computed over every byte ``qemu-img convert`` reads."""
    raw = tmp / f"ref-{path.name}.raw"
    sh("qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    outer = hashlib.sha256(b"libvirt-cgrep content digest v1\0" + len(data).to_bytes(8, "big"))
    run = 0
    for i in range(0, len(data), DIGEST_CHUNK):
        chunk = data[i : i + DIGEST_CHUNK]
        if chunk.count(0) == len(chunk):
            run += len(chunk)
            continue
        if run:
            outer.update(b"Z" + run.to_bytes(8, "big"))
            run = 0
        outer.update(b"D" + hashlib.sha256(chunk).digest())
    if run:
        outer.update(b"Z" + run.to_bytes(8, "big"))
    return outer.hexdigest()


def full(tmp: Path, name: str = "full.qcow2", extra: list[str] | None = None, size: int = SIZE) -> Path:
    img = create(tmp / name, size)
    io(img, *writes(WRITES), *(extra or []))
    return img


def chain(tmp: Path, top_extra: list[str] | None = None, prefix: str = "") -> Path:
    """base <- mid <- top holding WRITES split across the layers, with backing data masked above."""
    base = create(tmp / f"{prefix}base.qcow2")
    io(base, *writes([WRITES[0], WRITES[2], (0xEE, 2 * MIB, 64 * KIB), (0x99, MIB + 4096, 300 * KIB)]))
    mid = create(tmp / f"{prefix}mid.qcow2", SIZE, "qcow2", "-b", base.name, "-F", "qcow2")
    # mid masks the base's 0x99 with WRITES[1] and its 0xEE with zeros (flagged, not written).
    io(mid, *writes([WRITES[1]]), f"write -z {2 * MIB} {64 * KIB}")
    top = create(tmp / f"{prefix}top.qcow2", SIZE, "qcow2", "-b", mid.name, "-F", "qcow2")
    io(top, *writes([WRITES[3]]), *(top_extra or []))
    return top


def test_same_content_same_digest_across_layouts(tmp_path: Path) -> None:
    one = full(tmp_path)
    want = reference(one, "qcow2", tmp_path)
    assert content_digest(one) == want

    top = chain(tmp_path)
    assert sh("qemu-img", "info", "--backing-chain", str(top)).count("image:") == 3
    assert content_digest(top) == want

    raw = create(tmp_path / "disk.raw", SIZE, "raw")
    io(raw, *writes(WRITES), fmt="raw")
    assert content_digest(raw, "raw") == want

    # Zeros written as data, zero-flagged clusters (over data too) and unallocated ranges read alike.
    zeros = full(
        tmp_path,
        "zeros.qcow2",
        [f"write -P 0 {3 * MIB + 64 * KIB} {512 * KIB}", f"write -z {1536 * KIB} {256 * KIB}", f"write -P 0 {4 * MIB} {MIB}"],
    )
    io(zeros, f"write -P 0x33 {2 * MIB} {128 * KIB}", f"write -z {2 * MIB} {128 * KIB}")
    assert content_digest(zeros) == want

    # Everything allocated on the host: every range is data, most of it reads as zeros.
    for prealloc in ("falloc", "full"):
        img = create(tmp_path / f"{prealloc}.qcow2", SIZE, "qcow2", "-o", f"preallocation={prealloc}")
        io(img, *writes(WRITES))
        assert content_digest(img) == want, prealloc
    dense = create(tmp_path / "dense.raw", SIZE, "raw")
    io(dense, f"write -P 0 0 {SIZE}", *writes(WRITES), fmt="raw")
    assert content_digest(dense, "raw") == want

    # A raw base under a qcow2 overlay.
    rbase = create(tmp_path / "rbase.raw", SIZE, "raw")
    io(rbase, *writes(WRITES[:2]), fmt="raw")
    rtop = create(tmp_path / "rtop.qcow2", SIZE, "qcow2", "-b", rbase.name, "-F", "raw")
    io(rtop, *writes(WRITES[2:]))
    assert content_digest(rtop) == want


@pytest.mark.parametrize(
    "change",
    [
        "write -P 0x5b 100 1",  # one byte in a data range of the first chunk
        f"write -P 0x01 {2 * MIB + 12345} 1",  # one byte in a zero range
        f"write -P 0 {MIB + 4096} 1",  # one data byte made zero
        f"write -P 0x01 {5 * MIB - 1} 1",  # one byte in a chunk otherwise all zeros
        f"write -P 0xa6 {6 * MIB + 100_000 + 4999} 1",  # last byte written in the last, shorter chunk
        f"write -P 0x01 {SIZE - 1} 1",  # the disk's last byte
        f"write -P 0x5a {64 * KIB} 1",  # the same pattern, one byte further
    ],
)
def test_any_byte_changes_the_digest(tmp_path: Path, change: str) -> None:
    want = content_digest(full(tmp_path))
    assert content_digest(full(tmp_path, "other.qcow2", [change])) != want
    # The same change in the chain's top overlay masks what the backing files hold.
    top = chain(tmp_path, [change])
    got = content_digest(top)
    assert got != want
    assert got == reference(top, "qcow2", tmp_path)


def test_masking_in_the_overlay_counts(tmp_path: Path) -> None:
    top = chain(tmp_path)
    want = content_digest(top)
    # The base's 0xEE under mid's zero flag: dropping the mask must show it.
    base = tmp_path / "base.qcow2"
    flat = tmp_path / "flat.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", str(base), str(flat))
    io(flat, *writes([WRITES[1], WRITES[3]]))
    assert content_digest(flat) != want
    assert content_digest(flat) == reference(flat, "qcow2", tmp_path)


def test_where_the_zeros_are_counts(tmp_path: Path) -> None:
    """The same data chunks, in the same order, with the zero chunks between them elsewhere."""
    digests = set()
    for i, offsets in enumerate([(0, 3 * MIB), (MIB, 3 * MIB), (0, 2 * MIB), (0, MIB), (MIB, 2 * MIB)]):
        img = create(tmp_path / f"{i}.qcow2", 4 * MIB)
        io(img, *[f"write -P 0x5a {off} {MIB}" for off in offsets])
        digests.add(content_digest(img))
    assert len(digests) == 5


def test_virtual_size_counts(tmp_path: Path) -> None:
    want = content_digest(full(tmp_path))
    assert content_digest(full(tmp_path, "bigger.qcow2", size=SIZE + 512)) != want
    assert content_digest(full(tmp_path, "chunk.qcow2", size=7 * MIB)) != want
    small = create(tmp_path / "small.qcow2", MIB)
    assert content_digest(small) != content_digest(create(tmp_path / "small2.qcow2", 2 * MIB))
    assert content_digest(create(tmp_path / "empty.qcow2", 0)) != content_digest(small)


def test_relative_backing_names_from_another_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = content_digest(full(tmp_path))
    disks = tmp_path / "disks"
    disks.mkdir()
    top = chain(disks)
    assert "backing file: mid.qcow2" in sh("qemu-img", "info", str(top))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert content_digest(top) == want
    assert content_digest(Path("../disks/top.qcow2")) == want
    monkeypatch.chdir(disks)
    assert content_digest(Path("top.qcow2")) == want


def test_unreadable_layouts_raise(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        content_digest(tmp_path / "missing.qcow2")
    compressed = tmp_path / "compressed.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", str(full(tmp_path)), str(compressed))
    with pytest.raises(CommandError, match="compressed"):
        content_digest(compressed)
    external = create(tmp_path / "external.qcow2", SIZE, "qcow2", "-o", f"data_file={tmp_path / 'external.data'}")
    with pytest.raises(CommandError, match="not a plain"):
        content_digest(external)
    # Read as raw, a qcow2 file is its own host bytes: another content.
    img = full(tmp_path, "other.qcow2")
    assert content_digest(img, "raw") != content_digest(img)


def test_sparse_gib_is_fast(tmp_path: Path) -> None:
    """1 GiB virtual, 64 MiB of data in 1 MiB pieces: only the data is read."""
    img = create(tmp_path / "big.qcow2", 1 << 30)
    io(img, *[f"write -P {1 + i:#x} {i * 16 * MIB + 4096} {MIB}" for i in range(64)])
    t0 = time.monotonic()
    digest = content_digest(img)
    elapsed = time.monotonic() - t0
    assert len(digest) == 64
    raw = create(tmp_path / "big.raw", 1 << 30, "raw")  # sparse: the same content, another layout
    io(raw, *[f"write -P {1 + i:#x} {i * 16 * MIB + 4096} {MIB}" for i in range(64)], fmt="raw")
    assert content_digest(raw, "raw") == digest
    assert elapsed < 5.0, f"{elapsed:.2f} s"
