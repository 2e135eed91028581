"""Continuous mode's cost to the guest, side by side in one run on one lab VM.

Run as ``.venv/bin/python bench/continuous.py [options] [--out FILE]`` (root,
libvirtd running, the lab guest built); ``--help`` lists the options.

Phases, one after another on the same VM: unprotected; snapshot mode (a
``virt-cgrep sync`` cycle to a local target every ``--interval``, as the agent
runs them, after a seed); continuous with a write-back export; continuous with
a write-through export. Per phase: records/s and write latency over a steady
window of ``--seconds`` in which a point is taken every ``--interval`` (none
when unprotected); for the continuous phases then ``--cuts`` replica-side
cuts, each compared with the quiet second before it (extra max latency).
Snapshot mode and a continuous session never run on the domain at the same
time: each phase ends (its last cycle finished, its session closed) before
the next starts.

The workload reports, every 100 ms, the records acknowledged and their mean
and max latency: p50 is the median of the windows' means, p99 the 99th
percentile of the windows' maxima (an upper bound), max the largest.
Loopback, TCG: report the load average with the figures.

``--configs VMSxDISKS,...`` (e.g. ``1x2,1x4,1x8,2x4``) measures instead the
guests' extra max write latency during a replica-side cut per configuration,
side by side in one run: per configuration, VMS lab VMs of DISKS disks each
form one continuous set (one daemon, ONE transaction over every disk), with a
write-back export; ``--cuts`` cuts, each compared with the quiet second before
it, for every guest. Reported: the median over cuts of the worst guest's extra
max latency, the median over every guest and cut, the largest value, the
replica's transaction (ms) and the seeding time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import acks_between, configs_type, fmt, lab_domain, log_offset, median, percentile, ratio, wait_progress
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.continuous.session import Options, Session
from libvirt_cgrep.replica.link import parse_target


def steady(log: Path, seconds: float) -> dict[str, float | None]:
    o0 = log_offset(log)
    time.sleep(seconds)
    acks = acks_between(log, o0, log_offset(log))
    if len(acks) < 2:
        return {"records_s": None, "p50_ms": None, "p99_ms": None, "max_ms": None}
    span = (acks[-1].t_ms - acks[0].t_ms) / 1000.0
    return {
        "records_s": (acks[-1].seq - acks[0].seq) / span if span > 0 else None,
        "p50_ms": median([a.lat_avg_us / 1000.0 for a in acks if a.n]),
        "p99_ms": percentile([a.lat_max_us / 1000.0 for a in acks if a.n], 99),
        "max_ms": max(a.lat_max_us for a in acks) / 1000.0,
    }


def sync_json(name: str, target: str) -> dict[str, Any]:
    """One snapshot-mode cycle, as the agent runs it: ``virt-cgrep sync NAME --target TARGET --json``."""
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", lv.default_uri(), "sync", name, "--target", target, "--json"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"sync to {target} failed ({out.returncode}): {out.stderr.strip()}")
    res: dict[str, Any] = json.loads(out.stdout)
    return res


def steady_points(
    log: Path, seconds: float, interval: float, take: Callable[[], object], idle: Callable[[], object] = lambda: None
) -> dict[str, Any]:
    """:func:`steady` while another thread calls ``take`` every ``interval`` s (start to start; back to back when one overruns).

    The first point is taken at the window's start. A call still running when the window ends is waited for
    (it is not in the window's figures), so nothing of this phase runs on the domain once this returns.
    """
    stop = threading.Event()
    took: list[float] = []
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                take()
                took.append(time.monotonic() - t0)
                while not stop.wait(min(0.5, max(0.0, t0 + interval - time.monotonic()))):  # start to start
                    if time.monotonic() >= t0 + interval:
                        break  # at once after an overrun
                    idle()  # a continuous session's keepalive (the replica ends an idle session)
            except BaseException as e:
                errors.append(e)
                return

    th = threading.Thread(target=loop, name="points", daemon=True)
    th.start()
    try:
        res: dict[str, Any] = dict(steady(log, seconds))
    finally:
        stop.set()
        th.join()
    if errors:
        raise RuntimeError(f"a point failed during the steady window: {errors[0]}") from errors[0]
    res.update({"interval_s": interval, "points": len(took), "point_s_median": median(took), "point_s_all": took})
    return res


def cut_trials(logs: Sequence[Path], session: Session, cuts: int) -> dict[str, Any]:
    """``cuts`` points; per cut and guest, the max latency around the cut minus that of the quiet second before."""
    extra: list[float] = []  # per cut: the worst guest's
    per_guest: list[list[float | None]] = []
    cut_ms = []
    for _ in range(cuts):
        q0 = [log_offset(log) for log in logs]
        time.sleep(1.0)
        q1 = [log_offset(log) for log in logs]
        ev = session.point()
        time.sleep(0.3)
        q2 = [log_offset(log) for log in logs]
        row: list[float | None] = []
        for log, a, b, c in zip(logs, q0, q1, q2, strict=True):
            quiet, during = acks_between(log, a, b), acks_between(log, b, c)
            row.append(
                max(x.lat_max_us for x in during) / 1000.0 - max(x.lat_max_us for x in quiet) / 1000.0
                if quiet and during
                else None
            )
        per_guest.append(row)
        if any(x is not None for x in row):
            extra.append(max(x for x in row if x is not None))
        cut_ms.append(float(ev["cut_ms"]))
    every = [x for row in per_guest for x in row if x is not None]
    return {
        "extra_max_ms_median": median(extra),
        "extra_max_ms_guest_median": median(every),
        "extra_max_ms_max": max(extra) if extra else None,
        "extra_max_ms_all": extra,
        "extra_max_ms_per_guest": per_guest,
        "replica_cut_ms_median": median(cut_ms),
        "replica_cut_ms_all": cut_ms,
    }


configs = configs_type(max_vms=4)


def _keep_sync_s(out: list[float], ev: dict[str, Any]) -> None:
    if ev.get("event") == "in-sync":
        out.append(float(ev["sync_s"]))


def run_configs(conn: Any, cfgs: Sequence[tuple[int, int]], cuts: int) -> dict[str, Any]:
    """Per configuration: its VMs in one continuous set (write-back), ``cuts`` replica-side cuts."""
    results: dict[str, Any] = {}
    for vms, disks in cfgs:
        label = f"{vms}x{disks}"
        print(f"{label}: {vms} VM(s) x {disks} disks, {cuts} cuts", file=sys.stderr, flush=True)
        load0 = os.getloadavg()[0]
        with contextlib.ExitStack() as stack:
            doms = [stack.enter_context(lab_domain(conn, disks, tag=f"bc{label}", size=32 << 20)) for _ in range(vms)]
            for vm in doms:
                wait_progress(vm.directory / "console.log", records=10)
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix="bcont-"))
            target = parse_target(str(Path(d) / "replica"))
            names = [vm.name for vm in doms]
            sync: list[float] = []
            s = Session(
                conn,
                lv.default_uri(),
                names,
                target,
                set_name=f"bench{label}" if vms > 1 else None,
                opts=Options(),
                emit=functools.partial(_keep_sync_s, sync),
            )
            try:
                s.start()
                res = cut_trials([vm.directory / "console.log" for vm in doms], s, cuts)
            finally:
                s.close()
        res.update({"vms": vms, "disks": disks, "sync_s": sync[0] if sync else None, "load": [load0, os.getloadavg()[0]]})
        results[label] = res
    return results


def print_configs(results: dict[str, Any]) -> None:
    head = f"{'cut extra max ms':>17} {'per guest':>9} {'worst':>7} {'replica cut ms':>15} {'seed s':>7} {'load':>11}"
    print(f"{'config':8} {'disks':>5} {head}")
    for label, r in results.items():
        print(
            f"{label:8} {r['vms'] * r['disks']:>5} {fmt(r['extra_max_ms_median'], 1):>17} "
            f"{fmt(r['extra_max_ms_guest_median'], 1):>9} {fmt(r['extra_max_ms_max'], 1):>7} "
            f"{fmt(r['replica_cut_ms_median'], 1):>15} {fmt(r['sync_s'], 1):>7} {r['load'][0]:>5.2f}-{r['load'][1]:<5.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disks", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0, help="steady window per phase")
    ap.add_argument(
        "--interval",
        type=float,
        default=5.0,
        help="seconds between points in the steady window, for snapshot mode and continuous mode alike",
    )
    ap.add_argument("--cuts", type=int, default=8)
    ap.add_argument(
        "--configs",
        type=configs,
        default="",
        help="VMSxDISKS,... (e.g. 1x2,1x4,1x8,2x4): only the cut's extra max latency, per configuration side by side",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/continuous.json"))
    args = ap.parse_args(argv)
    lv.start_event_loop()
    conn = lv.connect()
    if args.configs:
        report_c: dict[str, Any] = {"cuts": args.cuts, "load_before": os.getloadavg()}
        report_c["configs"] = run_configs(conn, args.configs, args.cuts)
        report_c["load_after"] = os.getloadavg()
        print(f"continuous mode, replica-side cuts (write-back export), loopback, TCG; {args.cuts} cuts per config")
        print_configs(report_c["configs"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report_c, indent=1))
        return 0
    report: dict[str, Any] = {"disks": args.disks, "interval_s": args.interval, "load_before": os.getloadavg()}
    with lab_domain(conn, args.disks, tag="bcont", size=32 << 20) as vm:
        log = vm.directory / "console.log"
        phases: dict[str, Any] = {"unprotected": steady(log, args.seconds)}
        with tempfile.TemporaryDirectory(prefix="bcont-") as d:
            target = str(Path(d) / "replica")
            seed = sync_json(vm.name, target)  # the agent's first cycle: a full copy, before the window
            wait_progress(log, records=10)
            cycles: list[dict[str, Any]] = []
            res_s = steady_points(log, args.seconds, args.interval, lambda: cycles.append(sync_json(vm.name, target)))
            res_s.update(
                {
                    "seed_s": seed.get("total_s"),
                    "cycle_total_s_all": [c.get("total_s") for c in cycles],
                    "changed_bytes_all": [c.get("changed_bytes") for c in cycles],
                }
            )
            phases["snapshot mode"] = res_s
        for label, wt in (("continuous write-back", False), ("continuous write-through", True)):
            with tempfile.TemporaryDirectory(prefix="bcont-") as d:
                target_c = parse_target(str(Path(d) / "replica"))
                opts = Options(interval=args.interval, writethrough=wt)
                s = Session(conn, lv.default_uri(), [vm.name], target_c, set_name=None, opts=opts, emit=lambda e: None)
                try:
                    s.start()
                    wait_progress(log, records=10)
                    res: dict[str, Any] = steady_points(log, args.seconds, args.interval, s.point, s.keepalive)
                    res.update(cut_trials([log], s, args.cuts))
                finally:
                    s.close()
                phases[label] = res
        report["phases"] = phases
    report["load_after"] = os.getloadavg()
    base = report["phases"]["unprotected"]
    for r in report["phases"].values():
        r["records_s_x"] = ratio(r["records_s"], base["records_s"])
        r["p50_ms_x"] = ratio(r["p50_ms"], base["p50_ms"])
        r["p99_ms_x"] = ratio(r["p99_ms"], base["p99_ms"])
        r["max_ms_x"] = ratio(r["max_ms"], base["max_ms"])
    load = f"load {report['load_before'][0]:.2f} -> {report['load_after'][0]:.2f}"
    print(f"1 VM x {args.disks} disks, loopback, TCG; a point every {args.interval:g} s in a {args.seconds:g} s window; {load}")
    head = f"{'rec/s':>8} {'x':>5} {'p50 ms':>7} {'x':>5} {'p99 ms':>7} {'x':>5} {'max ms':>7} {'x':>5}"
    print(f"{'phase':25} {head} {'points':>6} {'point s':>7} {'cut extra max ms':>17} {'replica cut ms':>15}")
    for name, r in report["phases"].items():
        print(
            f"{name:25} {fmt(r['records_s']):>8} {fmt(r['records_s_x'], 2):>5} {fmt(r['p50_ms'], 2):>7} "
            f"{fmt(r['p50_ms_x'], 2):>5} {fmt(r['p99_ms'], 2):>7} {fmt(r['p99_ms_x'], 2):>5} {fmt(r['max_ms'], 1):>7} "
            f"{fmt(r['max_ms_x'], 2):>5} {r.get('points', '-')!s:>6} {fmt(r.get('point_s_median'), 2):>7} "
            f"{fmt(r.get('extra_max_ms_median'), 1):>17} {fmt(r.get('replica_cut_ms_median'), 1):>15}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
