"""Benchmark the group cut: several guests held by one fence, side by side with a naive per-VM sequence.

Run as ``.venv/bin/python bench/group.py [--configs 2x4,3x2] [--trials 20] [--qmp] [--out FILE]``
(root, libvirtd running). See bench/README.md.

For each configuration (VMS x DISKS) lab guests running the dependent-write
workload are started (fresh ones every ``--epoch`` rounds, so chains stay
short). Every round runs three methods, in a rotating order:

- ``single``: the first VM alone, ``take_point([vm0], fence='suspend')``: the
  single-VM reference, on the same guest, the same chain depth, the same load;
- ``group``: every VM, ``take_point(vms, fence='suspend')``: one guardian,
  guests paused in parallel (one connection each), one transaction each,
  resumed in parallel;
- ``staged`` (the previous group hold, kept as a lever's control): every
  guest paused in parallel, then every guest cut in parallel, then every
  guest resumed in parallel, a fresh thread per guest and stage (no guardian);
- ``naive``: overlays created for every VM first, then per VM one after the
  other: suspend, the atomic snapshot (the backend's one transaction), resume.

Measured from the host: ``hold`` (first pause to last resume), ``cut`` (the
slowest transaction), and for every guest its extra max write latency (max
``lat_max_us`` in the window around the call minus that of the quiet second
before). With ``--qmp`` the same runs on bare QEMU processes (no libvirt).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import libvirt

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    URI,
    Window,
    boot_copies,
    configs_type,
    fmt,
    guest_artifacts,
    lab_domain,
    log_offset,
    median,
    percentile,
    private_libvirtd,
    ratio,
    wait_progress,
)
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.adapters.proc import wait_listening
from libvirt_cgrep.core.model import GuestCut
from libvirt_cgrep.core.plan import plan_cut, point_id, select_disks
from libvirt_cgrep.engine.backend import Backend
from libvirt_cgrep.engine.point import _each, take_point
from libvirt_cgrep.lab.domain import wait_for_ack

METHODS = ("single", "group", "staged", "naive")
#: The guardian's deadline for the measured holds: long, so that a loaded machine measures instead of failing.
DEADLINE_MS = 10_000.0


@dataclass
class Sample:
    method: str
    trial: int
    hold_ms: float | None
    cut_ms: float | None
    #: per guest: extra max write latency (cut window minus quiet window), ms; None where no ACK line fell in a window
    extra_lat_ms: list[float | None] = field(default_factory=list)
    #: naive only: each VM's own pause (suspend to resume), ms
    per_vm_hold_ms: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Guest:
    """A running guest under test: how to cut it, where its console log is."""

    name: str
    log: Path
    backend: Callable[[], Backend]


# --------------------------------------------------------------------------- methods


def m_take(guests: Sequence[Guest]) -> tuple[float | None, float | None, list[float]]:
    backends = [g.backend() for g in guests]
    try:
        res = take_point(backends, fence="suspend", deadline_ms=DEADLINE_MS)
    finally:
        for b in backends:
            b.close()
    return res.fence_ms, res.cut_ms, []


def m_naive(guests: Sequence[Guest]) -> tuple[float | None, float | None, list[float]]:
    """Overlays for every VM first; then per VM: suspend, one atomic transaction, resume (one after the other)."""
    backends = [g.backend() for g in guests]
    try:
        found = [b.discover() for b in backends]
        plan = plan_cut(point_id(datetime.now(UTC)), [(g, select_disks(g)) for g in found])
        for b, txn in zip(backends, plan.transactions, strict=True):
            b.prepare(txn)
        per_vm: list[float] = []
        cuts: list[float] = []
        t0 = time.perf_counter()
        for b, txn in zip(backends, plan.transactions, strict=True):
            a = time.perf_counter()
            b.pause()
            try:
                c = b.cut(txn)
            finally:
                b.resume()
            per_vm.append((time.perf_counter() - a) * 1000.0)
            cuts.append(c.cut_ms)
        span = (time.perf_counter() - t0) * 1000.0
        return span, max(cuts), per_vm
    finally:
        for b in backends:
            b.close()


def m_staged(guests: Sequence[Guest]) -> tuple[float | None, float | None, list[float]]:
    """Overlays first; then pause all, cut all, resume all (each stage in parallel threads started in the hold)."""
    backends = [g.backend() for g in guests]
    try:
        found = [b.discover() for b in backends]
        plan = plan_cut(point_id(datetime.now(UTC)), [(g, select_disks(g)) for g in found])
        pairs = list(zip(backends, plan.transactions, strict=True))
        for b, txn in pairs:
            b.prepare(txn)
        t0 = time.perf_counter()
        try:
            _raise(_each([b.pause for b, _ in pairs]))
            cuts = _each([functools.partial(b.cut, txn) for b, txn in pairs])
        finally:
            resumed = _each([b.resume for b, _ in pairs])
        span = (time.perf_counter() - t0) * 1000.0
        _raise(cuts)
        _raise(resumed)
        return span, max(c.cut_ms for c in cuts if isinstance(c, GuestCut)), []
    finally:
        for b in backends:
            b.close()


def _raise(results: Sequence[object]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def one(method: str, guests: Sequence[Guest], trial: int, quiet_s: float = 1.0, tail_s: float = 0.3) -> Sample:
    chosen = guests[:1] if method == "single" else guests
    windows = [Window(g.log) for g in guests]
    for w in windows:
        w.q0 = log_offset(w.log)
    time.sleep(quiet_s)
    for w in windows:
        w.q1 = log_offset(w.log)
    try:
        fn = {"naive": m_naive, "staged": m_staged}.get(method, m_take)
        hold, cut, per_vm = fn(chosen)
        err = None
    except Exception as exc:
        hold, cut, per_vm, err = None, None, [], f"{type(exc).__name__}: {exc}"
        print(f"  {method} trial {trial} FAILED: {err}", file=sys.stderr, flush=True)
    time.sleep(tail_s)
    extra: list[float | None] = []
    for w in windows[: len(chosen)]:
        w.q2 = log_offset(w.log)
        q, c = w.quiet_ms(), w.cut_ms()
        extra.append(None if q is None or c is None else c - q)
    return Sample(method, trial, hold, cut, extra, per_vm, err)


# --------------------------------------------------------------------------- guests


@contextlib.contextmanager
def libvirt_guests(
    conn: libvirt.virConnect, vms: int, disks: int, uri: str = URI, boot: tuple[Path, Path] | None = None
) -> Iterator[list[Guest]]:
    with contextlib.ExitStack() as stack:
        out = []
        for _ in range(vms):
            vm = stack.enter_context(lab_domain(conn, disks, tag=f"grp{vms}x{disks}-", size=32 << 20, boot=boot))
            name = vm.name

            def make(name: str = name) -> Backend:
                from libvirt_cgrep.engine.libvirt_backend import LibvirtBackend

                return LibvirtBackend(lv.connect(uri), name, uri)  # one connection per domain

            out.append(Guest(name, vm.directory / "console.log", make))
        yield out


CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 cgrep.mode=write"


@contextlib.contextmanager
def qmp_guests(vms: int, disks: int) -> Iterator[list[Guest]]:
    """Bare QEMU processes (no libvirt) with the lab workload; two QMP sockets each (backend, guardian)."""
    g = guest_artifacts()
    root = Path(tempfile.mkdtemp(prefix="bench-group-qmp-", dir="/var/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        out = []
        for v in range(vms):
            d = root / f"vm{v}"
            d.mkdir()
            argv = [
                "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "192", "-nodefaults", "-nographic",
                "-kernel", str(g.kernel), "-initrd", str(g.initrd), "-append", CMDLINE,
                "-serial", f"file:{d / 'console.log'}", "-name", f"bench-{os.getpid()}-qmp{v}",
            ]  # fmt: skip
            for i in range(disks):
                img = d / f"vd{'abcdefgh'[i]}.qcow2"
                qemu_img.create_qcow2(img, 32 << 20)
                argv += [
                    "-blockdev", f"driver=file,node-name=file{i},filename={img}",
                    "-blockdev", f"driver=qcow2,node-name=disk{i},file=file{i}",
                    "-device", f"virtio-blk-pci,drive=disk{i},id=vd{'abcdefgh'[i]},serial=cgrep-d{i}",
                ]  # fmt: skip
            qmp, guard = d / "qmp.sock", d / "guardian.sock"
            argv += ["-qmp", f"unix:{qmp},server=on,wait=off", "-qmp", f"unix:{guard},server=on,wait=off"]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_listening([str(qmp), str(guard)], procs[-1], what="QEMU", timeout=30)

            def make(q: Path = qmp, gd: Path = guard) -> Backend:
                from libvirt_cgrep.engine.qmp_backend import QMPBackend

                return QMPBackend(str(q), guardian_socket=str(gd))

            out.append(Guest(f"qmp{v}", d / "console.log", make))
        for gu in out:
            wait_for_ack(gu.log, after=100, timeout=120)
        yield out
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)


# --------------------------------------------------------------------------- runs


def run_config(
    open_guests: Callable[[], contextlib.AbstractContextManager[list[Guest]]], trials: int, epoch: int, label: str
) -> list[Sample]:
    samples: list[Sample] = []
    t = 0
    while t < trials:
        with open_guests() as guests:
            for _ in range(min(epoch, trials - t)):
                k = t % len(METHODS)
                for m in [*METHODS[k:], *METHODS[:k]]:
                    samples.append(one(m, guests, t))
                for gu in guests:
                    wait_progress(gu.log, records=5)
                t += 1
                print(f"  {label}: round {t}/{trials}", file=sys.stderr, flush=True)
    return samples


def summarize(samples: Sequence[Sample]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for m in METHODS:
        ss = [s for s in samples if s.method == m and s.error is None]
        holds = [s.hold_ms for s in ss if s.hold_ms is not None]
        cuts = [s.cut_ms for s in ss if s.cut_ms is not None]
        worst = [max(x for x in s.extra_lat_ms if x is not None) for s in ss if any(x is not None for x in s.extra_lat_ms)]
        out[m] = {
            "n": float(len(ss)),
            "errors": float(sum(1 for s in samples if s.method == m and s.error)),
            "hold_median": median(holds),
            "hold_p90": percentile(holds, 90),
            "cut_median": median(cuts),
            "extra_lat_worst_guest_median": median(worst),
            "extra_lat_worst_guest_p90": percentile(worst, 90),
        }
    # paired: the same round's group (or naive) hold over its single-VM hold
    single = {s.trial: s.hold_ms for s in samples if s.method == "single" and s.error is None}
    for m in ("group", "staged", "naive"):
        rs = [r for s in samples if s.method == m and (r := ratio(s.hold_ms, single.get(s.trial))) is not None]
        out[m]["hold_over_single_paired_median"] = median(rs)
        out[m]["hold_over_single"] = ratio(out[m]["hold_median"], out["single"]["hold_median"])
    return out


def table(results: dict[str, dict[str, dict[str, float | None]]]) -> str:
    lines = [
        f"{'config':<12} {'method':<7} {'n':>3} {'hold ms':>8} {'p90':>7} {'cut ms':>7} {'x single':>8} "
        f"{'paired':>7} {'extra lat ms (worst guest)':>27}"
    ]
    for cfg, per in results.items():
        for m, s in per.items():
            lines.append(
                f"{cfg:<12} {m:<7} {fmt(s['n'], 0):>3} {fmt(s['hold_median']):>8} {fmt(s['hold_p90']):>7} "
                f"{fmt(s['cut_median']):>7} {fmt(s.get('hold_over_single'), 2):>8} "
                f"{fmt(s.get('hold_over_single_paired_median'), 2):>7} "
                f"{fmt(s['extra_lat_worst_guest_median']):>14} (p90 {fmt(s['extra_lat_worst_guest_p90'])})"
            )
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


configs = configs_type(max_vms=8)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=configs, default="2x4,3x2", help="VMSxDISKS,... (libvirt; default 2x4,3x2)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epoch", type=int, default=10, help="fresh guests every N rounds (default 10)")
    ap.add_argument("--qmp", type=configs, default="2x4", help="qmp backend configs (bare QEMU), '' for none (default 2x4)")
    ap.add_argument(
        "--daemon",
        default="",
        help="run the libvirt configs on a private libvirtd with these qemu.conf settings, e.g. "
        "'namespaces=[],remember_owner=0' (a lever; 'control' for the stock qemu.conf)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/group.json"))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly: every guest is removed in its finally block
    host = {
        "time_utc": datetime.now(UTC).isoformat(),
        "kernel": platform.release(),
        "libvirt": libvirt.getVersion(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    with contextlib.ExitStack() as stack:
        uri, boot = URI, None
        if args.daemon:
            extra = dict(kv.split("=", 1) for kv in args.daemon.split(",") if kv != "control")
            boot = stack.enter_context(boot_copies())
            uri = stack.enter_context(private_libvirtd(extra))
            host["daemon"] = args.daemon
        run_all(args, uri, boot, host)
    return 0


def run_all(args: argparse.Namespace, uri: str, boot: tuple[Path, Path] | None, host: dict[str, object]) -> None:
    conn = libvirt.open(uri)
    raw: dict[str, list[dict[str, object]]] = {}
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for backend, cfgs in (("libvirt", args.configs), ("qmp", args.qmp)):
        for vms, disks in cfgs:
            cfg = f"{vms}x{disks}"
            label = f"{backend} {cfg}"
            print(f"{label}: {args.trials} rounds ({', '.join(METHODS)})", file=sys.stderr, flush=True)

            def opener(
                vms: int = vms, disks: int = disks, backend: str = backend
            ) -> contextlib.AbstractContextManager[list[Guest]]:
                return libvirt_guests(conn, vms, disks, uri, boot) if backend == "libvirt" else qmp_guests(vms, disks)

            samples = run_config(opener, args.trials, args.epoch, label)
            raw[label] = [asdict(s) for s in samples]
            results[label] = summarize(samples)
            print(table({label: results[label]}), file=sys.stderr, flush=True)
    conn.close()
    host["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(table(results))
    print(f"load average: start {host['loadavg_start']}, end {host['loadavg_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"host": host, "results": results, "samples": raw}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
