"""Helpers shared by the benchmarks: lab domains, console latency windows, statistics, private daemons.

Nothing here is part of the product. Every domain a bench creates is named
``bench-...`` and is removed in a ``finally`` block; a private libvirtd (used to
measure ``qemu.conf`` settings without touching the machine's daemon or its
configuration) lives in its own mount namespace and is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt

from libvirt_cgrep.lab import console
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.build import GuestArtifacts, build_guest

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")

_counter = itertools.count()


def unique_name(tag: str) -> str:
    """A domain name no other bench run uses: ``bench-<pid>-<tag><n>``."""
    return f"bench-{os.getpid()}-{tag}{next(_counter)}"


# --------------------------------------------------------------------------- statistics


def configs_type(max_vms: int, max_disks: int = 8) -> Callable[[str], list[tuple[int, int]]]:
    """An argparse type: ``VMSxDISKS,...`` (e.g. ``2x4,3x2``; empty for none) as (vms, disks) pairs; its error otherwise."""

    def parse(text: str) -> list[tuple[int, int]]:
        out = []
        for cfg in [c for c in text.split(",") if c]:
            vms, _, disks = cfg.partition("x")
            if not (vms.isdigit() and disks.isdigit() and 1 <= int(vms) <= max_vms and 1 <= int(disks) <= max_disks):
                raise argparse.ArgumentTypeError(
                    f"{cfg!r} is not VMSxDISKS with 1-{max_vms} VMs and 1-{max_disks} disks (e.g. 2x4)"
                )
            out.append((int(vms), int(disks)))
        return out

    return parse


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def percentile(xs: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------- console windows


def log_offset(path: Path) -> int:
    """Current size of the console log: ACK lines after this offset were printed later."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def acks_between(path: Path, start: int, end: int) -> tuple[console.Ack, ...]:
    """ACK lines printed between two offsets of the console log (only complete lines)."""
    if end <= start:
        return ()
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    cut = data.rfind(b"\n")
    text = data[: cut + 1].decode(errors="replace") if cut >= 0 else ""
    return console.parse(text).acks


def max_lat_ms(acks: Sequence[console.Ack]) -> float | None:
    return max(a.lat_max_us for a in acks) / 1000.0 if acks else None


@dataclass
class Window:
    """Offsets of one trial: quiet window [q0, q1), cut window [q1, q2)."""

    log: Path
    q0: int = 0
    q1: int = 0
    q2: int = 0

    def quiet_ms(self) -> float | None:
        return max_lat_ms(acks_between(self.log, self.q0, self.q1))

    def cut_ms(self) -> float | None:
        return max_lat_ms(acks_between(self.log, self.q1, self.q2))


# --------------------------------------------------------------------------- lab domains


def wait_progress(console_log: Path, records: int = 10, timeout: float = 60.0) -> int:
    """Wait until the workload acknowledged ``records`` more records; return the new last ack."""
    start = labdom.read_console(console_log).ack
    base = start.seq if start else -1
    return labdom.wait_for_ack(console_log, after=base + records, timeout=timeout).seq


_guest: GuestArtifacts | None = None


def guest_artifacts() -> GuestArtifacts:
    global _guest  # noqa: PLW0603 - built once per process
    if _guest is None:
        _guest = build_guest(offline=True)
    return _guest


@contextlib.contextmanager
def lab_domain(
    conn: libvirt.virConnect,
    disks: int,
    *,
    tag: str,
    size: int = 64 << 20,
    boot: tuple[Path, Path] | None = None,
    report_ms: int = 100,
    iothreads: int = 0,
) -> Iterator[labdom.LabDomain]:
    """A running lab domain with ``disks`` data disks; always removed afterwards.

    ``report_ms`` is the workload's ACK interval (each ACK line carries the max latency since the last);
    ``iothreads`` gives the disks QEMU I/O threads (see :class:`labdom.LabSpec`).

    ``boot`` (kernel, initrd) replaces the shared lab guest files: a private
    daemon must boot from its own copies (see :func:`boot_copies`).
    """
    g = guest_artifacts()
    kernel, initrd = boot or (g.kernel, g.initrd)
    name = unique_name(tag)
    spec = labdom.LabSpec(
        name=name,
        disks=disks,
        size=size,
        kernel=kernel,
        initrd=initrd,
        directory=labdom.lab_root() / name,
        report_ms=report_ms,
        iothreads=iothreads,
    )
    try:
        vm = labdom.up(conn, spec, timeout=120)
        wait_progress(vm.directory / "console.log", records=20)
        yield vm
    finally:
        with contextlib.suppress(Exception):
            labdom.down(conn, name)


@contextlib.contextmanager
def boot_copies() -> Iterator[tuple[Path, Path]]:
    """Private copies of the lab kernel and initrd, removed afterwards.

    libvirt's DAC driver labels the kernel and initrd of every domain it starts
    and keeps a reference count in the files' extended attributes. Two daemons
    sharing those files (one with ``remember_owner = 0``, say) undo each other's
    ownership and make the other's next start fail ("Setting different DAC user
    or group ... already in use"), so a private daemon boots from its own copies.
    """
    g = guest_artifacts()
    d = Path(tempfile.mkdtemp(prefix="bench-boot-", dir="/var/tmp"))
    try:
        os.chmod(d, 0o755)
        kernel, initrd = d / "vmlinuz", d / "initrd.img"
        shutil.copyfile(g.kernel, kernel)
        shutil.copyfile(g.initrd, initrd)
        for f in (kernel, initrd):
            os.chmod(f, 0o644)
        yield kernel, initrd
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- qemu.conf


def qemu_conf_text(path: Path = QEMU_CONF) -> str:
    return path.read_text()


# --------------------------------------------------------------------------- private libvirtd


#: Directories a private daemon gets its own empty copy of: state, definitions, caches, logs.
MASKED = ("/run/libvirt", "/etc/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu", "/var/log/libvirt/qemu")


@contextlib.contextmanager
def private_libvirtd(
    qemu_conf_extra: Mapping[str, str], *, tmpfs: Sequence[str] = (), start_timeout: float = 120.0
) -> Iterator[str]:
    """A second libvirtd with ``qemu.conf`` plus ``qemu_conf_extra``, in a private mount namespace.

    The machine's daemon, its configuration and its domains are untouched: the
    private daemon sees empty copies of libvirt's state directories (:data:`MASKED`,
    bind-mounted from a scratch directory on the same filesystem, so that file
    saves cost the same; those in ``tmpfs`` get a tmpfs instead) and a
    bind-mounted ``qemu.conf``; all vanish with its mount namespace. Yields the
    URI to reach it (``qemu:///system?socket=...``). The daemon and its virtlogd
    are stopped by pid on exit; the caller removes its domains first.
    """
    work = Path(tempfile.mkdtemp(prefix="bench-libvirtd-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    sock_dir = work / "sock"
    sock_dir.mkdir()
    conf = qemu_conf_text() + "\n# bench overrides\n" + "".join(f"{k} = {v}\n" for k, v in qemu_conf_extra.items())
    (work / "qemu.conf").write_text(conf)
    os.chmod(work / "qemu.conf", 0o600)
    (work / "libvirtd.conf").write_text(f'unix_sock_dir = "{sock_dir}"\n')
    mounts: list[str] = []
    for i, d in enumerate(MASKED):
        st = Path(d).stat()
        if d in tmpfs:
            mounts.append(f"mount -t tmpfs -o mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid} tmpfs {d}")
            continue
        copy = work / f"mask{i}"
        copy.mkdir()
        os.chown(copy, st.st_uid, st.st_gid)
        os.chmod(copy, st.st_mode & 0o7777)
        mounts.append(f"mount --bind {copy} {d}")
    script = (
        "set -e\n"
        + "\n".join(mounts)
        + f"""
mount --bind {work}/qemu.conf {QEMU_CONF}
virtlogd -d -p {work}/virtlogd.pid
exec libvirtd -f {work}/libvirtd.conf -p {work}/libvirtd.pid
"""
    )
    uri = f"qemu:///system?socket={sock_dir}/libvirt-sock"
    log = open(work / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"private libvirtd exited ({proc.returncode}): {(work / 'daemon.log').read_text()[-500:]}")
            try:
                libvirt.open(uri).close()
                break
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield uri
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        pidfile = work / "virtlogd.pid"
        with contextlib.suppress(Exception):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
