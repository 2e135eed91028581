"""The whole story, narrated: protect a 2-VM group with an RPO, lose the primary, recover on the replica site, return.

Two sites. The primary (this host) runs the lab group, the agent and the
original site's target; the replica site holds the replica and runs every
recovery step there, as its operator would: ``points``, ``test-failover``,
``failover``, the write-order checks, ``reverse`` and ``failback``. Each
reaches the other over ssh with strict host keys.

- ``--local``: one host. The replica site is this host again, reached through
  a private sshd on loopback: every point travels over ssh, and every
  replica-site step runs in an ssh session, as between two hosts (``make demo``,
  and CI).
- ``--replica-host [USER@]HOST --primary-host [USER@]HOST``: two hosts, as in
  the Vagrant lab (vagrant/scenario); each reaches the other with root's
  ssh keys and known_hosts, and both hold this checkout at the same path.

Steps: a 2-VM lab group whose dependent writes span both VMs -> ``protect``
with an RPO -> the agent keeps it (``status``) while points accumulate ->
``test-failover`` beside live replication, then ``test-cleanup`` (listings
compared) -> the primary group dies -> ``failover`` on the replica site -> the
write-order check on the recovered VMs -> ``reverse`` to the original site ->
``failback`` (the original site's receiver starts the originals there) ->
protection in the original direction -> ``verify --write-order`` both ways ->
the negative control (per-VM cuts without the group fence).

Guarantees: every check's verdict is in the summary (``summary.json`` beside
the primary's files) and the exit status is 0 only if all passed; nothing is
left running on either site (the agent, the relays, the sshd and every
domain the walk made are stopped on every path). ``--clean`` removes what it
left on disk.

A script of this checkout, not a module of the installed package: run it as
``.venv/bin/python scripts/scenario.py`` (scripts/demo, vagrant/scenario). Its
replica-site steps run this same file on the replica site (``--call FN JSON``
over ssh), which the two-host mode can do because both hosts hold the checkout
at the same path. Exit status 0 if every check passed, 1 (InconsistentError's)
if one failed, other statuses through :func:`libvirt_cgrep.errors.exit_code_for`.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters.proc import stop
from libvirt_cgrep.core.rpo import parse_duration
from libvirt_cgrep.errors import EXIT_OK, CgrepError, CommandError, InconsistentError, UsageError, exit_code_for
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab import relay
from libvirt_cgrep.lab.check import check_images
from libvirt_cgrep.lab.sshd import loopback_sshd
from libvirt_cgrep.replica.link import Target, parse_target, ssh_argv
from libvirt_cgrep.replica.store import transient

GROUP = "demo"
BOLD, RESET = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
#: Where the replica site keeps the replica in a two-host walk (``--local``: beside the primary's files).
REPLICA_ROOT = Path("/var/lib/libvirt-cgrep/scenario")
#: This file: the replica site runs it at the same path (the checkout is there too).
SCRIPT = Path(__file__).resolve()


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


class ScenarioError(CommandError):
    """A step could not run (as opposed to a check that ran and failed): a site's command failed or stalled."""


# -- what a site does for the walk: plain JSON in, JSON out, so it runs the same over ssh -----------


def _scan(logs: list[str], timeout: float) -> list[dict[str, str]]:
    return [labdom.wait_for_scan(Path(p), timeout=timeout) for p in logs]


def _check(images: list[str]) -> dict[str, Any]:
    v = check_images([Path(p) for p in images])
    return {"consistent": v.consistent, "max": v.max, "holes": v.holes}


def _wait_done(logs: list[str], after: int, timeout: float) -> int:
    return labdom.wait_for_done([Path(p) for p in logs], after=after, timeout=timeout)


def _last_done(logs: list[str]) -> int:
    return max(d for p in logs if (d := labdom.read_console(Path(p)).done) is not None)


def _relay_start(uri: str, members: list[str]) -> None:
    relay.start(labdom.group_dir(GROUP), GROUP, members, uri=uri)


def _relay_stop() -> None:
    relay.stop(labdom.group_dir(GROUP), GROUP)


def _listing(uri: str, root: str) -> list[list[str]]:
    """The walk's domains and networks, and the files under ``root`` (without what a cycle meanwhile stages and removes)."""
    conn = lv.connect(uri)
    base = Path(root)
    try:
        doms = sorted(lv.domain_name(d) for d in lv.list_domains(conn) if _ours(d, base))
        nets = sorted(n for n in map(lv.network_name, lv.list_networks(conn)) if n.startswith(f"cgrep-{GROUP}-"))
    finally:
        conn.close()
    return [doms, nets, sorted(str(f.relative_to(base)) for f in base.rglob("*") if not transient(f.name))]


def _running(uri: str, names: list[str]) -> bool:
    conn = lv.connect(uri)
    try:
        return all(lv.state(lv.lookup(conn, n)) == "running" for n in names)
    finally:
        conn.close()


def _glob(pattern: str) -> list[str]:
    return sorted(str(p) for p in Path("/").glob(pattern.lstrip("/")))


def _teardown(uri: str, root: str) -> None:
    teardown(Path(root), uri)


def _clean(uri: str, root: str, fresh: bool = True) -> None:
    clean(Path(root), uri)
    if fresh:
        Path(root).mkdir(parents=True, mode=0o755)  # QEMU's user searches it to reach the recovered disks


CALLS: dict[str, Callable[..., Any]] = {
    "scan": _scan,
    "check": _check,
    "wait_done": _wait_done,
    "last_done": _last_done,
    "relay_start": _relay_start,
    "relay_stop": _relay_stop,
    "listing": _listing,
    "running": _running,
    "glob": _glob,
    "teardown": _teardown,
    "clean": _clean,
}


class Site:
    """Where a step runs: this host, or another over ssh (``ssh``: the ssh argv up to the host).

    ``reach``: how the other site names a path here (an ssh:// target). Remote
    steps run this checkout's Python there (the same path on both hosts), with
    ``env`` set, and answer in JSON on stdout.
    """

    def __init__(
        self, name: str, uri: str, reach: str, *, ssh: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.uri = uri
        self.reach = reach
        self.ssh = ssh
        self.env = env or {}

    def target(self, path: Path) -> str:
        return f"{self.reach}{path}"

    def _run(self, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        if self.ssh is not None:
            words = ["env", *(f"{k}={v}" for k, v in self.env.items()), *argv] if self.env else argv
            argv = [*self.ssh, "--", *(shlex.quote(w) for w in words)]
            env = None
        else:
            env = {**os.environ, **self.env}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)

    def cli(self, *args: str, check: bool = True, show: bool = False) -> subprocess.CompletedProcess[str]:
        """``virt-cgrep ARGS`` run on this site, as its operator would."""
        if show:
            print(f"[{self.name}]$ virt-cgrep {' '.join(args)}", flush=True)
        out = self._run([sys.executable, "-m", "libvirt_cgrep", "-c", self.uri, *args], timeout=900)
        if show and out.stdout:
            print(out.stdout.rstrip(), flush=True)
        if check and out.returncode != 0:
            raise ScenarioError(f"[{self.name}] virt-cgrep {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
        return out

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def call(self, fn: str, **kwargs: Any) -> Any:
        """One of :data:`CALLS` on this site: in this process here, in this script's ``--call`` over ssh."""
        if self.ssh is None:
            return CALLS[fn](**kwargs)
        out = self._run([sys.executable, str(SCRIPT), "--call", fn, json.dumps(kwargs)], timeout=900)
        if out.returncode != 0:
            raise ScenarioError(f"[{self.name}] {fn}: exit {out.returncode}: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout)


class Walk:
    """The scenario's state: the two sites, the paths on each, and the summary it fills."""

    def __init__(self, root: Path, primary: Site, replica: Site, replica_root: Path, *, rpo: str, points: int) -> None:
        self.root = root
        self.primary = primary
        self.replica_site = replica
        self.rpo = rpo
        self.rpo_s = parse_duration(rpo)
        self.points = points
        self.replica = replica_root / "replica"  # on the replica site
        self.home = root / "home"  # the original site's target, on the primary
        self.state = root / "agent"
        self.summary = Summary(rpo_s=self.rpo_s)
        self.t0 = time.monotonic()

    def check(self, step: str, ok: bool, detail: str) -> None:
        self.summary.checks.append(Check(step, ok, detail))
        print(f"   {'PASS' if ok else 'FAIL'}  {step}: {detail}", flush=True)

    def members(self) -> list[str]:
        return [f"{GROUP}-{i}" for i in range(2)]

    def replica_points(self) -> list[dict[str, Any]]:
        return list(self.replica_site.cli_json("points", str(self.replica)))


def say(n: int, text: str) -> None:
    print(f"\n{BOLD}== {n}. {text}{RESET}", flush=True)


def _serial_logs(res: dict[str, Any]) -> list[str]:
    return [str(Path(next(iter(d["disks"].values()))).parent / "serial0.log") for d in res["domains"]]


def _overlays(res: dict[str, Any]) -> list[str]:
    return [str(p) for d in res["domains"] for p in d["disks"].values()]


Listing = list[list[str]]


_POINT_FILE = re.compile(r"[^/]+/(?:points|disks)/.*(\d{8}T\d{6}\.\d{6}Z)")


def _stable(listing: Listing, keep: set[str]) -> Listing:
    """The listing without the files of points not in ``keep`` (committed or pruned meanwhile by replication)."""
    doms, nets, files = listing
    return [doms, nets, [f for f in files if not ((m := _POINT_FILE.match(f)) and m.group(1) not in keep)]]


class RpoSampler(threading.Thread):
    """Samples the newest point's age on the replica site once a second, from the first point on."""

    def __init__(self, walk: Walk) -> None:
        super().__init__(name="rpo-sampler", daemon=True)
        self.walk = walk
        self.stop = threading.Event()
        self.samples = self.within = self.count = 0
        self.oldest = 0.0
        self.error = ""  # the last sample that failed, for the report

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.count, age = _newest_age(self.walk)
            except (ScenarioError, ValueError) as exc:
                self.error = str(exc)
                continue
            if age is not None:
                self.samples += 1
                self.within += age <= self.walk.rpo_s
                self.oldest = max(self.oldest, age)


@contextlib.contextmanager
def agent(walk: Walk) -> Iterator[subprocess.Popen[bytes]]:
    """``virt-cgrep agent`` on the primary for this group only; SIGTERM and wait on exit (it never leaves a guest paused)."""
    walk.state.mkdir(parents=True, exist_ok=True)
    log = (walk.root / "agent.log").open("ab")
    argv = [sys.executable, "-m", "libvirt_cgrep", "-c", walk.primary.uri, "agent", "--state-dir", str(walk.state)]
    argv += ["--alerts-file", str(walk.root / "alerts.jsonl"), "--only", GROUP]
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, **walk.primary.env})
    try:
        yield proc
    finally:
        stop(proc, timeout=90)
        log.close()


def _newest_age(walk: Walk) -> tuple[int, float | None]:
    listing = walk.replica_points()
    if not listing:
        return 0, None
    newest = time.strptime(listing[-1]["time_utc"][:19], "%Y-%m-%dT%H:%M:%S")
    return len(listing), time.time() - calendar.timegm(newest)


def run_agent_phase(walk: Walk) -> None:
    p, r = walk.primary, walk.replica_site
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
                p.cli("status", "--state-dir", str(walk.state), show=True)
                shown = True
            if time.monotonic() > deadline:
                why = f" (listing the replica: {sampler.error})" if sampler.error else ""
                raise ScenarioError(f"only {sampler.count} points after {time.monotonic() - walk.t0:.0f} s{why}")
            time.sleep(0.5)
        p.cli("status", "--state-dir", str(walk.state), show=True)

        say(
            4,
            "Rehearsal on the replica site: test-failover beside live replication (renamed copies, isolated network), cleanup",
        )
        ids_before = {x["id"] for x in walk.replica_points()}
        before: Listing = r.call("listing", uri=r.uri, root=str(walk.replica))
        t0 = time.monotonic()
        res = r.cli_json("test-failover", GROUP, "--target", str(walk.replica))
        scans = r.call("scan", logs=_serial_logs(res), timeout=300)
        names = ", ".join(d["name"] for d in res["domains"])
        walk.check(
            "test failover boots",
            all(s["holes"] == "0" and s["bad"] == "0" for s in scans),
            f"{names} scanned records 0..{max(int(s['max']) for s in scans)} without holes in {time.monotonic() - t0:.1f} s "
            f"(point {res['point_id']})",
        )
        p.cli("status", "--state-dir", str(walk.state), show=True)
        r.cli("test-cleanup", GROUP, "--target", str(walk.replica), show=True)
        after: Listing = r.call("listing", uri=r.uri, root=str(walk.replica))
        ids_after = {x["id"] for x in walk.replica_points()}
        keep = ids_before & ids_after  # the points there throughout: the others' files come and go with replication
        before, after = _stable(before, keep), _stable(after, keep)
        walk.check(
            "test-cleanup leaves nothing",
            before == after,
            f"domains, networks and files as before the test ({len(ids_after - ids_before)} points committed meanwhile)"
            if before == after
            else f"differs: only before {[sorted(set(b) - set(a)) for b, a in zip(before, after, strict=True)]}, "
            f"only after {[sorted(set(a) - set(b)) for b, a in zip(before, after, strict=True)]}",
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
    p, r = walk.primary, walk.replica_site
    members = walk.members()
    say(1, "A 2-VM application: record n is written by VM n mod 2, only after record n-1 was acknowledged on the other VM")
    p.cli("lab", "up", "--group", GROUP, "--vms", "2", "--disks", "2", "--size", "64M", show=True)
    conn = lv.connect(p.uri)
    try:
        grp = labdom.get_group(conn, GROUP)
    finally:
        conn.close()
    logs = [str(m.directory / "console.log") for m in grp.members]
    p.call("wait_done", logs=logs, after=20, timeout=180)

    say(2, f"Protect both VMs as one consistency group, replicating over ssh to {r.target(walk.replica)}")
    p.cli("protect", *members, "--group", GROUP, "--target", r.target(walk.replica), "--rpo", walk.rpo, "--keep", "12", show=True)
    run_agent_phase(walk)

    say(5, "Disaster: the primary group dies (both VMs destroyed); the replica site recovers from the newest point")
    p.call("relay_stop")
    last_done = p.call("last_done", logs=logs)
    conn = lv.connect(p.uri)
    try:
        for n in members:
            lv.call(f"destroying {n!r}", lv.lookup(conn, n).destroy)
    finally:
        conn.close()
    newest = walk.replica_points()[-1]
    t0 = time.monotonic()
    fo = r.cli_json("failover", GROUP, "--target", str(walk.replica), "--force")
    scans = r.call("scan", logs=_serial_logs(fo), timeout=300)
    recover_s = time.monotonic() - t0
    verdict = r.call("check", images=_overlays(fo))
    walk.check(
        "failover: write order across both VMs",
        verdict["consistent"] and all(s["holes"] == "0" for s in scans),
        f"[{r.name}] point {newest['id']}: records 0..{verdict['max']} present on the recovered disks, holes {verdict['holes']}; "
        f"workload running {recover_s:.1f} s after the command started (last record done before the loss: {last_done})",
    )

    say(
        6,
        f"Reverse: the replica site protects the recovered VMs back to {p.target(walk.home)}, shipping only what changed",
    )
    r.call("relay_start", uri=r.uri, members=members)
    r.call("wait_done", logs=_serial_logs(fo), after=verdict["max"] + 20, timeout=180)
    to = p.target(walk.home)
    rev = r.cli_json("reverse", GROUP, "--target", str(walk.replica), "--to", to, "--deadline", "15000")
    ratio = rev["shipped_over_changed"]
    walk.check(
        "reverse ships only the changes",
        ratio is not None and ratio <= 1.1 and not rev["seed_full"],
        f"seed shipped {rev['seed_bytes_shipped']} B (old primary's images reused); then {rev['bytes_shipped']} B "
        f"for {rev['changed_bytes']} B changed (ratio {ratio}) of {rev['disk_bytes']} B of disks",
    )

    say(7, "Failback: final point with the recovered VMs stopped; the original site's receiver starts the originals on it")
    r.call("relay_stop")
    last_done = r.call("last_done", logs=_serial_logs(fo))
    fb = r.cli_json("failback", GROUP, "--target", str(walk.replica), "--to", to)
    running = p.call("running", uri=p.uri, names=members)
    home_logs = p.call("glob", pattern=str(walk.home / GROUP / "recovery" / "failback-*" / "*" / "serial0.log"))
    home_scans = p.call("scan", logs=home_logs, timeout=300)
    walk.check(
        "failback: originals run with every write",
        running and all(s["holes"] == "0" for s in home_scans) and max(int(s["max"]) for s in home_scans) >= last_done,
        f"[{p.name}] {', '.join(fb['originals'])} running; scan 0..{max(int(s['max']) for s in home_scans)} "
        f">= last record done at the replica site ({last_done}); failback took {fb['seconds']:.1f} s",
    )

    say(8, "Protection in the original direction resumes with deltas; every newest point verified both ways")
    p.call("relay_start", uri=p.uri, members=members)
    p.call("wait_done", logs=home_logs, after=last_done + 20, timeout=180)
    back = p.cli_json("sync", *members, "--set", GROUP, "--target", r.target(walk.replica), "--fence", "suspend")
    walk.check(
        "first cycle back is a delta",
        not any(d["full"] for d in back["disks"]),
        f"{back['bytes_shipped']} B shipped for {back['changed_bytes']} B changed",
    )
    for site, t in ((r, walk.replica), (p, walk.home)):
        pid = site.cli_json("points", str(t))[-1]["id"]
        v = site.cli_json("verify", str(t), "--point", pid, "--write-order")
        wo = v[0]["write_order"]
        walk.check(
            f"verify --write-order ({'replica' if site is r else 'original site'})",
            bool(v[0]["ok"] and wo["consistent"]),
            f"[{site.name}] point {pid}: checksums and chain ok, records 0..{wo['max']}, holes {wo['holes']}",
        )
    r.cli("points", str(walk.replica), show=True)
    walk.summary.points = walk.replica_points()

    say(9, "Negative control: the same two VMs cut one after the other, without the group fence")
    frozen: list[str] = []
    for n in members:
        frozen += [d["frozen_image"] for d in p.cli_json("point", n)["disks"]]
    naive = p.call("check", images=frozen)
    walk.check(
        "the checker catches a naive per-VM cut",
        not naive["consistent"],
        f"{naive['holes']} holes (as it must: VM 1 was cut after VM 0 went on)"
        if not naive["consistent"]
        else "no hole this time (possible when no record crossed between the two cuts; run again)",
    )
    p.call("relay_stop")


def _ours(dom: lv.Domain, root: Path) -> bool:
    """A domain of the walk: a member of its group, or one whose disks live under its directory."""
    try:
        return lv.domain_name(dom).startswith(f"{GROUP}-") or str(root) in lv.live_xml(dom)
    except CgrepError:  # gone meanwhile (other domains come and go)
        return False


def clean(root: Path, uri: str) -> None:
    """Stop and remove everything the walk made on this host: relay, lab group, recovery domains and networks, files."""
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
        for d in lv.list_domains(conn):
            if _ours(d, root):
                lv.discard(d)
        for n in lv.list_networks(conn):
            with contextlib.suppress(CgrepError):  # gone meanwhile
                if lv.network_name(n).startswith(f"cgrep-{GROUP}-"):
                    lv.discard_network(n)
    finally:
        conn.close()
    shutil.rmtree(labdom.group_dir(GROUP), ignore_errors=True)
    for i in range(2):
        shutil.rmtree(labdom.lab_root() / f"{GROUP}-{i}", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def teardown(root: Path, uri: str) -> None:
    """Leave nothing running on this host: the relay and every domain of the walk stop; files stay for inspection."""
    conn = lv.connect(uri)
    try:
        with contextlib.suppress(Exception):
            relay.stop(labdom.group_dir(GROUP), GROUP)
        for d in lv.active_domains(conn):
            if _ours(d, root):
                lv.destroy_quietly(d)
    finally:
        conn.close()


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


#: Passed on to the replica site's commands when set here: a loopback sshd's config and receiver (tests), a checkout.
FORWARDED_ENV = ("CGREP_SSH_CONFIG", "CGREP_REMOTE_CMD", "PYTHONPATH")


def _host(spec: str) -> Target:
    """``[USER@]HOST[:PORT]`` (user root by default) as the target of that host's root directory."""
    return parse_target(f"ssh://{spec if '@' in spec else f'root@{spec}'}/x")


def _site(name: str, uri: str, host: Target, *, remote: bool, env: dict[str, str]) -> Site:
    reach = str(host).removesuffix(host.path)
    return Site(name, uri, reach, ssh=ssh_argv(host) if remote else None, env=env)


def _forwarded() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


@contextlib.contextmanager
def sites(args: argparse.Namespace, root: Path) -> Iterator[tuple[Site, Site, Path]]:
    """The primary and the replica site, and the replica site's working directory.

    ``--local``: both are this host, reached through a loopback sshd (its config and receiver in the environment of
    every command of the walk); the replica site works in ``root`` beside the primary.
    """
    if args.local:
        with loopback_sshd(root / "sshd") as sshd:
            env = {**_forwarded(), **sshd.env()}
            os.environ.update(env)  # this process's ssh (the replica site's steps) uses that sshd's config too
            host = _host(f"root@127.0.0.1:{sshd.port}")
            yield (
                _site("primary", args.connect, host, remote=False, env=env),
                _site("replica", args.connect, host, remote=True, env=env),
                root,
            )
        return
    yield (
        _site("primary", args.connect, _host(args.primary_host), remote=False, env=_forwarded()),
        _site("replica", args.connect, _host(args.replica_host), remote=True, env=_forwarded()),
        args.replica_root,
    )


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting (the status comes from the error tree)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the walk (or one ``--call`` of it); the exit status comes from :func:`libvirt_cgrep.errors.exit_code_for`."""
    try:
        if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--call":  # a step of a walk run from the other site
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the answer only
                answer = CALLS[sys.argv[2]](**json.loads(sys.argv[3]))
            print(json.dumps(answer), flush=True)
            return EXIT_OK
        return _walk(argv)
    except CgrepError as exc:
        print(f"scenario: {exc}", file=sys.stderr, flush=True)
        return exit_code_for(exc)
    except KeyboardInterrupt as exc:
        return exit_code_for(exc)


def _walk(argv: Sequence[str] | None) -> int:
    ap = _Parser(prog="scenario.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="one host: the replica site is this host over a loopback sshd")
    mode.add_argument("--replica-host", metavar="[USER@]HOST[:PORT]", help="two hosts: the replica site (needs --primary-host)")
    ap.add_argument("--clean", action="store_true", help="remove what a walk left (with --replica-host: there too) and exit")
    ap.add_argument("--primary-host", metavar="[USER@]HOST[:PORT]", help="how the replica site reaches this host (two hosts)")
    ap.add_argument(
        "--replica-root",
        type=Path,
        default=REPLICA_ROOT,
        help=f"working directory on the replica site (two hosts; default {REPLICA_ROOT})",
    )
    ap.add_argument("-c", "--connect", default="qemu:///system", metavar="URI", help="libvirt of each site, on that site")
    ap.add_argument("--rpo", default="30s", help="the group's RPO (default 30s)")
    ap.add_argument("--points", type=int, default=3, help="points to let accumulate under the agent (default 3)")
    ap.add_argument("--root", type=Path, default=None, help="working directory (default: under the lab root)")
    args = ap.parse_args(argv)
    if not (args.local or args.replica_host or args.clean):
        raise UsageError("one of --local, --replica-host or --clean is required")
    if args.replica_host and not args.primary_host:
        raise UsageError("--replica-host needs --primary-host (how the replica site reaches this one)")
    try:
        for spec in filter(None, (args.replica_host, args.primary_host)):
            _host(spec)
    except UsageError as exc:
        raise UsageError(f"invalid host: {exc}") from exc
    root: Path = args.root or labdom.lab_root() / "scenario"
    if args.clean:
        clean(root, args.connect)
        print(f"scenario: removed the {GROUP} group, its recovery domains and {root}")
        if args.replica_host:
            replica = _site("replica", args.connect, _host(args.replica_host), remote=True, env=_forwarded())
            replica.call("clean", uri=args.connect, root=str(args.replica_root), fresh=False)
            print(f"scenario: removed the recovery domains and {args.replica_root} on {args.replica_host}")
        return EXIT_OK
    clean(root, args.connect)
    root.mkdir(parents=True, mode=0o755)
    started = time.monotonic()
    summary = Summary()
    try:
        with sites(args, root) as (primary, replica, replica_root):
            if replica_root != root:
                replica.call("clean", uri=replica.uri, root=str(replica_root))
            walk = Walk(root, primary, replica, replica_root, rpo=args.rpo, points=args.points)
            summary = walk.summary
            try:
                run(walk)
            except Exception as exc:  # reported as a failed step, never hidden
                walk.check("scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
            finally:
                teardown(root, args.connect)
                if replica_root != root:
                    with contextlib.suppress(Exception):
                        replica.call("teardown", uri=replica.uri, root=str(replica_root))
    finally:
        summary.seconds = time.monotonic() - started
        (root / "summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n")
        print_summary(summary)
    if summary.ok:
        return EXIT_OK
    failed = ", ".join(c.step for c in summary.checks if not c.ok) or "no check ran"
    return exit_code_for(InconsistentError(f"failed: {failed}"))  # 1: the story's checks did not all hold


if __name__ == "__main__":
    sys.exit(main())
