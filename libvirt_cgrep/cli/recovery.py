"""``virt-cgrep failover``, ``test-failover``, ``test-cleanup``, ``recovery``, ``reverse``, ``failback``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.cli.output import emit_json, print_table
from libvirt_cgrep.core.names import parse_count
from libvirt_cgrep.errors import EXIT_OK, UsageError
from libvirt_cgrep.replica.link import parse_target

FAILOVER_HELP = """\
Recover GROUP (a set on the target) or one DOMAIN of it on this host, at a
committed point (default: the newest): each domain is defined from the domain
XML stored in the point's manifest, every protected disk on a NEW overlay
(qemu-img create -b <point image>) in TARGET/SET/recovery/RUN/, and started.
The replica's images are never written; the point and older ones are not
pruned while the run lasts. Run it on the replica host (T is a local path).

identity:
  the original's name and UUID are kept when that name is free here. A
  shut-off original defined here is replaced only with --force (its definition
  is kept in the journal); next to a running original, --force recovers a copy
  NAME-failover with a new UUID; without --force both are refused.

devices:
  NICs on a network or bridge missing here are refused unless --network NAME
  remaps them; host devices are removed, media ejected, unprotected disks
  removed, serial logs and NVRAM moved into the run's directory; every change
  is reported.

Running the command again finishes an interrupted run (its journal is
TARGET/SET/recovery/RUN.json).
"""

TEST_HELP = """\
Rehearse a failover without touching production: like 'failover', but the
domains are named NAME-test (--suffix) with new UUIDs and new MAC addresses,
their NICs go on an isolated network created for the test (no forwarding, no
address; --nics remove drops them instead), and replication of the same group
goes on: cycles keep committing points while the test runs (the test's point
and older ones are not pruned meanwhile). Remove it with 'test-cleanup'.
"""

CLEANUP_HELP = """\
Remove exactly what the test failovers of GROUP (or DOMAIN) created: their
domains (only those carrying the run's recovery metadata), the isolated
network, the overlays, logs and journal, and restore the directory modes the
test widened. Nothing else on the target or the host is touched.
"""


def _local_root(text: str) -> Path:
    t = parse_target(text)
    if t.host:
        raise UsageError("recovery runs on the replica host: give the target as a local path")
    return Path(t.path)


def register(sub: Any) -> None:
    for verb, kind, helptext, desc in (
        ("failover", "failover", "recover a group or domain from a point on this host", FAILOVER_HELP),
        ("test-failover", "test-failover", "rehearse a failover beside live replication", TEST_HELP),
    ):
        f = sub.add_parser(verb, help=helptext, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter)
        f.add_argument("name", metavar="GROUP|DOMAIN")
        f.add_argument("--target", required=True, metavar="T", help="the replica target (a local path on this host)")
        f.add_argument("--point", default="latest", metavar="ID", help="point id, or 'latest' (default)")
        f.add_argument("--network", metavar="NAME", help="remap NICs whose network/bridge is missing to this network")
        f.add_argument("--no-start", action="store_true", help="define the domains but do not start them")
        f.add_argument("--json", action="store_true", help="machine-readable result")
        if kind == "failover":
            f.add_argument("--force", action="store_true", help="recover although the originals are defined or running here")
            f.add_argument(
                "--rollback", action="store_true", help="undo an unfinished failover: remove its domains, overlays, journal"
            )
            f.set_defaults(func=cmd_failover, kind=kind, nics=None, suffix="-failover")
        else:
            f.add_argument("--suffix", default="-test", help="appended to each domain name (default -test)")
            f.add_argument("--nics", choices=("isolate", "remove"), default="isolate", help="isolated network (default) or none")
            f.set_defaults(func=cmd_failover, kind=kind, force=False, rollback=False)

    c = sub.add_parser(
        "test-cleanup",
        help="remove what test failovers created",
        description=CLEANUP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("name", metavar="GROUP|DOMAIN")
    c.add_argument("--target", required=True, metavar="T", help="the replica target (a local path on this host)")
    c.add_argument("--json", action="store_true", help="machine-readable result")
    c.set_defaults(func=cmd_cleanup)

    v = sub.add_parser(
        "reverse",
        help="protect failed-over domains back to the original site",
        description=REVERSE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("name", metavar="GROUP|DOMAIN")
    v.add_argument("--target", required=True, metavar="T", help="the replica target the failover used (local path)")
    v.add_argument("--to", required=True, metavar="TO", help="a target on the original site: /path or ssh://...")
    v.add_argument("--deadline", default="2000", metavar="MS", help="longest hold of a group's cut (default 2000)")
    v.add_argument("--json", action="store_true", help="machine-readable result")
    v.set_defaults(func=cmd_reverse)

    b = sub.add_parser(
        "failback",
        help="planned return to the original site",
        description=FAILBACK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("name", metavar="GROUP|DOMAIN")
    b.add_argument("--target", required=True, metavar="T", help="the replica target the failover used (local path)")
    b.add_argument("--to", required=True, metavar="TO", help="the reverse target on the original site: /path or ssh://...")
    b.add_argument("--home-uri", metavar="URI", help="libvirt of the original site for a local --to (default: the -c connection)")
    b.add_argument("--json", action="store_true", help="machine-readable result")
    b.set_defaults(func=cmd_failback)

    r = sub.add_parser(
        "recovery",
        help="list recovery runs (failed over, test failover) on a target",
        description="List the recovery runs recorded in a target's journals: kind, state, point, domains.",
    )
    r.add_argument("target", metavar="T")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_recovery)


REVERSE_HELP = """\
After 'failover', protect the failed-over domains back to the original site:
TO (a path or ssh:// target there) gets the set, seeded with the common point
(the point failed over from) from the old primary's surviving images, copied
locally on that site; an image is trusted only when its fold stamp names this
target, set and point. Then one cycle ships what changed since that point
(the recovery overlays' clusters): never a full copy when those images
survived. Images that cannot be trusted are seeded by shipping the point, and
the result says why. Later cycles: 'sync DOMAIN... --target TO --set GROUP'.
"""

FAILBACK_HELP = """\
Planned return after 'failover' and 'reverse': the recovered domains are
paused and stopped (no write can follow), what they wrote since the last
reverse point is shipped to TO as the final point, this target learns the
final point locally (so protection in the original direction resumes with
deltas), the failover run is retired, and the originals are defined again
(names, UUIDs and protection metadata kept) on new overlays over TO's final
point and started. TO is the reverse target: with ssh://HOST/PATH the
receiver on HOST starts the originals on HOST's libvirt; with a local path,
this command starts them on --home-uri (default the -c connection). Running
it again finishes an interrupted failback.
"""


def cmd_reverse(args: argparse.Namespace) -> int:
    from libvirt_cgrep.recovery.reverse import reverse

    root = _local_root(args.target)
    uri = args.connect or lv.default_uri()
    conn = lv.connect(uri)
    try:
        deadline = parse_count(args.deadline, "deadline (ms)", 10, 60_000)
        res = reverse(conn, uri, root, args.name, parse_target(args.to), deadline_ms=deadline)
    finally:
        conn.close()
    d = res.as_dict()
    if args.json:
        emit_json(d)
        return EXIT_OK
    print(
        f"{args.name} protected back to {res.to}: common point {res.common_point}"
        + (f" (seeded, {res.seed_bytes_shipped} bytes shipped)" if res.seeded else "")
        + f"; point {res.point_id}: {res.bytes_shipped} bytes shipped for {res.changed_bytes} changed (disks {res.disk_bytes})"
    )
    for why in res.seed_full:
        print(f"  seeded by shipping: {why}")
    return EXIT_OK


def cmd_failback(args: argparse.Namespace) -> int:
    from libvirt_cgrep.recovery.reverse import Home, failback

    to = parse_target(args.to)
    if to.host is not None and args.home_uri:
        raise UsageError("--home-uri is for a local --to: with ssh:// the original site's receiver starts the originals there")
    root = _local_root(args.target)
    uri = args.connect or lv.default_uri()
    conn = lv.connect(uri)
    home = None if to.host is not None else Home(lv.connect(args.home_uri or uri), args.home_uri or uri)
    try:
        res = failback(conn, uri, root, args.name, to, home=home)
    finally:
        conn.close()
        if home is not None:
            home.conn.close()
    if args.json:
        emit_json(res.as_dict())
        return EXIT_OK
    print(
        f"{args.name} failed back: final point {res.final_point} ({res.final_bytes_shipped} bytes shipped); "
        f"originals {', '.join(res.originals)} running; {res.seconds:.1f} s"
    )
    return EXIT_OK


def cmd_failover(args: argparse.Namespace) -> int:
    from libvirt_cgrep.recovery.failover import failover

    root = _local_root(args.target)
    uri = args.connect or lv.default_uri()
    conn = lv.connect(uri)
    if args.rollback:
        from libvirt_cgrep.recovery.failover import rollback

        try:
            notes = rollback(conn, root, args.name)
        finally:
            conn.close()
        print(f"failover of {args.name} rolled back")
        for n in notes:
            print(f"  note: {n}")
        return EXIT_OK
    try:
        res = failover(
            conn,
            uri,
            root,
            args.name,
            kind=args.kind,
            point=args.point,
            network=args.network,
            nics=args.nics,
            force=args.force,
            suffix=args.suffix if args.kind == "test-failover" else "-test",
            start=not args.no_start,
            progress=(lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr)),
        )
    finally:
        conn.close()
    if args.json:
        emit_json(res.as_dict())
        return EXIT_OK
    j = res.journal
    print(f"{j.kind} {j.run} of set {j.set_name} at point {j.point_id}: {j.state} in {res.seconds:.1f} s")
    for d in j.domains:
        print(f"  {d.original} -> {d.name} ({d.uuid}): {d.step}")
    for f in j.findings:
        print(f"  note: {f.text()}")
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    from libvirt_cgrep.recovery.failover import cleanup_tests

    root = _local_root(args.target)
    conn = lv.connect(args.connect or lv.default_uri())
    try:
        runs, notes = cleanup_tests(conn, root, args.name)
    finally:
        conn.close()
    if args.json:
        emit_json({"removed": runs, "notes": notes})
    else:
        for r in runs:
            print(f"removed test failover {r}")
        for n in notes:
            print(f"  note: {n}")
    return EXIT_OK


def cmd_recovery(args: argparse.Namespace) -> int:
    from libvirt_cgrep.recovery.journal import all_journals

    rows = [
        {
            "set": j.set_name,
            "run": j.run,
            "kind": j.kind,
            "state": j.state,
            "point": j.point_id,
            "domains": ",".join(d.name for d in j.domains),
            "updated": j.updated_utc,
        }
        for j in all_journals(_local_root(args.target))
    ]
    if args.json:
        emit_json(rows)
        return EXIT_OK
    print_table(
        rows,
        [("set", "SET"), ("run", "RUN"), ("kind", "KIND"), ("state", "STATE"), ("point", "POINT"), ("domains", "DOMAINS")],
    )
    return EXIT_OK
