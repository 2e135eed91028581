"""Continuous mode across a domain restart: the full copy vs the restart from a final point, side by side.

One lab domain whose disks carry ``--fill-mib`` of data each (written
before protection). Phase 1: ``virt-cgrep continuous`` seeds the replica
(the mirror's full copy). Then, ``--rounds`` times: the domain is stopped
cleanly (paused, then destroyed: no write in flight), the session commits
its final point (both sides digest their disks) and exits; the domain is
started again, the guest writes, and a new session restarts from the final
point (a shallow mirror of what the guest wrote since it booted). A last
phase forces a full copy on the same data (the base touched, so the restart
record no longer holds), for a side-by-side ratio in the same run.

Reported per phase: seconds from the session's start to in-sync, bytes the
mirrors copied, and for stops the seconds from the destroy to the final
point (digests included). Ratios are against the full copy of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import URI, fmt, lab_domain, median, ratio, wait_progress
from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.engine.libvirt_backend import disks_of


class Run:
    """``virt-cgrep continuous DOMAIN --json`` in the background, its events as they come."""

    def __init__(self, name: str, target: str) -> None:
        argv = [sys.executable, "-m", "libvirt_cgrep", "-c", URI, "continuous", name, "--target", target]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [*argv, "--interval", "2s", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.events: list[dict[str, Any]] = []

    def wait_for(self, kind: str, timeout: float = 900.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while not any(e["event"] == kind for e in self.events):
            line = self.proc.stdout.readline()
            if not line or time.monotonic() > end:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"no {kind} event (exit {self.proc.poll()}): {self.events[-3:]} {err[-500:]}")
            ev = json.loads(line)
            ev["t"] = time.monotonic()
            self.events.append(ev)
        return next(e for e in self.events if e["event"] == kind)

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def stop_clean(conn: Any, name: str) -> float:
    dom = lv.lookup(conn, name)
    dom.suspend()
    time.sleep(0.3)
    t = time.monotonic()
    dom.destroy()
    return t


#: every run started, so that a failing bench still ends them
_RUNS: list[Run] = []


def session(name: str, target: str) -> tuple[Run, dict[str, Any]]:
    r = Run(name, target)
    _RUNS.append(r)
    ins = r.wait_for("in-sync")
    r.wait_for("point")
    return r, {"sync_s": ins["t"] - r.t0, "copied_bytes": ins["copied_bytes"], "resume": ins["resume"]}


def run_phases(conn: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The full copy, ``args.rounds`` clean stops and restarts, and a forced full copy, on one lab domain."""
    with lab_domain(conn, args.disks, tag="brst", size=args.size_mib << 20) as vm, tempfile.TemporaryDirectory() as d:
        try:
            target = str(Path(d) / "replica")
            dom = lv.lookup(conn, vm.name)
            dom.destroy()
            images = [x.image for x in disks_of(lv.persistent_xml(dom))]
            half = (args.size_mib << 20) // 2
            for i, img in enumerate(images):  # the data lives in the upper half (the workload's records start at 0)
                cmd = f"write -P {0x41 + i} {half} {min(args.fill_mib << 20, half)}"
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, img], check=True, capture_output=True)
            dom.create()
            log = vm.directory / "console.log"
            wait_progress(log, records=20, timeout=120)
            r, full = session(vm.name, target)
            phases: dict[str, Any] = {"full copy": full, "restarts": []}
            for _ in range(args.rounds):
                t_stop = stop_clean(conn, vm.name)
                stopped = r.wait_for("stopped")
                final = next(e for e in r.events if e["event"] == "point" and e.get("final"))
                r.end()
                stop = {
                    "stop_to_final_s": stopped["t"] - t_stop,
                    "digest_s": final["digest_s"],
                    "resumable": stopped["resumable"],
                }
                dom.create()
                wait_progress(log, records=20, timeout=120)
                r, res = session(vm.name, target)
                phases["restarts"].append({**stop, **res})
            # the same data, a full copy forced: the base touched while the domain is off
            stop_clean(conn, vm.name)
            r.wait_for("stopped")
            r.end()
            chain = json.loads(
                subprocess.run(
                    ["qemu-img", "info", "-U", "--backing-chain", "--output=json", disks_of(lv.persistent_xml(dom))[0].image],
                    capture_output=True,
                    check=True,
                ).stdout
            )
            os.utime(chain[-1]["filename"])
            dom.create()
            wait_progress(log, records=20, timeout=120)
            r, again = session(vm.name, target)
            r.end()
            phases["full copy again"] = again
        finally:
            for r in _RUNS:  # before the domain goes, even when a phase failed
                r.end()
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disks", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=1024, help="virtual size of each disk")
    ap.add_argument("--fill-mib", type=int, default=512, help="data written into each disk before protection")
    ap.add_argument("--rounds", type=int, default=3, help="clean stops and restarts")
    ap.add_argument("--out", type=Path, default=Path("bench/results/restart.json"))
    args = ap.parse_args(argv)
    conn = lv.connect()
    report: dict[str, Any] = {"disks": args.disks, "size_mib": args.size_mib, "fill_mib": args.fill_mib}
    report["load_before"] = os.getloadavg()
    phases = run_phases(conn, args)
    report["phases"] = phases
    report["load_after"] = os.getloadavg()
    rs = phases["restarts"]
    rest = {
        "sync_s": median([x["sync_s"] for x in rs]),
        "copied_bytes": median([float(x["copied_bytes"]) for x in rs]),
        "stop_to_final_s": median([x["stop_to_final_s"] for x in rs]),
        "digest_s": median([x["digest_s"] for x in rs]),
        "resumed": sum(x["resume"] is not None for x in rs),
    }
    report["restart_median"] = rest
    base = phases["full copy"]
    load = f"load {report['load_before'][0]:.2f} -> {report['load_after'][0]:.2f}"
    print(f"1 VM x {args.disks} disks of {args.size_mib} MiB, {args.fill_mib} MiB of data each, loopback, TCG; {load}")
    print(f"{'phase':28} {'in sync s':>9} {'x':>6} {'copied MB':>10} {'x':>7} {'stop->final s':>13} {'digests s':>9}")
    rows = [
        ("full copy", base, None),
        (f"restart (median of {len(rs)}, {rest['resumed']} resumed)", rest, rest),
        ("full copy again (forced)", phases["full copy again"], None),
    ]
    for label, x, st in rows:
        print(
            f"{label:28} {fmt(x['sync_s'], 2):>9} {fmt(ratio(x['sync_s'], base['sync_s']), 3):>6} "
            f"{fmt(x['copied_bytes'] / 1e6, 2):>10} {fmt(ratio(x['copied_bytes'], base['copied_bytes']), 4):>7} "
            f"{fmt(st['stop_to_final_s'] if st else None, 2):>13} {fmt(st['digest_s'] if st else None, 2):>9}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
