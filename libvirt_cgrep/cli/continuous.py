"""``virt-cgrep continuous``: run continuous mode for DOMAIN(s) in the foreground (the agent runs it as a child)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from libvirt_cgrep.core.names import parse_count
from libvirt_cgrep.core.rpo import parse_duration
from libvirt_cgrep.errors import EXIT_OK

HELP = """\
Mirror every disk of DOMAIN(s) into a replica-side qemu-storage-daemon
(virDomainBlockCopy with synchronous writes: a guest write completes only
once it is on the replica too), wait until every mirror is READY, then take
a recovery point every --interval on the replica: ONE transaction across
every disk of the set there; the guest is never paused. Points land in the
same replica format as 'sync' (points, verify, retention).

The first point after the mirrors start is a full copy (the mirror copies
the whole disk into a fresh image, reported by 'progress' events: bytes
copied of bytes to copy, every second until 'in-sync'; no point is taken
before; a restart from a final point copies only what changed, below);
later points are deltas.

When every domain stops (within 30 s of each other) and each disk's
content digest equals the replica's, the run commits a final point, adds
an empty overlay to each disk through libvirt, emits 'stopped' and exits
0; the next run, once the domains run again, copies only what the guests
wrote since they booted ('syncing' says 'resume', or why not:
'full_copy_reason').

Faults end the run with exit 66 after a 'degraded' event: a mirror that
fails (replica killed, link cut, a domain stopped out of sync), libvirtd's connection
closing (without job events no point may be committed), or a replica that does
not answer within --replica-timeout (the link is then broken on purpose, so
guest writes never block longer). The agent then falls back to snapshot
mode and returns to continuous mode by itself.

targets: /path (a local daemon) or ssh://[user@]host[:port]/path (the
daemon runs there; NBD goes through an OpenSSH unix-socket forwarding,
strict host keys, no new open port).
"""


def register(sub: Any) -> None:
    c = sub.add_parser(
        "continuous",
        help="continuous mode: mirrors to a replica-side daemon, points cut there",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("domains", nargs="+", metavar="DOMAIN")
    c.add_argument("--target", required=True, metavar="T", help="replica target: /path or ssh://[user@]host[:port]/path")
    c.add_argument("--set", metavar="NAME", help="name of the set on the target (default: the domain's name)")
    c.add_argument("--interval", default="1m", metavar="DUR", help="time between recovery points (default 1m)")
    c.add_argument("--count", metavar="N", help="stop after N points (default: run until stopped)")
    c.add_argument(
        "--replica-timeout", default="5s", metavar="DUR", help="longest a guest write may wait for the replica (default 5s)"
    )
    c.add_argument(
        "--writethrough", action="store_true", help="write-through export: every mirrored write is flushed on the replica"
    )
    c.add_argument("--keep", metavar="N", help="keep the newest N points (older ones are merged away)")
    c.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    c.set_defaults(func=cmd_continuous)


def cmd_continuous(args: argparse.Namespace) -> int:
    from libvirt_cgrep.adapters import libvirt as lv
    from libvirt_cgrep.continuous.session import Options, Session
    from libvirt_cgrep.core.retention import Policy
    from libvirt_cgrep.replica.link import parse_target

    target = parse_target(args.target)
    opts = Options(
        interval=float(parse_duration(args.interval, "--interval", 1, 86400)),
        count=parse_count(args.count, "--count", 1, 1_000_000) if args.count else None,
        replica_timeout=float(parse_duration(args.replica_timeout, "--replica-timeout", 1, 600)),
        writethrough=args.writethrough,
        policy=Policy(keep_last=parse_count(args.keep, "--keep", 1, 100_000)) if args.keep else None,
    )

    def emit(ev: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(ev, separators=(",", ":")), flush=True)
        elif ev["event"] == "point":
            print(f"point {ev['point_id']} committed (cut {ev['cut_ms']:.1f} ms)", flush=True)
        else:
            print(f"{ev['event']}: " + ", ".join(f"{k}={v}" for k, v in ev.items() if k != "event"), file=sys.stderr, flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: stop.set())
    lv.start_event_loop()
    uri = args.connect or lv.default_uri()
    conn = lv.connect(uri)
    try:
        Session(conn, uri, args.domains, target, set_name=args.set, opts=opts, emit=emit).run(stop)
    finally:
        conn.close()
    return EXIT_OK
