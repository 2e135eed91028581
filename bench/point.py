"""Benchmark one consistency point against plain libvirt, side by side.

Run as ``.venv/bin/python bench/point.py [--disks 2,4,8] [--trials 20] [--out FILE] [--levers]``
(root, libvirtd running). See bench/README.md for what each column means.

For each disk count a lab domain (``bench-...``) runs the dependent-write
workload; every trial runs each method once, round-robin with a rotating
start so drift hits all methods equally. Around each method the guest's
per-interval ``lat_max_us`` is read from the console log: the quiet window
(~1 s before) and the cut window (from just before the call to ~300 ms after).
The cut window is split where the snapshot call starts and ends: ``call`` is
the guest's max latency while libvirt's snapshot call runs, ``after`` the rest
(the guest's first writes into the new overlays). ACK lines come every 20 ms
by default (``--report-ms``), so the split is sharp to about that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    URI,
    Window,
    acks_between,
    boot_copies,
    fmt,
    lab_domain,
    log_offset,
    max_lat_ms,
    median,
    percentile,
    private_libvirtd,
    ratio,
    wait_progress,
)
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.core.model import GuestCut, Transaction
from libvirt_cgrep.engine.libvirt_backend import SNAPSHOT_FLAGS, LibvirtBackend, disks_of, qemu_owner
from libvirt_cgrep.engine.point import take_point
from libvirt_cgrep.lab import domain as labdom

ATOMIC_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)

#: --fence suspend deadline of our point in the bench (the CLI's default is 2000 ms)
BENCH_DEADLINE_MS = 10_000.0

BASE_METHODS = ("virsh", "libvirt-atomic", "bare-hold", "point-none", "point-suspend")
LEVER_METHODS = ("bare-hold-preown", "point-suspend-plain", "point-suspend-preown")
#: Methods measured under each private-daemon configuration (lever b/c).
DAEMON_METHODS = ("bare-hold", "bare-hold-preown", "point-suspend-plain", "point-suspend-preown")


@dataclass(frozen=True)
class DaemonConfig:
    """A private-daemon setup: qemu.conf additions, and which state directories are on tmpfs."""

    qemu_conf: dict[str, str]
    tmpfs: tuple[str, ...] = ()


#: Measured with a private libvirtd each; "control" is the stock qemu.conf on the same setup.
DAEMON_CONFIGS: dict[str, DaemonConfig] = {
    "control": DaemonConfig({}),
    "namespaces-off": DaemonConfig({"namespaces": "[]"}),
    "remember-owner-off": DaemonConfig({"remember_owner": "0"}),
    "both-off": DaemonConfig({"namespaces": "[]", "remember_owner": "0"}),
    "run-tmpfs": DaemonConfig({}, ("/run/libvirt",)),
}


#: A daemon to measure on: connection, URI, and the boot files its domains use (None: the shared lab guest).
Target = tuple[libvirt.virConnect, str, tuple[Path, Path] | None]


@dataclass
class Measured:
    wall_ms: float
    hold_ms: float | None = None
    cut_ms: float | None = None


@dataclass
class Sample:
    method: str
    trial: int
    wall_ms: float
    hold_ms: float | None
    cut_ms: float | None
    quiet_lat_ms: float | None
    cut_lat_ms: float | None
    #: the method failed (its message); the round goes on with a fresh domain
    error: str | None = None
    #: after the method, the live and persistent definitions named different tops (target: live, persistent)
    diverged: dict[str, tuple[str, str]] | None = None
    #: which domain (epoch) of the run the sample was taken on
    epoch: int = -1
    #: guest max write latency while the snapshot call ran, and from its end to the end of the cut window
    call_lat_ms: float | None = None
    after_lat_ms: float | None = None

    @property
    def extra_lat_ms(self) -> float | None:
        if self.quiet_lat_ms is None or self.cut_lat_ms is None:
            return None
        return self.cut_lat_ms - self.quiet_lat_ms


@dataclass
class Ctx:
    conn: libvirt.virConnect
    uri: str
    vm: labdom.LabDomain
    dom: libvirt.virDomain
    owner: tuple[int, int] | None
    seq: int = 0
    #: console-log offsets where the snapshot call started and ended ("call0", "call1"), set by the methods
    marks: dict[str, int] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.vm.directory / "console.log"

    def mark(self, name: str) -> None:
        self.marks[name] = log_offset(self.log)

    def tops(self) -> dict[str, str]:
        return {d.target: d.image for d in disks_of(lv.live_xml(self.dom))}

    def divergence(self) -> dict[str, tuple[str, str]] | None:
        """Disks whose live top differs from the persistent definition's (None when all agree)."""
        live = {d.target: d.image for d in disks_of(lv.live_xml(self.dom))}
        conf = {d.target: d.image for d in disks_of(lv.persistent_xml(self.dom))}
        bad = {t: (Path(live[t]).name, Path(conf.get(t, "?")).name) for t in live if live[t] != conf.get(t)}
        return bad or None

    def depth(self) -> int:
        return max((len(d.chain) for d in disks_of(lv.live_xml(self.dom))), default=0)

    def overlays(self, tag: str) -> dict[str, str]:
        self.seq += 1
        return {t: str(self.vm.directory / f"{t}.bench-{tag}{self.seq}.qcow2") for t in self.tops()}


def bare_xml(overlays: Mapping[str, str], *, relabel: bool = True) -> str:
    seclabel = "" if relabel else "<seclabel model='dac' relabel='no'/>"
    disks = "".join(
        f"<disk name='{t}' snapshot='external' type='file'><driver type='qcow2'/>"
        f"<source file={quoteattr(p)}>{seclabel}</source></disk>"
        for t, p in overlays.items()
    )
    return f"<domainsnapshot><disks>{disks}</disks></domainsnapshot>"


# --------------------------------------------------------------------------- methods


def m_virsh(ctx: Ctx) -> Measured:
    ctx.seq += 1
    argv = ["virsh", "-q", "-c", ctx.uri, "snapshot-create-as", ctx.vm.name, f"bv{ctx.seq}"]
    argv += ["--disk-only", "--atomic", "--no-metadata"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return Measured(wall_ms=(time.perf_counter() - t0) * 1000.0)


def m_libvirt_atomic(ctx: Ctx) -> Measured:
    xml = bare_xml(ctx.overlays("a"))
    ctx.mark("call0")
    t0 = time.perf_counter()
    ctx.dom.snapshotCreateXML(xml, ATOMIC_FLAGS)
    ms = (time.perf_counter() - t0) * 1000.0
    ctx.mark("call1")
    return Measured(wall_ms=ms, cut_ms=ms)


def bare_hold(*, preown: bool) -> Callable[[Ctx], Measured]:
    def run(ctx: Ctx) -> Measured:
        t_start = time.perf_counter()
        tops = ctx.tops()
        ovs = ctx.overlays("h")
        for t, ov in ovs.items():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", tops[t], ov], check=True, timeout=30)
            if preown and ctx.owner is not None:
                os.chown(ov, *ctx.owner)
        xml = bare_xml(ovs, relabel=not preown)
        t0 = time.perf_counter()
        ctx.dom.suspend()
        try:
            ctx.mark("call0")
            t1 = time.perf_counter()
            ctx.dom.snapshotCreateXML(xml, SNAPSHOT_FLAGS)
            t2 = time.perf_counter()
            ctx.mark("call1")
        finally:
            ctx.dom.resume()
        t3 = time.perf_counter()
        return Measured(wall_ms=(t3 - t_start) * 1000.0, hold_ms=(t3 - t0) * 1000.0, cut_ms=(t2 - t1) * 1000.0)

    return run


class MarkedBackend(LibvirtBackend):
    """Our libvirt backend, marking the console log around its snapshot call."""

    def __init__(self, ctx: Ctx, **kw: bool) -> None:
        super().__init__(ctx.conn, ctx.vm.name, ctx.uri, **kw)
        self.ctx = ctx

    def cut(self, txn: Transaction) -> GuestCut:
        self.ctx.mark("call0")
        try:
            return super().cut(txn)
        finally:
            self.ctx.mark("call1")


def point(fence: str, preown: bool | None = None) -> Callable[[Ctx], Measured]:
    def run(ctx: Ctx) -> Measured:
        t0 = time.perf_counter()
        kw = {} if preown is None else {"preown": preown}  # None: the backend's own default
        backend = MarkedBackend(ctx, **kw)
        # The deadline is a safety cap, not what is measured: on a loaded host a 2 s hold would lose the sample.
        res = take_point([backend], fence=fence, deadline_ms=BENCH_DEADLINE_MS)
        wall = (time.perf_counter() - t0) * 1000.0
        return Measured(wall_ms=wall, hold_ms=res.fence_ms, cut_ms=res.cut_ms)

    return run


METHODS: dict[str, Callable[[Ctx], Measured]] = {
    "virsh": m_virsh,
    "libvirt-atomic": m_libvirt_atomic,
    "bare-hold": bare_hold(preown=False),
    "point-none": point("none"),
    "point-suspend": point("suspend"),
    "bare-hold-preown": bare_hold(preown=True),
    "point-suspend-plain": point("suspend", preown=False),
    "point-suspend-preown": point("suspend", preown=True),
}


# --------------------------------------------------------------------------- trials


@dataclass
class Timing:
    settle_s: float = 0.2
    quiet_s: float = 1.0
    tail_s: float = 0.3
    #: the guest's ACK interval: each line carries the max latency since the last one
    report_ms: int = 20
    #: QEMU I/O threads of the lab domains' disks (0: QEMU's main loop)
    iothreads: int = 0


def one_trial(ctx: Ctx, method: str, trial: int, timing: Timing) -> Sample:
    """One timed call of ``method`` with its latency windows; failures are recorded, not raised."""
    if lv.state(ctx.dom) != "running":
        raise RuntimeError(f"{ctx.vm.name} is {lv.state(ctx.dom)} before {method} trial {trial}")
    time.sleep(timing.settle_s)
    ctx.marks.clear()
    w = Window(ctx.log)
    w.q0 = log_offset(ctx.log)
    time.sleep(timing.quiet_s)
    w.q1 = log_offset(ctx.log)
    error = None
    try:
        m = METHODS[method](ctx)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        m = Measured(wall_ms=float("nan"))
        print(f"  {method} trial {trial} FAILED: {error}", file=sys.stderr, flush=True)
    time.sleep(timing.tail_s)
    w.q2 = log_offset(ctx.log)
    if lv.state(ctx.dom) != "running":
        raise RuntimeError(f"{ctx.vm.name} is {lv.state(ctx.dom)} after {method} trial {trial}")
    diverged = ctx.divergence()
    if diverged:
        print(f"  {method} trial {trial}: live and persistent tops differ: {diverged}", file=sys.stderr, flush=True)
    if error is not None:
        return Sample(method, trial, m.wall_ms, None, None, w.quiet_ms(), None, error, diverged)
    s = Sample(method, trial, m.wall_ms, m.hold_ms, m.cut_ms, w.quiet_ms(), w.cut_ms(), None, diverged)
    if "call0" in ctx.marks and "call1" in ctx.marks:
        s.call_lat_ms = max_lat_ms(acks_between(ctx.log, ctx.marks["call0"], ctx.marks["call1"]))
        s.after_lat_ms = max_lat_ms(acks_between(ctx.log, ctx.marks["call1"], w.q2))
    return s


@dataclass
class DiskRun:
    disks: int
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    depth_max: int = 0


def run_rounds(ctx: Ctx, methods: Sequence[str], rounds: range, timing: Timing, out: DiskRun, *, label: str, epoch: int) -> None:
    """Rounds ``rounds`` on ``ctx``'s domain; stops early when a method failed or left the definitions diverged."""
    for t in rounds:
        k = t % len(methods)
        broken = False
        for m in [*methods[k:], *methods[:k]]:
            s = one_trial(ctx, m, t, timing)
            s.epoch = epoch
            out.samples[m].append(s)
            if s.error or s.diverged:
                broken = True
                break
        depth = ctx.depth()
        out.depth_max = max(out.depth_max, depth)
        print(f"  {label}: round {t + 1} done, chain depth {depth}", file=sys.stderr, flush=True)
        if broken:
            return  # the rest of this epoch is skipped; the next one starts on a fresh domain
        wait_progress(ctx.log, records=5)


def run_epochs(
    targets: Mapping[str, Target],
    disks: int,
    methods: Sequence[str],
    *,
    trials: int,
    timing: Timing,
    rounds_per_domain: int,
) -> dict[str, DiskRun]:
    """``trials`` rounds of every method on every target (daemon).

    A round runs each method once (rotating start). Every ``rounds_per_domain``
    rounds (an epoch) a fresh domain replaces the old one, which keeps chains
    short; with several targets, the epochs of the targets alternate (rotating
    start), so that load changes on the machine hit every target alike. Only
    one lab domain exists at a time.
    """
    out = {name: DiskRun(disks, {m: [] for m in methods}) for name in targets}
    names = list(targets)
    for e in range(math.ceil(trials / rounds_per_domain)):
        rounds = range(e * rounds_per_domain, min(trials, (e + 1) * rounds_per_domain))
        k = e % len(names)
        for name in [*names[k:], *names[:k]]:
            conn, uri, boot = targets[name]
            lab = lab_domain(conn, disks, tag=f"pt{disks}-", boot=boot, report_ms=timing.report_ms, iothreads=timing.iothreads)
            with lab as vm:
                ctx = Ctx(conn, uri, vm, lv.lookup(conn, vm.name), qemu_owner())
                run_rounds(ctx, methods, rounds, timing, out[name], label=f"{name}, {disks} disks", epoch=e)
    return out


# --------------------------------------------------------------------------- summaries


def _vals(samples: Sequence[Sample], key: str) -> list[float]:
    out: list[float] = []
    for s in samples:
        if s.error is not None:
            continue
        v = s.extra_lat_ms if key == "extra_lat_ms" else getattr(s, key)
        if v is not None:
            out.append(float(v))
    return out


KEYS = ("wall_ms", "hold_ms", "cut_ms", "extra_lat_ms", "cut_lat_ms", "quiet_lat_ms", "call_lat_ms", "after_lat_ms")


def summarize(samples: Sequence[Sample]) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "n": float(len(samples)),
        "errors": float(sum(1 for s in samples if s.error)),
        "diverged": float(sum(1 for s in samples if s.diverged)),
    }
    for k in KEYS:
        xs = _vals(samples, k)
        out[f"{k}_median"] = median(xs)
        out[f"{k}_p90"] = percentile(xs, 90)
    # drift over the run (chain depth grows by one overlay per disk per method per trial)
    q = max(1, len(samples) // 4)
    for k in ("hold_ms", "cut_ms", "wall_ms"):
        first, last = _vals(samples[:q], k), _vals(samples[-q:], k)
        m1, m2 = median(first), median(last)
        out[f"{k}_drift"] = None if m1 is None or m2 is None else m2 - m1
    return out


def ratios(summ: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    def get(m: str, k: str) -> float | None:
        return summ.get(m, {}).get(k)

    out: dict[str, float | None] = {
        "point_none_extra_lat_over_libvirt_atomic": ratio(
            get("point-none", "extra_lat_ms_median"), get("libvirt-atomic", "extra_lat_ms_median")
        ),
        "point_suspend_hold_over_bare_hold": ratio(get("point-suspend", "hold_ms_median"), get("bare-hold", "hold_ms_median")),
    }
    a, b = get("point-suspend", "hold_ms_median"), get("bare-hold", "hold_ms_median")
    out["point_suspend_hold_minus_bare_ms"] = None if a is None or b is None else a - b
    for m in ("bare-hold-preown", "point-suspend-plain", "point-suspend-preown"):
        if m in summ:
            out[f"{m}_hold_over_bare_hold"] = ratio(get(m, "hold_ms_median"), b)
    return out


def paired(samples: Mapping[str, Sequence[Sample]], a: str, b: str, key: str = "hold_ms") -> float | None:
    """Median over rounds of ``a``'s ``key`` / ``b``'s in the same round (same domain, seconds apart)."""
    by_round = {(s.epoch, s.trial): getattr(s, key) for s in samples.get(b, ()) if s.error is None}
    rs = [
        r
        for s in samples.get(a, ())
        if s.error is None and (r := ratio(getattr(s, key), by_round.get((s.epoch, s.trial)))) is not None
    ]
    return median(rs)


def paired_diff(samples: Mapping[str, Sequence[Sample]], a: str, b: str, key: str) -> float | None:
    """Median over rounds of ``a``'s ``key`` minus ``b``'s in the same round (same domain, seconds apart)."""
    by_round = {(s.epoch, s.trial): getattr(s, key) for s in samples.get(b, ()) if s.error is None}
    ds = [
        va - vb
        for s in samples.get(a, ())
        if s.error is None and (va := getattr(s, key)) is not None and (vb := by_round.get((s.epoch, s.trial))) is not None
    ]
    return median(ds)


def mean_ratio(samples: Mapping[str, Sequence[Sample]], a: str, b: str, key: str) -> float | None:
    """Mean of ``a``'s ``key`` over the mean of ``b``'s (the tail counts, unlike the medians')."""
    va, vb = _vals(samples.get(a, ()), key), _vals(samples.get(b, ()), key)
    return ratio(sum(va) / len(va), sum(vb) / len(vb)) if va and vb else None


def paired_ratios(samples: Mapping[str, Sequence[Sample]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    if "point-none" in samples and "libvirt-atomic" in samples:
        out["paired_point_none_minus_libvirt_atomic_extra_lat_ms"] = paired_diff(
            samples, "point-none", "libvirt-atomic", "extra_lat_ms"
        )
        out["point_none_extra_lat_mean_over_libvirt_atomic"] = mean_ratio(samples, "point-none", "libvirt-atomic", "extra_lat_ms")
    for m in ("point-suspend", "bare-hold-preown", "point-suspend-plain", "point-suspend-preown"):
        if m in samples and "bare-hold" in samples:
            out[f"paired_{m}_hold_over_bare_hold"] = paired(samples, m, "bare-hold")
    return out


def epoch_ratio(a: Sequence[Sample], b: Sequence[Sample], key: str = "hold_ms") -> float | None:
    """Median over epochs of (median ``key`` of ``a`` in the epoch) / (that of ``b``): for samples of two daemons."""
    rs: list[float] = []
    for e in sorted({s.epoch for s in a}):
        r = ratio(median(_vals([s for s in a if s.epoch == e], key)), median(_vals([s for s in b if s.epoch == e], key)))
        if r is not None:
            rs.append(r)
    return median(rs)


COLS = (
    ("wall", "wall_ms"),
    ("hold", "hold_ms"),
    ("cut", "cut_ms"),
    ("extra lat", "extra_lat_ms"),
)


def table(results: Mapping[str, Mapping[str, Mapping[str, float | None]]], title: str) -> str:
    cols = " | ".join(f"{c} med | {c} p90" for c, _ in COLS)
    head = f"| disks | method | n | {cols} | guest max lat quiet / cut (call, after) | failed |"
    lines = [f"### {title}", "", head, "|" + "---|" * (3 + 2 * len(COLS) + 2)]
    for disks, per in results.items():
        for m, s in per.items():
            cells = [f"{fmt(s[f'{k}_median'])} | {fmt(s[f'{k}_p90'])}" for _, k in COLS]
            lat = f"{fmt(s['quiet_lat_ms_median'])} / {fmt(s['cut_lat_ms_median'])}"
            lat += f" ({fmt(s['call_lat_ms_median'])}, {fmt(s['after_lat_ms_median'])})"
            failed = f"{fmt(s['errors'], 0)} err, {fmt(s['diverged'], 0)} diverged"
            lines.append(f"| {disks} | {m} | {fmt(s['n'], 0)} | " + " | ".join(cells) + f" | {lat} | {failed} |")
    lines += [
        "",
        "All times in ms, median and p90 over the trials. wall: the whole call as the caller sees it; hold: host-measured",
        "suspend..resume; cut: the snapshot call itself; extra lat: guest max write latency in the ACK intervals covering",
        "the call minus the quiet max over ~1 s before; call/after: the part of the cut window while the snapshot call",
        "ran and after it returned. Under TCG the guest clock stops while paused, so the latency the",
        "guest sees under a suspend is NOT the hold (it misses the paused time); use the host-measured hold for suspends.",
    ]
    return "\n".join(lines)


def describe(dc: DaemonConfig) -> str:
    return f"qemu.conf {dc.qemu_conf or '(stock)'}, tmpfs {list(dc.tmpfs) or 'none'}"


def vs_control_lines(vc: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> str:
    lines = ["### hold vs the private control daemon (median over epochs of per-epoch median ratios)", ""]
    lines += ["| disks | config | method | / control same method | / control bare-hold |", "|---|---|---|---|---|"]
    for d, per in vc.items():
        for cfg, cell in per.items():
            for m in DAEMON_METHODS:
                a, b = cell.get(f"{m}_over_control_same"), cell.get(f"{m}_over_control_bare_hold")
                lines.append(f"| {d} | {cfg} | {m} | {fmt(a, 2)} | {fmt(b, 2)} |")
    return "\n".join(lines)


def ratio_lines(all_ratios: Mapping[str, Mapping[str, float | None]]) -> str:
    lines = ["", "| disks | " + " | ".join(next(iter(all_ratios.values()), {}).keys()) + " |"]
    lines.append("|" + "---|" * (1 + len(next(iter(all_ratios.values()), {}))))
    for disks, r in all_ratios.items():
        lines.append(f"| {disks} | " + " | ".join(fmt(v, 2) for v in r.values()) + " |")
    return "\n".join(lines)


@dataclass
class SetResult:
    """One target (daemon): per disk count, per method."""

    summary: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    ratios: dict[str, dict[str, float | None]] = field(default_factory=dict)
    chain_depth_max: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[dict[str, object]]] = field(default_factory=dict)


def add_run(res: SetResult, dr: DiskRun) -> None:
    key = str(dr.disks)
    res.summary[key] = {m: summarize(ss) for m, ss in dr.samples.items()}
    res.ratios[key] = {**ratios(res.summary[key]), **paired_ratios(dr.samples)}
    res.samples[key] = [{**asdict(s), "extra_lat_ms": s.extra_lat_ms} for ss in dr.samples.values() for s in ss]
    res.chain_depth_max[key] = dr.depth_max


def run_set(
    targets: Mapping[str, Target],
    disks_list: Sequence[int],
    methods: Sequence[str],
    *,
    trials: int,
    timing: Timing,
    rpd: int,
) -> tuple[dict[str, SetResult], dict[str, dict[int, DiskRun]]]:
    results = {name: SetResult() for name in targets}
    runs: dict[str, dict[int, DiskRun]] = {name: {} for name in targets}
    for d in disks_list:
        print(f"{d} disks: {', '.join(targets)}: methods {', '.join(methods)}", file=sys.stderr, flush=True)
        per = run_epochs(targets, d, methods, trials=trials, timing=timing, rounds_per_domain=rpd)
        for name, dr in per.items():
            add_run(results[name], dr)
            runs[name][d] = dr
    return results, runs


def vs_control(runs: Mapping[str, Mapping[int, DiskRun]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per disk count, per config, per method: epoch-paired hold ratio to control's same method and to control's bare-hold."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    ctrl = runs.get("control", {})
    for cfg, per in runs.items():
        for d, dr in per.items():
            c = ctrl.get(d)
            if c is None:
                continue
            cell = out.setdefault(str(d), {}).setdefault(cfg, {})
            for m, ss in dr.samples.items():
                cell[f"{m}_over_control_same"] = epoch_ratio(ss, c.samples.get(m, []))
                cell[f"{m}_over_control_bare_hold"] = epoch_ratio(ss, c.samples.get("bare-hold", []))
    return out


def _versions() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout.strip().splitlines()[0]
        return "?"

    return {
        "libvirt": out(["virsh", "--version"]),
        "qemu": out(["qemu-system-x86_64", "--version"]),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disks", default="2,4,8", help="comma-separated disk counts (default 2,4,8)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/point.json"))
    ap.add_argument("--uri", default=URI)
    ap.add_argument("--methods", default=",".join(BASE_METHODS), help="methods of the main run")
    ap.add_argument(
        "--levers", action="store_true", help="add the hold levers (preown variants, private-daemon qemu.conf variants)"
    )
    ap.add_argument("--daemon-disks", default=None, help="disk counts for the private-daemon levers (default: --disks)")
    ap.add_argument("--daemon-configs", default=",".join(DAEMON_CONFIGS), help="private-daemon configurations to measure")
    ap.add_argument("--no-main", action="store_true", help="skip the main run (only the private-daemon levers)")
    ap.add_argument(
        "--rounds-per-domain",
        type=int,
        default=2,
        help="rounds on one domain before a fresh one (keeps chains short)",
    )
    ap.add_argument("--quiet-s", type=float, default=1.0)
    ap.add_argument("--tail-s", type=float, default=0.3)
    ap.add_argument("--report-ms", type=int, default=20, help="the guest's ACK interval (default 20 ms)")
    ap.add_argument("--iothreads", type=int, default=0, help="QEMU I/O threads for the lab domains' disks (default 0)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root (lab domains on qemu:///system)")
    disks_list = [int(x) for x in args.disks.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods: {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if args.levers:
        methods += [m for m in LEVER_METHODS if m not in methods]
    timing = Timing(quiet_s=args.quiet_s, tail_s=args.tail_s, report_ms=args.report_ms, iothreads=args.iothreads)
    rpd = args.rounds_per_domain
    host = _versions()
    report: dict[str, object] = {
        "started_utc": datetime.now(UTC).isoformat(),
        "trials": args.trials,
        "rounds_per_domain": args.rounds_per_domain,
        "timing": asdict(timing),
    }
    texts: list[str] = []
    if not args.no_main:
        conn = lv.connect(args.uri)
        try:
            sets, _ = run_set({"main": (conn, args.uri, None)}, disks_list, methods, trials=args.trials, timing=timing, rpd=rpd)
        finally:
            conn.close()
        main_run = sets["main"]
        report["main"] = {"uri": args.uri, "methods": methods, **asdict(main_run)}
        texts += [table(main_run.summary, f"point bench, {args.trials} trials, {args.uri}"), ratio_lines(main_run.ratios)]
    if args.levers and args.daemon_configs:
        ddisks = [int(x) for x in (args.daemon_disks or args.disks).split(",") if x]
        cfgs = [c for c in args.daemon_configs.split(",") if c]
        with contextlib.ExitStack() as stack:
            targets: dict[str, Target] = {}
            for cfg in cfgs:
                dc = DAEMON_CONFIGS[cfg]
                print(f"private libvirtd '{cfg}': {describe(dc)}", file=sys.stderr, flush=True)
                boot = stack.enter_context(boot_copies())
                uri = stack.enter_context(private_libvirtd(dc.qemu_conf, tmpfs=dc.tmpfs))
                c = lv.connect(uri)
                stack.callback(c.close)
                targets[cfg] = (c, uri, boot)
            sets, runs = run_set(targets, ddisks, DAEMON_METHODS, trials=args.trials, timing=timing, rpd=rpd)
        report["daemons"] = {cfg: {**asdict(DAEMON_CONFIGS[cfg]), **asdict(r)} for cfg, r in sets.items()}
        vc = vs_control(runs)
        report["daemons_vs_control"] = vc
        for cfg, r in sets.items():
            texts += [table(r.summary, f"private libvirtd '{cfg}': {describe(DAEMON_CONFIGS[cfg])}"), ratio_lines(r.ratios)]
        texts.append(vs_control_lines(vc))
    report["finished_utc"] = datetime.now(UTC).isoformat()
    host["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report["host"] = host
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("\n\n".join(texts))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
