"""Benchmark shipping: bytes on the link vs changed clusters, and shipping speed vs a raw sequential copy.

Run as ``.venv/bin/python bench/ship.py [--rate 256] [--seconds 5] [--cycles 5] [--out bench/results/ship.json]``
(root, libvirtd running, the lab guest built). See bench/README.md for the columns.

One lab domain (``bench-...``, 4 disks of 64 MiB) runs the dependent-write
workload at ``--rate`` records/s of 4 KiB. Two phases in the same run, on the
same domain: a seed then ``--cycles`` delta cycles of ``virt-cgrep sync`` to a
local target directory, then a seed and ``--cycles`` delta cycles to a target
on a private loopback sshd (one domain feeds one target at a time: a cycle
folds what it shipped into the primary's base, so alternating targets would
starve each of the other's folded writes). The guest writes for ``--seconds``
before each cycle. Right after each cycle, a file of exactly the cycle's
changed bytes is built on the same filesystem (fsynced and dropped from the
page cache, like the guest's O_DIRECT writes) and copied the plain way:
``cp`` for the local target, ``cat FILE | ssh ... 'cat > FILE'`` for ssh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import URI, fmt, guest_artifacts, median, unique_name, wait_progress
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.sshd import Sshd, loopback_sshd

MIB = 1 << 20
#: the sync's phases (its JSON ``phases_ms``), in cycle order
PHASES = ("open", "cut", "plan", "begin", "map_wait", "send", "commit", "fold")


# --------------------------------------------------------------------------- loopback sshd


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Cycle:
    link: str
    cycle: int
    full: bool
    changed_bytes: int
    bytes_shipped: int
    ship_s: float
    total_s: float
    cut_ms: float
    raw_s: float | None  # the plain copy of changed_bytes (cp, or cat | ssh)
    raw_mux_s: float | None  # the same through an open ssh master connection: no connection setup (ssh only)
    phases_ms: dict[str, float] = field(default_factory=dict)  # the sync's own phase timings

    @property
    def send_s(self) -> float | None:
        """The streaming part of the ship: first to last extent on the link (no map wait, no staging)."""
        v = self.phases_ms.get("send")
        return v / 1000.0 if v else None

    @property
    def fixed_ms(self) -> float:
        """Everything of the cycle but the streaming: cut, qemu-img, staging, commit (fsync, sha256), fold."""
        return self.total_s * 1000.0 - (self.phases_ms.get("send") or 0.0)

    @property
    def stream_ratio(self) -> float | None:
        """Streaming throughput / raw copy throughput (= raw_s / send_s)."""
        send = self.send_s
        return self.raw_s / send if self.raw_s and send else None

    @property
    def wire_ratio(self) -> float | None:
        return self.bytes_shipped / self.changed_bytes if self.changed_bytes else None

    @property
    def ship_mib_s(self) -> float | None:
        return self.changed_bytes / MIB / self.ship_s if self.ship_s > 0 else None

    @property
    def raw_mib_s(self) -> float | None:
        return self.changed_bytes / MIB / self.raw_s if self.raw_s else None

    @property
    def speed_ratio(self) -> float | None:
        """Shipping throughput / raw copy throughput (= raw_s / ship_s)."""
        return self.raw_s / self.ship_s if self.raw_s and self.ship_s > 0 else None

    @property
    def speed_ratio_net(self) -> float | None:
        """Against the copy over an established connection, as the sync's link is set up before ``ship_s`` starts."""
        if self.raw_mux_s is None or self.ship_s <= 0:
            return self.speed_ratio
        return self.raw_mux_s / self.ship_s

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "wire_ratio": self.wire_ratio,
            "ship_mib_s": self.ship_mib_s,
            "raw_mib_s": self.raw_mib_s,
            "speed_ratio": self.speed_ratio,
            "speed_ratio_net": self.speed_ratio_net,
            "send_s": self.send_s,
            "fixed_ms": self.fixed_ms,
            "stream_ratio": self.stream_ratio,
        }


def sync_json(name: str, target: str, env: Mapping[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", URI, "sync", name, "--target", target, "--json"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, **env},
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"sync to {target} failed ({out.returncode}): {out.stderr.strip()}")
    res: dict[str, Any] = json.loads(out.stdout)
    return res


def make_file(path: Path, size: int) -> None:
    """``size`` random bytes, on disk and out of the page cache (the guest writes with O_DIRECT)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    drop_cache(path)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(argv: Sequence[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


@contextlib.contextmanager
def ssh_master(sshd: Sshd, control: Path) -> Iterator[Path]:
    """An ssh master connection (``ssh -M -N``) on a fresh socket ``control``; stopped by pid on exit."""
    control.unlink(missing_ok=True)
    log = control.with_suffix(".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(sshd.base("-M", "-S", str(control), "-N"), stdin=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(sshd.base("-S", str(control), "-O", "check"), capture_output=True, check=False).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the ssh master connection did not start: {log.read_text().strip()}")
            time.sleep(0.05)
        yield control
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        control.unlink(missing_ok=True)


def raw_copy_ssh(src: Path, sshd: Sshd, dst: Path, control: Path | None = None) -> float:
    """Time ``cat SRC | ssh ... 'cat > DST'`` (through the master connection ``control`` if given)."""
    t0 = time.monotonic()
    cat = subprocess.Popen(["cat", str(src)], stdout=subprocess.PIPE)
    try:
        argv = sshd.argv(f"cat > {dst}", control=control)
        rc = subprocess.run(argv, stdin=cat.stdout, stdout=subprocess.DEVNULL, check=False).returncode
    finally:
        if cat.stdout is not None:
            cat.stdout.close()
        cat.wait()
    if rc != 0 or cat.returncode != 0:
        raise RuntimeError(f"raw ssh copy failed (cat {cat.returncode}, ssh {rc})")
    return time.monotonic() - t0


def run_phase(
    vm: labdom.LabDomain,
    link: str,
    target: str,
    env: Mapping[str, str],
    *,
    cycles: int,
    seconds: float,
    scratch: Path,
    sshd: Sshd | None,
) -> list[Cycle]:
    out: list[Cycle] = []
    log = vm.directory / "console.log"
    for n in range(cycles + 1):  # cycle 0 is the seed (a full copy)
        if n:
            time.sleep(seconds)
        wait_progress(log, records=1)
        res = sync_json(vm.name, target, env)
        full = any(d["full"] for d in res["disks"])
        if n and full:
            raise RuntimeError(f"{link} cycle {n} was a full resync: {res['disks']}")
        raw_s = mux_s = None
        changed = int(res["changed_bytes"])
        if n and changed:
            src, dst = scratch / "raw-src.bin", scratch / "raw-dst" / "raw.bin"
            make_file(src, changed)
            if sshd is None:
                raw_s = timed(["cp", str(src), str(dst)])
            else:
                raw_s = raw_copy_ssh(src, sshd, dst)
                with ssh_master(sshd, scratch / f"ctl{n}") as control:
                    drop_cache(src)
                    mux_s = raw_copy_ssh(src, sshd, dst, control)
            if dst.stat().st_size != changed:
                raise RuntimeError(f"raw copy wrote {dst.stat().st_size} bytes, not {changed}")
            src.unlink()
            dst.unlink()
        c = Cycle(
            link,
            n,
            full,
            changed,
            int(res["bytes_shipped"]),
            float(res["ship_s"]),
            float(res["total_s"]),
            float(res["cut_ms"]),
            raw_s,
            mux_s,
            {k: float(v) for k, v in res.get("phases_ms", {}).items()},
        )
        out.append(c)
        print(
            f"{link:5} cycle {n}: {'seed' if full else 'delta'} {fmt(changed / MIB)} MiB changed,"
            f" shipped {fmt(c.bytes_shipped / MIB)} MiB"
            f" in {fmt(c.ship_s, 3)} s (streaming {fmt(c.send_s, 3)} s); raw copy {fmt(raw_s, 3)} s;"
            f" phases ms {c.phases_ms}",
            file=sys.stderr,
            flush=True,
        )
    return out


def summarize(cycles: Sequence[Cycle]) -> dict[str, float | None]:
    deltas = [c for c in cycles if not c.full]

    def med(xs: Sequence[float | None]) -> float | None:
        return median([x for x in xs if x is not None])

    changed = sum(c.changed_bytes for c in deltas)
    ship_s = sum(c.ship_s for c in deltas)
    raw_s = sum(c.raw_s for c in deltas if c.raw_s)
    return {
        "cycles": len(deltas),
        "changed_mib_median": med([c.changed_bytes / MIB for c in deltas]),
        "wire_ratio_total": sum(c.bytes_shipped for c in deltas) / changed if changed else None,
        "wire_ratio_median": med([c.wire_ratio for c in deltas]),
        "ship_mib_s_median": med([c.ship_mib_s for c in deltas]),
        "raw_mib_s_median": med([c.raw_mib_s for c in deltas]),
        "speed_ratio_median": med([c.speed_ratio for c in deltas]),
        "speed_ratio_total": raw_s / ship_s if ship_s > 0 and raw_s else None,
        "speed_ratio_net_median": med([c.speed_ratio_net for c in deltas]),
        "raw_mux_mib_s_median": med([c.changed_bytes / MIB / c.raw_mux_s for c in deltas if c.raw_mux_s]),
        "sync_total_s_median": med([c.total_s for c in deltas]),
        "stream_mib_s_median": med([c.changed_bytes / MIB / c.send_s for c in deltas if c.send_s]),
        "stream_ratio_median": med([c.stream_ratio for c in deltas]),
        "stream_ratio_total": raw_s / send_s if (send_s := sum(c.send_s or 0.0 for c in deltas)) > 0 and raw_s else None,
        "fixed_ms_median": med([c.fixed_ms for c in deltas]),
        **{f"{k}_ms_median": med([c.phases_ms.get(k) for c in deltas]) for k in PHASES},
    }


def table(cycles: Sequence[Cycle], summary: Mapping[str, Mapping[str, float | None]]) -> str:
    head = (
        f"{'link':5} {'cycle':>5} {'changed MiB':>11} {'shipped/chg':>11} {'ship MiB/s':>10} {'raw MiB/s':>9}"
        f" {'ship/raw':>8} {'net':>5} {'stream/raw':>10} {'fixed ms':>8} {'sync s':>7}"
    )
    rows = [head, "-" * len(head)]
    for c in cycles:
        if c.full:
            continue
        rows.append(
            f"{c.link:5} {c.cycle:>5} {fmt(c.changed_bytes / MIB):>11} {fmt(c.wire_ratio, 3):>11} {fmt(c.ship_mib_s):>10}"
            f" {fmt(c.raw_mib_s):>9} {fmt(c.speed_ratio, 2):>8} {fmt(c.speed_ratio_net, 2):>5}"
            f" {fmt(c.stream_ratio, 2):>10} {fmt(c.fixed_ms, 0):>8} {fmt(c.total_s, 2):>7}"
        )
    rows.append("-" * len(head))
    for link, s in summary.items():
        rows.append(
            f"{link:5} {'med':>5} {fmt(s['changed_mib_median']):>11} {fmt(s['wire_ratio_median'], 3):>11}"
            f" {fmt(s['ship_mib_s_median']):>10} {fmt(s['raw_mib_s_median']):>9} {fmt(s['speed_ratio_median'], 2):>8}"
            f" {fmt(s['speed_ratio_net_median'], 2):>5} {fmt(s['stream_ratio_median'], 2):>10}"
            f" {fmt(s['fixed_ms_median'], 0):>8} {fmt(s['sync_total_s_median'], 2):>7}"
        )
    rows += ["", "phase medians, ms: " + ", ".join(PHASES)]
    for link, s in summary.items():
        rows.append(f"{link:5} " + " ".join(f"{fmt(s[f'{k}_ms_median'], 0):>7}" for k in PHASES))
    return "\n".join(rows)


def _host() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout.strip().splitlines()[0]
        return "?"

    return {
        "libvirt": out(["virsh", "--version"]),
        "qemu": out(["qemu-system-x86_64", "--version"]),
        "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip(),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=256, help="guest records/s of 4 KiB (default 256: 1 MiB/s over the disks)")
    ap.add_argument("--seconds", type=float, default=5.0, help="guest writing time before each cycle (default 5)")
    ap.add_argument("--cycles", type=int, default=5, help="delta cycles per link after the seed (default 5)")
    ap.add_argument("--disks", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="disk size in MiB (default 64)")
    ap.add_argument("--bs", type=int, default=4096, help="guest record size in bytes (default 4096; larger: more MiB/s)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ship.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root (lab domains on qemu:///system, a private sshd)")
    if args.rate <= 0 or args.cycles <= 0 or args.seconds <= 0:
        ap.error("--rate, --cycles and --seconds must be positive")
    host = _host()
    started = datetime.now(UTC).isoformat()
    g = guest_artifacts()
    name = unique_name("ship")
    spec = labdom.LabSpec(
        name=name,
        disks=args.disks,
        size=args.size * MIB,
        kernel=g.kernel,
        initrd=g.initrd,
        directory=labdom.lab_root() / name,
        rate=args.rate,
        bs=args.bs,
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-ship-", dir="/var/tmp"))
    conn = lv.connect(URI)
    cycles: list[Cycle] = []
    same_fs: bool | None = None
    state = "?"
    try:
        (scratch / "raw-dst").mkdir()
        with loopback_sshd(scratch / "sshd") as sshd:
            vm = labdom.up(conn, spec, timeout=120)
            try:
                wait_progress(vm.directory / "console.log", records=20)
                same_fs = os.stat(scratch).st_dev == os.stat(vm.directory).st_dev
                cycles += run_phase(
                    vm, "local", str(scratch / "local"), {}, cycles=args.cycles, seconds=args.seconds, scratch=scratch, sshd=None
                )
                cycles += run_phase(
                    vm,
                    "ssh",
                    sshd.target(scratch / "ssh"),
                    sshd.env(),
                    cycles=args.cycles,
                    seconds=args.seconds,
                    scratch=scratch,
                    sshd=sshd,
                )
                state = labdom.get(conn, name).state
            finally:
                with contextlib.suppress(Exception):
                    labdom.down(conn, name)
    finally:
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {link: summarize([c for c in cycles if c.link == link]) for link in ("local", "ssh")}
    host["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = {
        "started_utc": started,
        "finished_utc": datetime.now(UTC).isoformat(),
        "params": {
            "rate": args.rate,
            "bs": args.bs,
            "seconds": args.seconds,
            "cycles": args.cycles,
            "disks": args.disks,
            "size_mib": args.size,
        },
        "scratch_on_lab_filesystem": same_fs,
        "guest_state_after": state,
        "summary": summary,
        "cycles": [c.as_dict() for c in cycles],
        "host": host,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"ship bench: {args.disks} disks x {args.size} MiB, guest {args.rate} records/s of {args.bs // 1024} KiB, "
        f"{args.seconds:g} s between cycles, {args.cycles} delta cycles per link"
    )
    print(table(cycles, summary))
    print("\nshipped/chg = bytes_shipped / changed_bytes; ship/raw = (changed_bytes / ship_s) / (changed_bytes / raw copy s)")
    print(
        "stream/raw = the same with the streaming phase only (first to last extent on the link); fixed ms = the whole"
        " cycle minus the streaming (cut, qemu-img, staging, commit with fsync and sha256, fold)"
    )
    print(
        "the ssh raw copy includes ssh's connection setup; net = ship/raw against the same copy through an open"
        f" ssh master connection (median {fmt(summary['ssh']['raw_mux_mib_s_median'])} MiB/s)"
    )
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
