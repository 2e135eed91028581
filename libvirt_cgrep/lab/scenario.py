"""The whole story, narrated: protect a 2-VM group with an RPO, lose the primary, recover, return.

``python -m libvirt_cgrep.lab.scenario --local`` runs it on one host: the primary is
this libvirtd, the replica a directory reached through a private sshd on
loopback (so every point travels over ssh, as between two hosts), and the
"original site" another directory. ``vagrant/scenario`` runs this same
``--local`` walk on the Vagrant lab's primary (see vagrant/Vagrantfile); a
walk that fails over on the replica host itself is not written yet.

Steps: a 2-VM lab group whose dependent writes span both VMs -> ``protect``
with an RPO -> the agent keeps it (``status``) while points accumulate ->
``test-failover`` beside live replication, then ``test-cleanup`` (listings
compared) -> the primary group dies -> ``failover`` on the replica -> the
write-order check on the recovered VMs -> ``reverse`` -> ``failback`` ->
protection in the original direction -> ``verify --write-order`` both ways ->
the negative control (per-VM cuts without the group fence).

Guarantees: every check's verdict is in the summary (``summary.json`` beside
the replica) and the exit status is 0 only if all passed; nothing is left
running (the agent, the relay, the sshd and every domain it made are stopped
on every path). ``--clean`` removes what it left on disk.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters.proc import stop
from libvirt_cgrep.core.rpo import parse_duration
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab import relay
from libvirt_cgrep.lab.check import check_images
from libvirt_cgrep.lab.sshd import loopback_sshd
from libvirt_cgrep.replica.store import transient

GROUP = "demo"
BOLD, RESET = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


@dataclass
class Check:
    """One verdict of the walk."""

    step: str
    ok: bool
    detail: str


@dataclass
class Summary:
    """What the walk found: its checks, timings and the RPO held while the agent ran."""

    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    rpo_s: float = 0.0
    rpo_within: float | None = None
    oldest_age_s: float | None = None
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


class Walk:
    """The scenario's state: paths, the CLI runner, and the summary it fills."""

    def __init__(self, root: Path, uri: str, rpo: str, points: int, env: dict[str, str]) -> None:
        self.root = root
        self.uri = uri
        self.rpo = rpo
        self.rpo_s = parse_duration(rpo)
        self.points = points
        self.replica = root / "replica"
        self.home = root / "home"
        self.state = root / "agent"
        self.env = {**os.environ, **env}
        self.summary = Summary(rpo_s=self.rpo_s)
        self.t0 = time.monotonic()

    # -- running the product as an operator does -------------------------------------------------
    def cli(self, *args: str, check: bool = True, show: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "libvirt_cgrep", "-c", self.uri, *args]
        if show:
            print(f"$ virt-cgrep {' '.join(args)}", flush=True)
        out = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=900, check=False)
        if show and out.stdout:
            print(out.stdout.rstrip(), flush=True)
        if check and out.returncode != 0:
            raise ScenarioError(f"virt-cgrep {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
        return out

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def check(self, step: str, ok: bool, detail: str) -> None:
        self.summary.checks.append(Check(step, ok, detail))
        print(f"   {'PASS' if ok else 'FAIL'}  {step}: {detail}", flush=True)

    def members(self) -> list[str]:
        return [f"{GROUP}-{i}" for i in range(2)]


class ScenarioError(Exception):
    """A step could not run (as opposed to a check that ran and failed)."""


def say(n: int, text: str) -> None:
    print(f"\n{BOLD}== {n}. {text}{RESET}", flush=True)


def _serial_logs(res: dict[str, Any]) -> list[Path]:
    return [Path(next(iter(d["disks"].values()))).parent / "serial0.log" for d in res["domains"]]


def _overlays(res: dict[str, Any]) -> list[Path]:
    return [Path(p) for d in res["domains"] for p in d["disks"].values()]


def _listing(conn: libvirt.virConnect, root: Path) -> tuple[set[str], set[str], set[str]]:
    """Domains, networks and files under ``root`` (without what a cycle running meanwhile stages and removes)."""
    files = {str(p.relative_to(root)) for p in root.rglob("*") if not transient(p.name)}
    return {d.name() for d in conn.listAllDomains(0)}, {n.name() for n in conn.listAllNetworks(0)}, files


def _without(listing: tuple[set[str], set[str], set[str]], ids: set[str]) -> tuple[set[str], set[str], set[str]]:
    """The listing without the files of points ``ids`` (committed meanwhile by replication, not by the test)."""
    doms, nets, files = listing
    return doms, nets, {f for f in files if not any(i in f for i in ids)}


class RpoSampler(threading.Thread):
    """Samples the newest point's age on the replica once a second, from the first point on."""

    def __init__(self, walk: Walk) -> None:
        super().__init__(name="rpo-sampler", daemon=True)
        self.walk = walk
        self.stop = threading.Event()
        self.samples = self.within = self.count = 0
        self.oldest = 0.0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            with contextlib.suppress(ScenarioError, ValueError):
                self.count, age = _newest_age(self.walk)
                if age is not None:
                    self.samples += 1
                    self.within += age <= self.walk.rpo_s
                    self.oldest = max(self.oldest, age)


@contextlib.contextmanager
def agent(walk: Walk) -> Iterator[subprocess.Popen[bytes]]:
    """``virt-cgrep agent`` for this group only; SIGTERM and wait on exit (it never leaves a guest paused)."""
    walk.state.mkdir(parents=True, exist_ok=True)
    log = (walk.root / "agent.log").open("ab")
    argv = [sys.executable, "-m", "libvirt_cgrep", "-c", walk.uri, "agent", "--state-dir", str(walk.state)]
    argv += ["--alerts-file", str(walk.root / "alerts.jsonl"), "--only", GROUP]
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=walk.env)
    try:
        yield proc
    finally:
        stop(proc, timeout=90)
        log.close()


def _newest_age(walk: Walk) -> tuple[int, float | None]:
    listing = walk.cli_json("points", str(walk.replica)) if walk.replica.exists() else []
    if not listing:
        return 0, None
    newest = time.strptime(listing[-1]["time_utc"][:19], "%Y-%m-%dT%H:%M:%S")
    return len(listing), time.time() - calendar.timegm(newest)


def run_agent_phase(walk: Walk, conn: libvirt.virConnect) -> None:
    say(3, f"The agent keeps the group within RPO {walk.rpo}: it starts each cycle early enough, from measured cycle times")
    sampler = RpoSampler(walk)
    with agent(walk) as proc:
        sampler.start()
        deadline = time.monotonic() + 120 + walk.points * walk.rpo_s * 2
        shown = False
        while sampler.count < walk.points:
            if proc.poll() is not None:
                raise ScenarioError(f"the agent exited with {proc.returncode} (see {walk.root / 'agent.log'})")
            if sampler.count and not shown:
                walk.cli("status", "--state-dir", str(walk.state), show=True)
                shown = True
            if time.monotonic() > deadline:
                raise ScenarioError(f"only {sampler.count} points after {time.monotonic() - walk.t0:.0f} s")
            time.sleep(0.5)
        walk.cli("status", "--state-dir", str(walk.state), show=True)

        say(4, "Rehearsal: test-failover beside live replication (renamed copies, isolated network), then test-cleanup")
        ids_before = {p["id"] for p in walk.cli_json("points", str(walk.replica))}
        before = _listing(conn, walk.replica)
        t0 = time.monotonic()
        res = walk.cli_json("test-failover", GROUP, "--target", str(walk.replica))
        scans = [labdom.wait_for_scan(p, timeout=300) for p in _serial_logs(res)]
        names = ", ".join(d["name"] for d in res["domains"])
        walk.check(
            "test failover boots",
            all(s["holes"] == "0" and s["bad"] == "0" for s in scans),
            f"{names} scanned records 0..{max(int(s['max']) for s in scans)} without holes in {time.monotonic() - t0:.1f} s "
            f"(point {res['point_id']})",
        )
        walk.cli("status", "--state-dir", str(walk.state), show=True)
        walk.cli("test-cleanup", GROUP, "--target", str(walk.replica), show=True)
        ids_after = {p["id"] for p in walk.cli_json("points", str(walk.replica))}
        after = _without(_listing(conn, walk.replica), ids_after - ids_before)
        before = _without(before, ids_before - ids_after)  # pruned meanwhile
        walk.check(
            "test-cleanup leaves nothing",
            before == after,
            f"domains, networks and files as before the test ({len(ids_after - ids_before)} points committed meanwhile)"
            if before == after
            else f"differs: only before {[sorted(b - a) for b, a in zip(before, after, strict=True)]}, "
            f"only after {[sorted(a - b) for b, a in zip(before, after, strict=True)]}",
        )
        sampler.stop.set()
        sampler.join()
    walk.summary.rpo_within = sampler.within / sampler.samples if sampler.samples else None
    walk.summary.oldest_age_s = round(sampler.oldest, 1)
    walk.check(
        "RPO held while the agent ran",
        sampler.samples > 0 and sampler.within == sampler.samples,
        f"newest point within {walk.rpo} in {sampler.within}/{sampler.samples} samples (about 1 s apart), "
        f"oldest {sampler.oldest:.1f} s; {sampler.count} points",
    )


def run(walk: Walk) -> None:
    conn = lv.connect(walk.uri)
    try:
        say(1, "A 2-VM application: record n is written by VM n mod 2, only after record n-1 was acknowledged on the other VM")
        walk.cli("lab", "up", "--group", GROUP, "--vms", "2", "--disks", "2", "--size", "64M", show=True)
        members = walk.members()
        grp = labdom.get_group(conn, GROUP)
        logs = [m.directory / "console.log" for m in grp.members]
        labdom.wait_for_done(logs, after=20, timeout=180)

        say(2, f"Protect both VMs as one consistency group, replicating over ssh to {walk.replica}")
        url = walk.env["CGREP_DEMO_TARGET"]
        walk.cli("protect", *members, "--group", GROUP, "--target", url, "--rpo", walk.rpo, "--keep", "12", show=True)
        run_agent_phase(walk, conn)

        say(5, "Disaster: the primary group dies (both VMs destroyed); the replica site recovers from the newest point")
        relay.stop(grp.directory, GROUP)
        last_done = max(d for p in logs if (d := labdom.read_console(p).done) is not None)
        for n in members:
            lv.lookup(conn, n).destroy()
        newest = walk.cli_json("points", str(walk.replica))[-1]
        t0 = time.monotonic()
        fo = walk.cli_json("failover", GROUP, "--target", str(walk.replica), "--force")
        scans = [labdom.wait_for_scan(p, timeout=300) for p in _serial_logs(fo)]
        recover_s = time.monotonic() - t0
        verdict = check_images(_overlays(fo))
        walk.check(
            "failover: write order across both VMs",
            verdict.consistent and all(s["holes"] == "0" for s in scans),
            f"point {newest['id']}: records 0..{verdict.max} present on the recovered disks, holes {verdict.holes}; "
            f"workload running {recover_s:.1f} s after the command started (last record done before the loss: {last_done})",
        )

        say(6, "Reverse: protect the recovered VMs back to the original site, shipping only what changed since the point")
        relay.start(grp.directory, GROUP, members, uri=walk.uri)
        labdom.wait_for_done(_serial_logs(fo), after=verdict.max + 20, timeout=180)
        rev = walk.cli_json("reverse", GROUP, "--target", str(walk.replica), "--to", str(walk.home), "--deadline", "15000")
        ratio = rev["shipped_over_changed"]
        walk.check(
            "reverse ships only the changes",
            ratio is not None and ratio <= 1.1 and not rev["seed_full"],
            f"seed shipped {rev['seed_bytes_shipped']} B (old primary's images reused); then {rev['bytes_shipped']} B "
            f"for {rev['changed_bytes']} B changed (ratio {ratio}) of {rev['disk_bytes']} B of disks",
        )

        say(7, "Failback: final point with the recovered VMs stopped, then the originals start on it, at home")
        relay.stop(grp.directory, GROUP)
        last_done = max(d for p in _serial_logs(fo) if (d := labdom.read_console(p).done) is not None)
        fb = walk.cli_json("failback", GROUP, "--target", str(walk.replica), "--to", str(walk.home))
        running = all(lv.state(lv.lookup(conn, n)) == "running" for n in members)
        home_logs = sorted((walk.home / GROUP / "recovery").glob("failback-*/*/serial0.log"))
        home_scans = [labdom.wait_for_scan(p, timeout=300) for p in home_logs]
        walk.check(
            "failback: originals run with every write",
            running and all(s["holes"] == "0" for s in home_scans) and max(int(s["max"]) for s in home_scans) >= last_done,
            f"{', '.join(fb['originals'])} running; scan 0..{max(int(s['max']) for s in home_scans)} "
            f">= last record done at the replica site ({last_done}); failback took {fb['seconds']:.1f} s",
        )

        say(8, "Protection in the original direction resumes with deltas; every newest point verified both ways")
        relay.start(grp.directory, GROUP, members, uri=walk.uri)
        labdom.wait_for_done(home_logs, after=last_done + 20, timeout=180)
        back = walk.cli_json("sync", *members, "--set", GROUP, "--target", str(walk.replica), "--fence", "suspend")
        walk.check(
            "first cycle back is a delta",
            not any(d["full"] for d in back["disks"]),
            f"{back['bytes_shipped']} B shipped for {back['changed_bytes']} B changed",
        )
        for name, t in (("replica", walk.replica), ("original site", walk.home)):
            pid = walk.cli_json("points", str(t))[-1]["id"]
            v = walk.cli_json("verify", str(t), "--point", pid, "--write-order")
            wo = v[0]["write_order"]
            walk.check(
                f"verify --write-order ({name})",
                bool(v[0]["ok"] and wo["consistent"]),
                f"point {pid}: checksums and chain ok, records 0..{wo['max']}, holes {wo['holes']}",
            )
        walk.cli("points", str(walk.replica), show=True)
        walk.summary.points = walk.cli_json("points", str(walk.replica))

        say(9, "Negative control: the same two VMs cut one after the other, without the group fence")
        frozen: list[Path] = []
        for n in members:
            r = walk.cli_json("point", n)
            frozen += [Path(d["frozen_image"]) for d in r["disks"]]
        naive = check_images(frozen)
        walk.check(
            "the checker catches a naive per-VM cut",
            not naive.consistent,
            f"{naive.holes} holes (as it must: VM 1 was cut after VM 0 went on)"
            if not naive.consistent
            else "no hole this time (possible when no record crossed between the two cuts; run again)",
        )
        relay.stop(grp.directory, GROUP)
    finally:
        conn.close()


def _ours(dom: libvirt.virDomain, root: Path) -> bool:
    """A domain of the walk: a member of its group, or one whose disks live under its directory."""
    try:
        return dom.name().startswith(f"{GROUP}-") or str(root) in dom.XMLDesc(0)
    except libvirt.libvirtError:  # gone meanwhile (other domains come and go)
        return False


def clean(root: Path, uri: str) -> None:
    """Stop and remove everything the walk made: relay, lab group, recovery domains and networks, files."""
    subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "-c", uri, "lab", "down", "--group", GROUP],
        capture_output=True,
        check=False,
        timeout=300,
    )
    conn = lv.connect(uri)
    try:
        with contextlib.suppress(Exception):
            relay.stop(labdom.group_dir(GROUP), GROUP)
        for d in conn.listAllDomains(0):
            if _ours(d, root):
                with contextlib.suppress(libvirt.libvirtError):
                    if d.isActive():
                        d.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        for n in conn.listAllNetworks(0):
            if n.name().startswith(f"cgrep-{GROUP}-"):
                with contextlib.suppress(libvirt.libvirtError):
                    n.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    n.undefine()
    finally:
        conn.close()
    shutil.rmtree(labdom.group_dir(GROUP), ignore_errors=True)
    for i in range(2):
        shutil.rmtree(labdom.lab_root() / f"{GROUP}-{i}", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def print_summary(s: Summary) -> None:
    print(f"\n{BOLD}== Summary{RESET}")
    width = max(len(c.step) for c in s.checks) if s.checks else 10
    for c in s.checks:
        print(f"{'PASS' if c.ok else 'FAIL':<5} {c.step:<{width}}  {c.detail}")
    if s.points:
        print(f"\n{len(s.points)} points on the replica, newest {s.points[-1]['id']}")
    held = f"{100 * s.rpo_within:.1f} %" if s.rpo_within is not None else "n/a"
    print(f"RPO {s.rpo_s:.0f} s held {held} of the agent phase (oldest newest-point age {s.oldest_age_s} s)")
    print(f"wall time {s.seconds:.0f} s; {'ALL CHECKS PASSED' if s.ok else 'SOME CHECKS FAILED'}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scenario", description=__doc__.split("\n\n")[0] if __doc__ else None)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="one host: replica and original site are directories")
    mode.add_argument("--clean", action="store_true", help="remove what a walk left and exit")
    ap.add_argument("-c", "--connect", default="qemu:///system", metavar="URI")
    ap.add_argument("--rpo", default="30s", help="the group's RPO (default 30s)")
    ap.add_argument("--points", type=int, default=3, help="points to let accumulate under the agent (default 3)")
    ap.add_argument("--root", type=Path, default=None, help="working directory (default: under the lab root)")
    args = ap.parse_args(argv)
    root: Path = args.root or labdom.lab_root() / "scenario"
    if args.clean:
        clean(root, args.connect)
        print(f"scenario: removed the {GROUP} group, its recovery domains and {root}")
        return 0
    clean(root, args.connect)
    root.mkdir(parents=True, mode=0o755)
    started = time.monotonic()
    summary = Summary()
    try:
        with loopback_sshd(root / "sshd") as sshd:
            env = {**sshd.env(), "CGREP_DEMO_TARGET": sshd.target(root / "replica")}
            walk = Walk(root, args.connect, args.rpo, args.points, env)
            summary = walk.summary
            try:
                run(walk)
            except Exception as exc:  # reported as a failed step, never hidden
                walk.check("scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
            finally:
                teardown(root, args.connect)
    finally:
        summary.seconds = time.monotonic() - started
        (root / "summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n")
        print_summary(summary)
    return 0 if summary.ok else 1


def teardown(root: Path, uri: str) -> None:
    """Leave nothing running: the relay and every domain of the walk stop; files stay for inspection."""
    conn = lv.connect(uri)
    try:
        with contextlib.suppress(Exception):
            relay.stop(labdom.group_dir(GROUP), GROUP)
        for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if _ours(d, root):
                with contextlib.suppress(libvirt.libvirtError):
                    d.destroy()
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
