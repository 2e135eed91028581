"""Continuous mode's cost to the guest, side by side in one run on one lab VM.

Run as ``.venv/bin/python bench/continuous.py [options] [--out FILE]`` (root,
libvirtd running, the lab guest built); ``--help`` lists the options.

Phases, each on the same VM: unprotected; continuous with a write-back
export; continuous with a write-through export. Per phase: records/s and
write latency over a steady window with no cut, then ``--cuts`` replica-side
cuts, each compared with the quiet second before it (extra max latency).

The workload reports, every 100 ms, the records acknowledged and their mean
and max latency: p50 is the median of the windows' means, p99 the 99th
percentile of the windows' maxima (an upper bound), max the largest.
Loopback, TCG: report the load average with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import acks_between, fmt, lab_domain, log_offset, median, percentile, ratio
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.continuous.mirror import start_event_loop
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


def cut_trials(log: Path, session: Session, cuts: int) -> dict[str, Any]:
    extra, cut_ms = [], []
    for _ in range(cuts):
        q0 = log_offset(log)
        time.sleep(1.0)
        q1 = log_offset(log)
        ev = session.point()
        time.sleep(0.3)
        q2 = log_offset(log)
        quiet = acks_between(log, q0, q1)
        during = acks_between(log, q1, q2)
        if quiet and during:
            extra.append(max(a.lat_max_us for a in during) / 1000.0 - max(a.lat_max_us for a in quiet) / 1000.0)
        cut_ms.append(float(ev["cut_ms"]))
    return {"extra_max_ms_median": median(extra), "extra_max_ms_all": extra, "replica_cut_ms_median": median(cut_ms)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disks", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0, help="steady window per phase")
    ap.add_argument("--cuts", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/results/continuous.json"))
    args = ap.parse_args(argv)
    start_event_loop()
    conn = lv.connect()
    report: dict[str, Any] = {"disks": args.disks, "load_before": os.getloadavg()}
    with lab_domain(conn, args.disks, tag="bcont", size=32 << 20) as vm:
        log = vm.directory / "console.log"
        phases: dict[str, Any] = {"unprotected": steady(log, args.seconds)}
        for label, wt in (("continuous write-back", False), ("continuous write-through", True)):
            with tempfile.TemporaryDirectory(prefix="bcont-") as d:
                target = parse_target(str(Path(d) / "replica"))
                opts = Options(writethrough=wt)
                s = Session(conn, lv.default_uri(), [vm.name], target, set_name=None, opts=opts, emit=lambda e: None)
                try:
                    s.start()
                    res: dict[str, Any] = dict(steady(log, args.seconds))
                    res.update(cut_trials(log, s, args.cuts))
                finally:
                    s.close()
                phases[label] = res
        report["phases"] = phases
    report["load_after"] = os.getloadavg()
    base = report["phases"]["unprotected"]
    load = f"load {report['load_before'][0]:.2f} -> {report['load_after'][0]:.2f}"
    print(f"continuous mode, 1 VM x {args.disks} disks, loopback, TCG; {load}")
    head = f"{'rec/s':>8} {'x':>6} {'p50 ms':>7} {'p99 ms':>7} {'x':>6} {'max ms':>7}"
    print(f"{'phase':28} {head} {'cut extra max ms':>17} {'replica cut ms':>15}")
    for name, r in report["phases"].items():
        print(
            f"{name:28} {fmt(r['records_s']):>8} {fmt(ratio(r['records_s'], base['records_s']), 2):>6} {fmt(r['p50_ms'], 2):>7} "
            f"{fmt(r['p99_ms'], 2):>7} {fmt(ratio(r['p99_ms'], base['p99_ms']), 2):>6} {fmt(r['max_ms'], 1):>7} "
            f"{fmt(r.get('extra_max_ms_median'), 1):>17} {fmt(r.get('replica_cut_ms_median'), 1):>15}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
