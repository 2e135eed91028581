"""``virt-cgrep sync``, ``points``, ``verify``, ``receive``: replication to a target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from libvirt_cgrep.cli.engine import add_backend_options, backends_for
from libvirt_cgrep.cli.output import emit_json, print_table
from libvirt_cgrep.core.names import format_size, parse_count, parse_size, parse_targets, validate_name
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.errors import EXIT_OK, InconsistentError, UsageError
from libvirt_cgrep.replica.client import Client
from libvirt_cgrep.replica.link import parse_target

SYNC_HELP = """\
Run one replication cycle for DOMAIN(s): take a consistent point (as 'point'
does), ship only the clusters written since the newest point on the target
(the first cycle seeds a full copy of the allocated data), commit the point
there atomically (all disks and the manifest, or nothing), fold the shipped
overlay back into the primary's base through libvirt (so each disk's chain
stays 'active <- base'), and apply the retention policy.

targets:
  /path                         a local directory (created if missing)
  ssh://[user@]host[:port]/path runs 'virt-cgrep receive /path' there through
                                OpenSSH: BatchMode (no prompts), strict host
                                key checking. $CGREP_REMOTE_CMD overrides the
                                remote command (e.g. a venv's virt-cgrep).

An interrupted cycle leaves no partial point; the next one ships what was not
committed yet, without a full resync.
"""


def _policy(args: argparse.Namespace) -> Policy | None:
    if args.keep is None and not args.keep_hourly and not args.keep_daily:
        return None
    return Policy(
        keep_last=parse_count(args.keep if args.keep is not None else 0, "--keep", 0, 100_000),
        keep_hourly=parse_count(args.keep_hourly or 0, "--keep-hourly", 0, 100_000),
        keep_daily=parse_count(args.keep_daily or 0, "--keep-daily", 0, 100_000),
    )


def register(sub: Any) -> None:
    s = sub.add_parser(
        "sync",
        help="one replication cycle: cut, ship, commit, fold, prune",
        description=SYNC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("domains", nargs="*", metavar="DOMAIN", help="libvirt domain(s); omit with --backend qmp")
    s.add_argument("--target", required=True, metavar="T", help="replica target: /path or ssh://[user@]host[:port]/path")
    s.add_argument("--set", metavar="NAME", help="name of the set on the target (default: the group's or the domain's name)")
    s.add_argument("--fence", choices=("none", "suspend"), default="none", help="how I/O is held for the cut (default none)")
    s.add_argument("--deadline", default="2000", metavar="MS", help="longest hold with --fence suspend (default 2000)")
    s.add_argument("--disks", metavar="T,..", help="only these disk targets")
    add_backend_options(s)
    s.add_argument("--keep", metavar="N", help="keep the newest N points (older ones are merged away)")
    s.add_argument("--keep-hourly", metavar="N", help="also keep the newest point of each of the last N hours")
    s.add_argument("--keep-daily", metavar="N", help="also keep the newest point of each of the last N days")
    s.add_argument("--compress", choices=("zlib", "zstd"), help="compress the stream")
    s.add_argument("--bwlimit", metavar="RATE", help="limit the stream, e.g. 50M (bytes per second)")
    s.add_argument("--json", action="store_true", help="machine-readable result on stdout, progress as JSON lines on stderr")
    s.set_defaults(func=cmd_sync)

    p = sub.add_parser(
        "points",
        help="list the committed points on a target",
        description="List the committed recovery points of a target, newest last.",
    )
    p.add_argument("target", metavar="T")
    p.add_argument("--set", metavar="NAME", help="only this set (default: every set)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_points)

    v = sub.add_parser(
        "verify",
        help="re-check a target's points",
        description="Re-check checksums, backing chains and manifests of a target's points; with "
        "--write-order also run the lab's write-order checker on each point's images.",
    )
    v.add_argument("target", metavar="T")
    v.add_argument("--set", metavar="NAME", help="only this set")
    v.add_argument("--point", metavar="ID", help="only this point")
    v.add_argument("--write-order", action="store_true", help="also check write order (lab guests)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser(
        "receive",
        help="the replica side of a stream (run by sync, over ssh)",
        description="Serve one replication stream on stdin/stdout into PATH. Run by 'sync'; not for people.",
    )
    r.add_argument("path", metavar="PATH")
    r.add_argument("--read-only", action="store_true", help="serve only reads (points, verify); take no lock")
    r.add_argument(
        "--serve", action="store_true", help="continuous mode: run a qemu-storage-daemon exporting the set over NBD, cut there"
    )
    r.set_defaults(func=cmd_receive)


def cmd_sync(args: argparse.Namespace) -> int:
    from libvirt_cgrep.engine.sync import sync
    from libvirt_cgrep.replica.ship import json_progress, terminal_progress

    target = parse_target(args.target)
    policy = _policy(args)
    bwlimit = parse_size(args.bwlimit, minimum=1 << 10, maximum=1 << 40, align=1) if args.bwlimit else None
    deadline = parse_count(args.deadline, "deadline (ms)", 10, 60_000)
    with backends_for(args) as backends:
        result = sync(
            backends,
            target,
            set_name=args.set or args.group,
            fence=args.fence,
            deadline_ms=deadline,
            disks=parse_targets(args.disks) if args.disks else None,
            policy=policy,
            compress=args.compress,
            bwlimit=bwlimit,
            progress=json_progress if args.json else terminal_progress,
        )
    if args.json:
        emit_json(result.as_dict())
        return EXIT_OK
    shipped = sum(d.bytes_shipped for d in result.disks)
    changed = sum(d.changed_bytes for d in result.disks)
    print(
        f"point {result.point_id} committed to {result.target} (set {result.set_name}): "
        f"{format_size(shipped)} shipped for {format_size(changed)} changed, "
        f"cut {result.cut_ms:.0f} ms, total {result.total_s:.1f} s" + (f", pruned {len(result.pruned)}" if result.pruned else "")
    )
    for disk in result.disks:
        if disk.full:
            print(f"  {disk.domain}/{disk.target}: full copy ({disk.reason})")
    return EXIT_OK


def _sets(link: Client, only: str | None) -> list[str]:
    if only:
        return [validate_name(only, "set name")]
    return list(link.sets())


def cmd_points(args: argparse.Namespace) -> int:
    target = parse_target(args.target)
    link = Client(target, readonly=True)
    try:
        listing = [p for s in _sets(link, args.set) for p in link.points(s).listing]
    finally:
        link.close()
    if args.json:
        emit_json(listing)
        return EXIT_OK
    rows = [
        {
            "set": p["set"],
            "id": p["id"],
            "time": p["time_utc"],
            "disks": len(p["disks"]),
            "fence": p["fence"],
            "shipped": format_size(sum(d["bytes_shipped"] for d in p["disks"])),
        }
        for p in listing
    ]
    print_table(
        rows,
        [("set", "SET"), ("id", "POINT"), ("time", "CUT (UTC)"), ("disks", "DISKS"), ("fence", "FENCE"), ("shipped", "SHIPPED")],
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    target = parse_target(args.target)
    link = Client(target, readonly=True)
    try:
        results = []
        for s in _sets(link, args.set):
            results += [{"set": s, **r} for r in link.verify(s, write_order=args.write_order, point=args.point or None).results]
    finally:
        link.close()
    bad = [r for r in results if not r["ok"]]
    if args.json:
        emit_json(results)
    else:
        for r in results:
            extra = ""
            if "write_order" in r:
                wo = r["write_order"]
                extra = f"  write order {'ok' if wo['consistent'] else 'BROKEN'} (max {wo['max']}, holes {wo['holes']})"
            print(f"{r['set']} {r['point_id']}: {'ok' if r['ok'] else 'FAILED: ' + '; '.join(r['problems'])}{extra}")
    if bad:
        raise InconsistentError(f"{len(bad)} of {len(results)} points failed verification")
    return EXIT_OK


def cmd_receive(args: argparse.Namespace) -> int:
    from libvirt_cgrep.server.failback import failback_start
    from libvirt_cgrep.server.receiver import serve

    target = parse_target(args.path)
    if target.host:
        raise UsageError("receive takes a local path")
    if args.serve:
        if args.read_only:
            raise UsageError("--serve and --read-only exclude each other")
        from libvirt_cgrep.server.live import serve as serve_continuous

        return serve_continuous(Path(target.path), sys.stdin.buffer, sys.stdout.buffer)
    # stdin unbuffered: data payloads are spliced from the pipe into the image (see server.receiver)
    inp = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115 - the process's stdin
    return serve(Path(target.path), inp, sys.stdout.buffer, readonly=args.read_only, failback=failback_start)
