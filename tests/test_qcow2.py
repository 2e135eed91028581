"""The native qcow2 writer (adapters.qcow2) and the store's writer around it, checked with QEMU's own tools.

Each image is written twice: by our writer, and by ``qemu-io`` applying the
same requests to an overlay ``qemu-img create`` made. ``qemu-img compare``
must find them identical and ``qemu-img check`` must find ours clean.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from libvirt_cgrep.adapters.fs import copy_range
from libvirt_cgrep.adapters.qcow2 import CLUSTER, Qcow2Writer, Unaligned, create_image, virtual_size
from libvirt_cgrep.errors import Qcow2Error
from libvirt_cgrep.replica.store import StagedDisk, StagedWriter

MIB = 1 << 20


def qemu(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


def piped(data: bytes) -> tuple[int, threading.Thread]:
    """A pipe fed with ``data`` from a thread (the payload arrives the way the link delivers it)."""
    r, w = os.pipe()

    def feed() -> None:
        for i in range(0, len(data), 1 << 16):
            os.write(w, data[i : i + (1 << 16)])
        os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    return r, t


def apply(writer: Qcow2Writer | StagedWriter, requests: list[tuple[str, int, int, int]]) -> list[str]:
    """Apply (kind, offset, length, byte) requests; returns the same as qemu-io commands."""
    cmds = []
    for kind, off, n, pat in requests:
        if kind == "zero":
            writer.write_zeroes(off, n)
            cmds.append(f"write -z {off} {n}")
            continue
        data = bytes([pat]) * n
        if kind == "splice":
            r, t = piped(data)
            writer.write_from(off, r, n)
            t.join()
            os.close(r)
        elif kind == "copy":  # copied from another file (copyv: copy_file_range), at an unrelated file offset
            where = writer.path if isinstance(writer, Qcow2Writer) else writer.disk.path
            with tempfile.TemporaryFile(dir=where.parent) as src:  # the same filesystem: a real copy_file_range
                os.pwrite(src.fileno(), data, 12345 + off % 7)
                writer.copy_from(off, src.fileno(), 12345 + off % 7, n)
        else:
            writer.write(off, data)
        cmds.append(f"write -P {pat} {off} {n}")
    return cmds


def requests_for(size: int, seed: int, count: int = 120, align: int = CLUSTER) -> list[tuple[str, int, int, int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        off = rnd.randrange(size // align) * align
        n = min(rnd.randint(1, 24) * align, size - off)
        kind = rnd.choice(["zero", "write", "splice", "copy"])
        out.append((kind, off, n, rnd.randrange(1, 255)))
    return out


def reference(tmp_path: Path, size: int, backing: str | None, cmds: list[str]) -> Path:
    ref = tmp_path / "ref.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-F", "qcow2", "-b", backing]
    qemu(*argv, str(ref), str(size))
    io = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        io += ["-c", c]
    qemu(*io, str(ref))
    return ref


def assert_same(ours: Path, ref: Path) -> None:
    qemu("qemu-img", "check", str(ours))  # exit 0: no errors, no leaks
    assert "identical" in qemu("qemu-img", "compare", str(ours), str(ref))


@pytest.mark.parametrize("backed", [True, False], ids=["delta", "base"])
@pytest.mark.parametrize("size", [64 * MIB, 1100 * MIB + 4096], ids=["one-l2", "three-l2-odd-end"])
def test_native_image_equals_qemus(tmp_path: Path, backed: bool, size: int) -> None:
    backing = None
    if backed:
        base = tmp_path / "base.qcow2"
        qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
        qemu(
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            f"write -P 0x22 {size // 2 // CLUSTER * CLUSTER} 8M",
            str(base),
        )
        backing = base.name
    reqs = requests_for(size, seed=size + backed)
    last = size // CLUSTER * CLUSTER
    if last < size:  # the odd end: a partial last cluster
        reqs.append(("write", last, size - last, 0x33))
    w = Qcow2Writer(tmp_path / "new.qcow2", size, backing)
    cmds = apply(w, reqs)
    w.finish()
    w.close()
    assert_same(tmp_path / "new.qcow2", reference(tmp_path, size, backing, cmds))
    info = qemu("qemu-img", "info", str(tmp_path / "new.qcow2"))
    assert ("backing file: base.qcow2" in info) == backed


def test_native_rejects_unaligned_and_outside_requests(tmp_path: Path) -> None:
    w = Qcow2Writer(tmp_path / "x.qcow2", 4 * MIB)
    r, t = piped(b"y" * 4096)
    with pytest.raises(Unaligned):
        w.write_from(4096, r, 4096)
    assert os.read(r, 10) == b"yyyyyyyyyy", "an unaligned request consumed payload"
    t.join()
    os.close(r)
    with pytest.raises(Unaligned):
        w.write(0, b"x" * 100)
    with pytest.raises(Qcow2Error, match="outside"):
        w.write(4 * MIB, b"x" * CLUSTER)
    w.close()


def test_a_payload_cut_short_breaks_the_writer(tmp_path: Path) -> None:
    w = Qcow2Writer(tmp_path / "x.qcow2", 4 * MIB)
    r, t = piped(b"z" * CLUSTER)  # one cluster arrives, two were announced
    with pytest.raises(Qcow2Error, match="mid-payload"):
        w.write_from(0, r, 2 * CLUSTER)
    t.join()
    os.close(r)
    assert w.broken
    with pytest.raises(Qcow2Error):
        w.finish()
    w.close()


def test_staged_writer_falls_back_to_qemu_nbd(tmp_path: Path) -> None:
    """Aligned requests natively, then an unaligned one: the rest goes through qemu-nbd; one image, QEMU's content."""
    size = 32 * MIB
    base = tmp_path / "base.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 32M", str(base))
    path = tmp_path / ".staging-x.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name, str(path), str(size))
    w = StagedWriter(StagedDisk("d", "vda", size, path, tmp_path / "x.qcow2", base.name))
    reqs = requests_for(size, seed=7, count=30)
    reqs += [("splice", 4096, 8192, 0x44), ("zero", 3 * CLUSTER + 512, 1024, 0)]  # sub-cluster: qemu-nbd from here
    # through qemu-nbd, pipelined requests may complete in any order: like a real shipment, these do not overlap
    for i, (kind, _, n, pat) in enumerate(requests_for(size, seed=8, count=30)):
        reqs.append((kind, 16 * MIB + i * (MIB // 2), min(n, MIB // 2), pat))
    cmds = apply(w, reqs)
    assert w.nbd is not None and w.native is None
    w.send_flush()
    w.wait()
    w.finish()
    assert_same(path, reference(tmp_path, size, base.name, cmds))


def test_create_image_is_what_qemu_img_creates(tmp_path: Path) -> None:
    """An empty overlay made in-process reads like ``qemu-img create -b``'s: same size, backing, content; exclusive."""
    base = tmp_path / "base.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(96 * MIB + CLUSTER))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(base))
    assert virtual_size(base) == 96 * MIB + CLUSTER
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create_image(ours, virtual_size(base), str(base))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(theirs))
    assert_same(ours, theirs)
    a, b = (json.loads(qemu("qemu-img", "info", "--output=json", str(p))) for p in (ours, theirs))
    for key in ("virtual-size", "backing-filename", "backing-filename-format", "cluster-size"):
        assert a[key] == b[key], key
    assert oct(ours.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(FileExistsError):
        create_image(ours, MIB)
    with pytest.raises(Qcow2Error, match="not a qcow2"):
        virtual_size(Path(__file__))


def test_copy_range_across_filesystems_falls_back(tmp_path: Path) -> None:
    """A source on another filesystem (a memfd) is copied all the same (pread/pwrite when the kernel refuses)."""
    data = os.urandom(3 * MIB + 17)
    src = os.memfd_create("src")
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(src, data, 0)
        copy_range(src, 5, dst, 100, len(data) - 5)
        assert os.pread(dst, len(data), 100) == data[5:]
        with pytest.raises(OSError, match="source ends early"):
            copy_range(src, len(data) - 10, dst, 0, 20)
    finally:
        os.close(src)
        os.close(dst)
