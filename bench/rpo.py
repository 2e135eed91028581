"""Benchmark the agent: RPO compliance under load, the smallest RPO it holds, its CPU use when idle.

Run as ``.venv/bin/python bench/rpo.py [--minutes 1] [--parts compliance,min-rpo,cpu] [--out bench/results/rpo.json]``
(root, libvirtd running, the lab guest built). See bench/README.md for what each number means.

Three parts, each with its own lab domains (``bench-<pid>-...``, always removed):

- ``compliance``: a lab domain (``--disks`` disks) writing ``--rate-mib`` MiB/s
  is protected with ``--rpo`` and the agent runs for ``--minutes``;
- ``min-rpo``: a 2-disk lab domain writing ``--min-rpo-rate-mib`` MiB/s is
  protected with each RPO of ``--min-rpo-candidates`` in turn (largest first,
  a fresh agent for ``--minutes`` each, same domain and target) until one is
  not held;
- ``cpu``: ``--idle-domains`` lab domains with ``--idle-disks`` disks each are
  defined, started paused and protected; the agent's own CPU time (not its
  children's) is measured over ``--idle-seconds`` once every group is known.

Compliance is computed from the agent's cycle records, not sampled: after a
cycle commits (its ``ended`` time) the newest point is that cycle's cut (the
time in its point id) until the next commit, so the age of the newest point at
any instant is known exactly. Time runs from the first commit of the run to
its end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import URI, fmt, guest_artifacts, percentile, unique_name, wait_progress
from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.agent.db import StateDB, db_path
from libvirt_cgrep.agent.worker import MODE_ENV
from libvirt_cgrep.cli import run as cgrep
from libvirt_cgrep.lab import domain as labdom

MIB = 1 << 20
#: The writer's record size: MiB/s x 16 records/s.
BS = 64 << 10


# --------------------------------------------------------------------------- the maths (pure)


@dataclass(frozen=True)
class Commit:
    """One committed point as the agent saw it: cut time (from the point id) and commit time (cycle end), epoch s."""

    cut: float
    committed: float


@dataclass(frozen=True)
class Compliance:
    seconds: float  # from the first commit to the end of the run
    violated_s: float  # time the newest point was older than the RPO
    fraction: float  # 1 - violated_s / seconds
    max_age_s: float  # the oldest the newest point got (the smallest RPO this run would have held)
    points: int


def point_time(point_id: str) -> float:
    """The cut time of a point id such as ``20261125T101500.123456Z`` (a tie-breaking ``-N`` suffix is ignored)."""
    return datetime.strptime(point_id.partition("-")[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC).timestamp()


def compliance(commits: Sequence[Commit], rpo: float, end: float) -> Compliance | None:
    """How long the newest point was within ``rpo`` between the first commit and ``end`` (None: no commit)."""
    cs = sorted(commits, key=lambda c: c.committed)
    if not cs:
        return None
    violated = 0.0
    max_age = 0.0
    newest_cut = cs[0].cut
    for i, c in enumerate(cs):
        newest_cut = max(newest_cut, c.cut)
        # a commit after the end (the agent finishing its last cycle while stopping) does not stretch the run
        until = min(cs[i + 1].committed, end) if i + 1 < len(cs) else end
        start = c.committed
        if until <= start:
            continue
        max_age = max(max_age, until - newest_cut)
        violated += max(0.0, until - max(start, newest_cut + rpo))
    total = max(end - cs[0].committed, 1e-9)
    return Compliance(total, violated, 1.0 - violated / total, max_age, len(cs))


# --------------------------------------------------------------------------- lab domains


def lab_spec(name: str, disks: int, *, rate: int = 0, mode: str = "write") -> labdom.LabSpec:
    g = guest_artifacts()
    return labdom.LabSpec(
        name=name,
        disks=disks,
        size=64 << 20,
        kernel=g.kernel,
        initrd=g.initrd,
        directory=labdom.lab_root() / name,
        mode=mode,
        rate=rate,
        bs=BS,
    )


@contextlib.contextmanager
def writer(conn: libvirt.virConnect, disks: int, rate_mib: float, tag: str) -> Iterator[labdom.LabDomain]:
    """A running lab domain writing ``rate_mib`` MiB/s (64 KiB records) over ``disks`` disks; always removed."""
    spec = lab_spec(unique_name(tag), disks, rate=max(1, round(rate_mib * MIB / BS)))
    try:
        vm = labdom.up(conn, spec, timeout=120)
        wait_progress(vm.directory / "console.log", records=10)
        yield vm
    finally:
        with contextlib.suppress(Exception):
            labdom.down(conn, spec.name)


@contextlib.contextmanager
def paused_domains(conn: libvirt.virConnect, count: int, disks: int) -> Iterator[list[str]]:
    """``count`` lab domains defined and started paused (their guests never run); always removed."""
    names: list[str] = []
    try:
        for _ in range(count):
            spec = lab_spec(unique_name("idle"), disks, mode="idle")
            names.append(spec.name)
            spec.directory.mkdir(parents=True, mode=0o755)
            for img in spec.images():
                qemu_img.create_qcow2(img, spec.size)
            dom = conn.defineXML(labdom.domain_xml(spec, str(uuid.uuid4())))
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        yield names
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                labdom.down(conn, name)


def protect(uri: str, name: str, target: Path, rpo: int, *, keep: int = 24) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cgrep(["-c", uri, "protect", name, "--target", str(target), "--rpo", f"{rpo}s", "--keep", str(keep)])
    if rc != 0:
        raise RuntimeError(f"protect {name} failed ({rc})")


# --------------------------------------------------------------------------- the agent


class Agent:
    """``virt-cgrep agent`` on a scratch state directory, managing only ``groups``; stopped with SIGTERM."""

    def __init__(self, uri: str, groups: Sequence[str], state: Path, children: str = "fork") -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        only = ", ".join(json.dumps(g) for g in groups)
        (state / "agent.toml").write_text(
            f"uri = {json.dumps(uri)}\nstate_dir = {json.dumps(str(state))}\nspool = {json.dumps(str(state / 'spool'))}\n"
            f"alerts_file = {json.dumps(str(state / 'alerts.jsonl'))}\nonly = [{only}]\n"
        )
        with open(state / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "libvirt_cgrep", "agent", "--config", str(state / "agent.toml")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, MODE_ENV: children},
            )
        self.started = time.time()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def groups(self) -> dict[str, str]:
        """{group: state} from the state DB ({} while the agent is starting)."""
        if not db_path(self.state).exists():
            return {}
        try:
            db = StateDB(db_path(self.state), readonly=True)
        except Exception:
            return {}
        try:
            return {g.name: g.state for g in db.groups()}
        except Exception:
            return {}
        finally:
            db.close()

    def cycles(self, group: str) -> list[dict[str, Any]]:
        db = StateDB(db_path(self.state), readonly=True)
        try:
            return db.cycles(group, 100_000)
        finally:
            db.close()

    def commits(self, group: str) -> tuple[list[Commit], int, list[float]]:
        """(the group's commits, failed cycles, successful cycle durations s) of this run."""
        cycles = self.cycles(group)
        ok = [c for c in cycles if c["ok"] and c["point_id"]]
        commits = [Commit(point_time(c["point_id"]), c["ended"]) for c in ok]
        return commits, len(cycles) - len(ok), [c["ended"] - c["started"] for c in ok]

    def alerts(self, group: str, since: float) -> list[str]:
        f = self.state / "alerts.jsonl"
        out = []
        for line in f.read_text().splitlines() if f.exists() else []:
            a = json.loads(line)
            t = datetime.fromisoformat(a["time"].replace("Z", "+00:00")).timestamp()
            if a["group"] == group and t >= since:
                out.append(str(a["kind"]))
        return out

    def cpu_seconds(self) -> float:
        """The agent's own user + system CPU time (children excluded)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


@dataclass
class RunResult:
    """One agent run on one writing domain."""

    rpo_s: int
    rate_mib_s: float
    written_mib_s: float  # what the guest acknowledged (the writer may not keep up with the asked rate under TCG)
    disks: int
    minutes: float
    points: int
    failed_cycles: int
    mean_cycle_s: float
    p90_cycle_s: float | None
    max_cycle_s: float | None
    compliance: float | None
    violated_s: float | None
    max_age_s: float | None
    violations_after_first_point: int
    held: bool
    children: str = "fork"
    p50_cycle_s: float | None = None
    p99_cycle_s: float | None = None
    pre_cut_mean_s: float | None = None  # cycle start -> cut (child start-up, receiver, repair, snapshot)
    post_cut_mean_s: float | None = None  # cut -> cycle end (ship, commit, fold, prune, exit)
    gap_p50_s: float | None = None  # previous cycle's end -> next start (back-to-back: the loop's reaction)
    gap_max_s: float | None = None
    back_to_back: float | None = None  # fraction of cycles started within 0.5 s of the previous end
    loadavg_end: str = ""
    run_end: float = 0.0  # epoch s: compliance is computed up to here
    cycles: list[dict[str, Any]] = field(default_factory=list)  # the agent's cycle records (recompute from the JSON)


def run_agent(
    uri: str,
    vm: labdom.LabDomain,
    target: Path,
    rpo: int,
    *,
    minutes: float,
    rate_mib: float,
    scratch: Path,
    children: str = "fork",
) -> RunResult:
    protect(uri, vm.name, target, rpo)
    first_ack = labdom.read_console(vm.directory / "console.log").ack
    agent = Agent(uri, [vm.name], scratch / f"agent-{vm.name}-rpo{rpo}-{children}", children)
    try:
        time.sleep(minutes * 60)
        end = time.time()
        last_ack = labdom.read_console(vm.directory / "console.log").ack
    finally:
        rc = agent.stop()
    acked = (last_ack.seq - first_ack.seq) if first_ack and last_ack else 0
    if rc != 0:
        raise RuntimeError(f"the agent exited with {rc}: see {agent.state / 'agent.log'}")
    commits, failed, durations = agent.commits(vm.name)
    cycles = [c for c in agent.cycles(vm.name) if c["ok"] and c["point_id"]]
    pre = [point_time(c["point_id"]) - c["started"] for c in cycles]
    post = [c["ended"] - point_time(c["point_id"]) for c in cycles]
    gaps = [b["started"] - a["ended"] for a, b in itertools.pairwise(cycles)]
    comp = compliance(commits, rpo, end)
    first = min((c.committed for c in commits), default=end)
    violations = agent.alerts(vm.name, first).count("rpo-violated")
    return RunResult(
        rpo_s=rpo,
        rate_mib_s=rate_mib,
        written_mib_s=acked * BS / MIB / (end - agent.started),
        disks=vm.disks,
        minutes=minutes,
        points=len(commits),
        failed_cycles=failed,
        mean_cycle_s=sum(durations) / len(durations) if durations else 0.0,
        p90_cycle_s=percentile(durations, 90),
        max_cycle_s=max(durations, default=None),
        compliance=comp.fraction if comp else None,
        violated_s=comp.violated_s if comp else None,
        max_age_s=comp.max_age_s if comp else None,
        violations_after_first_point=violations,
        held=bool(comp and comp.violated_s == 0 and violations == 0),
        children=children,
        p50_cycle_s=percentile(durations, 50),
        p99_cycle_s=percentile(durations, 99),
        pre_cut_mean_s=sum(pre) / len(pre) if pre else None,
        post_cut_mean_s=sum(post) / len(post) if post else None,
        gap_p50_s=percentile(gaps, 50),
        gap_max_s=max(gaps, default=None),
        back_to_back=sum(g < 0.5 for g in gaps) / len(gaps) if gaps else None,
        loadavg_end=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        run_end=end,
        cycles=agent.cycles(vm.name),
    )


# --------------------------------------------------------------------------- the parts


def part_compliance(args: argparse.Namespace, conn: libvirt.virConnect, scratch: Path) -> RunResult:
    with writer(conn, args.disks, args.rate_mib, "rpo") as vm:
        return run_agent(
            args.uri,
            vm,
            scratch / "replica-compliance",
            args.rpo,
            minutes=args.minutes,
            rate_mib=args.rate_mib,
            scratch=scratch,
            children=args.children,
        )


def part_min_rpo(args: argparse.Namespace, conn: libvirt.virConnect, scratch: Path) -> tuple[list[RunResult], int | None]:
    candidates = sorted({int(x) for x in args.min_rpo_candidates.split(",") if x}, reverse=True)
    runs: list[RunResult] = []
    held: int | None = None
    with writer(conn, 2, args.min_rpo_rate_mib, "minrpo") as vm:
        target = scratch / "replica-min-rpo"
        for rpo in candidates:
            print(f"min-rpo: RPO {rpo} s for {args.minutes} min", file=sys.stderr, flush=True)
            r = run_agent(
                args.uri,
                vm,
                target,
                rpo,
                minutes=args.minutes,
                rate_mib=args.min_rpo_rate_mib,
                scratch=scratch,
                children=args.children,
            )
            runs.append(r)
            if not r.held:
                break
            held = rpo
    return runs, held


@dataclass
class CpuResult:
    domains: int
    disks: int
    seconds: float
    cpu_s: float
    cpu_percent: float
    rss_mib: float
    settle_s: float


def part_cpu(args: argparse.Namespace, conn: libvirt.virConnect, scratch: Path) -> CpuResult:
    print(f"cpu: defining {args.idle_domains} paused domains x {args.idle_disks} disks", file=sys.stderr, flush=True)
    with paused_domains(conn, args.idle_domains, args.idle_disks) as names:
        for name in names:
            protect(args.uri, name, scratch / "replica-idle", 3600)
        agent = Agent(args.uri, names, scratch / "agent-idle", args.children)
        try:
            t0 = time.monotonic()
            while True:
                states = agent.groups()
                if len(states) == len(names) and "unknown" not in states.values():
                    break
                if agent.proc.poll() is not None or time.monotonic() - t0 > 600:
                    raise RuntimeError(f"the agent did not learn every group: see {agent.state / 'agent.log'}")
                time.sleep(0.5)
            time.sleep(5)  # the startup probes' children are gone; the loop is all that runs
            settle = time.monotonic() - t0
            c0, w0 = agent.cpu_seconds(), time.monotonic()
            time.sleep(args.idle_seconds)
            c1, w1 = agent.cpu_seconds(), time.monotonic()
            rss = agent.rss_mib()
        finally:
            agent.stop()
    return CpuResult(len(names), args.idle_disks, w1 - w0, c1 - c0, 100 * (c1 - c0) / (w1 - w0), rss, settle)


# --------------------------------------------------------------------------- output


def run_table(runs: Sequence[RunResult], title: str) -> str:
    head = (
        f"{'RPO s':>5} {'MiB/s':>5} {'wrote':>5} {'disks':>5} {'min':>5} {'points':>6} {'failed':>6}"
        f" {'cycle s':>7} {'p50':>5} {'p90':>5} {'p99':>5} {'max':>5} {'pre':>5} {'post':>5} {'gap':>5}"
        f" {'compliance':>10} {'violated s':>10} {'max age s':>9} {'alerts':>6} {'held':>4} {'child':>5} load"
    )
    rows = [title, head, "-" * len(head)]
    for r in runs:
        pct = "-" if r.compliance is None else f"{100 * r.compliance:.2f} %"
        rows.append(
            f"{r.rpo_s:>5} {fmt(r.rate_mib_s):>5} {fmt(r.written_mib_s):>5} {r.disks:>5} {fmt(r.minutes):>5}"
            f" {r.points:>6} {r.failed_cycles:>6} {fmt(r.mean_cycle_s, 2):>7} {fmt(r.p50_cycle_s):>5}"
            f" {fmt(r.p90_cycle_s):>5} {fmt(r.p99_cycle_s):>5} {fmt(r.max_cycle_s):>5}"
            f" {fmt(r.pre_cut_mean_s):>5} {fmt(r.post_cut_mean_s):>5} {fmt(r.gap_p50_s, 2):>5}"
            f" {pct:>10} {fmt(r.violated_s):>10} {fmt(r.max_age_s):>9} {r.violations_after_first_point:>6}"
            f" {'yes' if r.held else 'NO':>4} {r.children:>5} {r.loadavg_end}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="compliance,min-rpo,cpu", help="which parts to run (default all three)")
    ap.add_argument("--minutes", type=float, default=1.0, help="length of each agent run (default 1)")
    ap.add_argument("--rpo", type=int, default=60, help="compliance: the RPO, s (default 60)")
    ap.add_argument("--rate-mib", type=float, default=10.0, help="compliance: the writer, MiB/s (default 10)")
    ap.add_argument("--disks", type=int, default=2, help="compliance: disks of the writing domain (default 2)")
    ap.add_argument("--min-rpo-candidates", default="10,5,4,3,2", help="min-rpo: RPOs to try, s (largest first)")
    ap.add_argument("--min-rpo-rate-mib", type=float, default=1.0, help="min-rpo: the writer, MiB/s (default 1)")
    ap.add_argument("--idle-domains", type=int, default=50)
    ap.add_argument("--idle-disks", type=int, default=4)
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="cpu: measuring window, s (default 60)")
    ap.add_argument("--children", choices=("fork", "exec"), default="fork", help="how the agent starts cycles (agent.worker)")
    ap.add_argument("--uri", default=URI)
    ap.add_argument("--out", type=Path, default=Path("bench/results/rpo.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root (lab domains on qemu:///system)")
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"compliance", "min-rpo", "cpu"}
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    host: dict[str, object] = {
        "python": platform.python_version(),
        "libvirt": libvirt.getVersion(),
        "cpus": os.cpu_count(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    report: dict[str, object] = {
        "started_utc": datetime.now(UTC).isoformat(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": host,
    }
    texts: list[str] = []
    conn = libvirt.open(args.uri)
    scratch = Path(tempfile.mkdtemp(prefix="bench-rpo-", dir="/var/tmp"))
    try:
        if "compliance" in parts:
            print(f"compliance: RPO {args.rpo} s, {args.rate_mib} MiB/s, {args.minutes} min", file=sys.stderr, flush=True)
            c = part_compliance(args, conn, scratch)
            report["compliance"] = asdict(c)
            texts.append(run_table([c], "RPO compliance"))
        if "min-rpo" in parts:
            runs, held = part_min_rpo(args, conn, scratch)
            report["min_rpo"] = {"runs": [asdict(r) for r in runs], "min_rpo_held_s": held}
            texts.append(run_table(runs, f"smallest RPO held (2 disks, {args.min_rpo_rate_mib} MiB/s): {held or '-'} s"))
        if "cpu" in parts:
            cpu = part_cpu(args, conn, scratch)
            report["cpu"] = asdict(cpu)
            texts.append(
                f"agent CPU with {cpu.domains} protected idle domains x {cpu.disks} disks: {cpu.cpu_percent:.2f} % of one core "
                f"({cpu.cpu_s:.2f} s over {cpu.seconds:.0f} s), RSS {cpu.rss_mib:.0f} MiB"
            )
    finally:
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report["finished_utc"] = datetime.now(UTC).isoformat()
    host["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("\n\n".join(texts))
    print(f"\n(JSON: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
