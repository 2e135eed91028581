"""Build the lab guest and boot it with plain QEMU (TCG, no libvirt).

First boot: the workload writes its dependent-write chain over two data disks
and reports acknowledged records.  QEMU is then killed.  Second boot, same
disks, scan mode: every acknowledged record must be there, without holes.
The images are also checked from the host with zlib.crc32, so the guest's
CRC and record layout agree with the Python side.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from libvirt_cgrep.lab.build import GuestArtifacts, build_guest

DISKS = 2
DISK_SIZE = 16 * 1024 * 1024
BS = 4096
SLOTS = DISK_SIZE // BS
BOOT_TIMEOUT = 30.0
ACK_WINDOW = 2.0  # seconds of ACK lines collected after the first one

_KV = re.compile(r"(\w+)=(-?\w+)")


def _fields(line: str) -> dict[str, str]:
    return dict(_KV.findall(line))


class Guest:
    """A QEMU process whose serial console is read line by line."""

    def __init__(self, art: GuestArtifacts, disks: Sequence[Path], cmdline: str, log: Path) -> None:
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-machine", "pc",
            "-m", "256",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-serial", "stdio",
            "-kernel", str(art.kernel),
            "-initrd", str(art.initrd),
            "-append", f"console=ttyS0 quiet loglevel=1 panic=-1 {cmdline}",
        ]  # fmt: skip
        for i, disk in enumerate(disks):
            argv += [
                "-drive", f"file={disk},format=qcow2,if=none,id=d{i}",
                "-device", f"virtio-blk-pci,drive=d{i},serial=cgrep-d{i}",
            ]  # fmt: skip
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.output: list[str] = []
        self._stderr = log.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.output.append(line)
            self.lines.put((time.monotonic(), line))

    def next_line(self, deadline: float) -> tuple[float, str] | None:
        """The next console line, or None when the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return self.lines.get(timeout=remaining)
        except queue.Empty:
            return None

    def wait_for(self, kind: str, deadline: float) -> tuple[float, dict[str, str]]:
        """(host time, fields) of the next ``CGREP <kind>`` line; fails on EXIT/FATAL or timeout."""
        while True:
            item = self.next_line(deadline)
            if item is None:
                raise AssertionError(f"no CGREP {kind} line in time; console:\n" + "\n".join(self.output[-30:]))
            t, line = item
            if "CGREP EXIT" in line or "CGREP FATAL" in line:
                raise AssertionError("workload failed; console:\n" + "\n".join(self.output[-30:]))
            if line.startswith(f"CGREP {kind} ") or line == f"CGREP {kind}":
                return t, _fields(line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        self._stderr.close()


def _host_scan(images: Sequence[Path], tmp: Path) -> tuple[int, int]:
    """(max seq, valid records) read from the images on the host."""
    max_seq, count = -1, 0
    for disk_index, image in enumerate(images):
        raw = tmp / f"{image.stem}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
        data = raw.read_bytes()
        for slot in range(SLOTS):
            block = data[slot * BS : (slot + 1) * BS]
            if block[:8] != b"CGREPRC1":
                continue
            assert struct.unpack_from("<I", block, BS - 4)[0] == zlib.crc32(block[: BS - 4]), f"bad crc d{disk_index}/{slot}"
            seq, vm, nvms, disk, ndisks, rslot, slots, bs = struct.unpack_from("<QIIIIQQI", block, 8)
            assert (vm, nvms, disk, ndisks, rslot, slots, bs) == (0, 1, disk_index, DISKS, slot, SLOTS, BS)
            assert (seq % DISKS, (seq // DISKS) % SLOTS) == (disk_index, slot), f"record {seq} at d{disk_index}/{slot}"
            assert block[64] == (seq * 131 + 64) & 0xFF
            max_seq = max(max_seq, seq)
            count += 1
    return max_seq, count


def test_lab_guest_boots_writes_and_scans(tmp_path: Path) -> None:
    assert shutil.which("qemu-system-x86_64"), "qemu-system-x86 is not installed"
    art = build_guest()
    assert art.kernel.is_file() and art.initrd.is_file()
    assert os.stat(art.initrd).st_mode & 0o004, "initrd must be world-readable (libvirt-qemu reads it)"

    disks = [tmp_path / f"d{i}.qcow2" for i in range(DISKS)]
    for disk in disks:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(DISK_SIZE)], check=True)

    # Boot 1: write mode.
    guest = Guest(art, disks, "cgrep.mode=write", tmp_path / "qemu-write.log")
    try:
        deadline = guest.started + BOOT_TIMEOUT
        _, ready = guest.wait_for("READY", deadline)
        assert ready["mode"] == "write"
        assert (ready["disks"], ready["bs"], ready["slots"]) == (str(DISKS), str(BS), str(SLOTS))
        _, scan = guest.wait_for("SCAN", deadline)
        assert scan["max"] == "-1"
        t_first, first = guest.wait_for("ACK", deadline)
        acks = [first]
        while True:
            item = guest.next_line(min(deadline, t_first + ACK_WINDOW))
            if item is None:
                break
            if item[1].startswith("CGREP ACK "):
                acks.append(_fields(item[1]))
    finally:
        guest.stop()

    seqs = [int(a["seq"]) for a in acks]
    assert len(acks) >= 5, acks
    prev = -1
    for a in acks:  # each report accounts for exactly the records acknowledged since the last one
        seq, n = int(a["seq"]), int(a["n"])
        assert seq - prev == n, acks
        prev = seq
    assert seqs[-1] > seqs[0] >= 0, seqs
    last_ack = seqs[-1]

    # Boot 2: scan mode on the same disks.
    guest = Guest(art, disks, "cgrep.mode=scan", tmp_path / "qemu-scan.log")
    try:
        deadline = guest.started + BOOT_TIMEOUT
        _, ready = guest.wait_for("READY", deadline)
        assert ready["mode"] == "scan"
        _, scan = guest.wait_for("SCAN", deadline)
        guest.wait_for("SCANDONE", deadline)
    finally:
        guest.stop()

    scan_max = int(scan["max"])
    assert scan_max >= last_ack, (scan, last_ack)
    assert scan["holes"] == "0", scan
    assert scan["bad"] == "0", scan
    assert int(scan["count"]) == min(scan_max + 1, DISKS * SLOTS), scan

    assert _host_scan(disks, tmp_path) == (scan_max, int(scan["count"]))
