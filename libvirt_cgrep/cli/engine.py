"""``virt-cgrep point`` and ``virt-cgrep chain``: consistency points and chains."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.cli.output import emit_json, print_table
from libvirt_cgrep.core.names import parse_count, parse_targets, validate_name
from libvirt_cgrep.engine.backend import Backend
from libvirt_cgrep.errors import EXIT_OK, UsageError

POINT_HELP = """\
Take one write-order-consistent point of each DOMAIN: every selected disk of a
domain is cut by ONE QMP transaction (for libvirt domains: one atomic,
disk-only libvirt snapshot onto overlays created beforehand). The image that
held the disk until the cut ("frozen_image") then never changes again; the
guest writes on to the new overlay ("active_image").

fences:
  none      (default) the transaction's own drain is the hold: in-flight
            requests complete, new ones wait a few ms; the guest is NOT paused.
  suspend   the guests are PAUSED (libvirt suspend / QMP stop) for the cut and
            resumed right after; the pause lasts about as long as libvirt's
            snapshot call (~50-150 ms for 2-8 disks under TCG). A guardian
            process resumes them if the deadline passes or virt-cgrep dies.

On any failure every guest keeps running on its old chain, nothing is lost,
and the exit status says what failed.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "point",
        help="take a consistent point (one transaction per domain)",
        description=POINT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="libvirt domain(s); omit with --backend qmp")
    p.add_argument("--fence", choices=("none", "suspend"), default="none", help="how I/O is held (default none)")
    p.add_argument("--deadline", default="2000", metavar="MS", help="longest hold with --fence suspend, ms (default 2000)")
    p.add_argument("--disks", metavar="T,..", help="only these disk targets (default: every supported disk)")
    add_backend_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_point)

    c = sub.add_parser(
        "chain",
        help="show each disk's backing chain",
        description="Show the backing chain of each disk of DOMAIN (top first), and which disks can be protected. "
        "For a bare QEMU: --backend qmp --qmp SOCKET instead of DOMAIN.",
    )
    c.add_argument("domains", nargs="?", default=None, metavar="DOMAIN", help="libvirt domain; omit with --backend qmp")
    c.add_argument("--backend", choices=("libvirt", "qmp"), default="libvirt", help="libvirt domain, or bare QEMU by QMP socket")
    c.add_argument("--qmp", action="append", default=[], metavar="SOCKET", help="QMP socket of a bare QEMU (qmp backend)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_chain, guardian_qmp=[])


def add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group",
        metavar="NAME",
        help="every member of protection group NAME (set with 'protect --group'), instead of DOMAIN...",
    )
    p.add_argument("--backend", choices=("libvirt", "qmp"), default="libvirt", help="libvirt domain, or bare QEMU by QMP socket")
    p.add_argument("--qmp", action="append", default=[], metavar="SOCKET", help="QMP socket of a bare QEMU (qmp backend)")
    p.add_argument(
        "--guardian-qmp", action="append", default=[], metavar="SOCKET", help="a second QMP socket per QEMU, for the guardian"
    )


@contextlib.contextmanager
def backends_for(args: argparse.Namespace) -> Iterator[list[Backend]]:
    """Open one backend per guest named on the command line; close them afterwards."""
    out: list[Backend] = []
    group = getattr(args, "group", None)  # point and sync take --group; chain does not
    try:
        if args.backend == "qmp":
            if args.domains or group:
                raise UsageError("with --backend qmp, name the guests with --qmp SOCKET, not DOMAIN or --group")
            if not args.qmp:
                raise UsageError("--backend qmp needs --qmp SOCKET")
            if args.guardian_qmp and len(args.guardian_qmp) != len(args.qmp):
                raise UsageError("give one --guardian-qmp per --qmp")
            from libvirt_cgrep.engine.qmp_backend import QMPBackend

            guards = args.guardian_qmp or [None] * len(args.qmp)
            for sock, guard in zip(args.qmp, guards, strict=True):
                out.append(QMPBackend(sock, guardian_socket=guard))
        else:
            if args.qmp or args.guardian_qmp:
                raise UsageError("--qmp goes with --backend qmp")
            if group and args.domains:
                raise UsageError("give DOMAIN... or --group NAME, not both")
            if not args.domains and not group:
                raise UsageError("name at least one DOMAIN (or --group NAME)")
            uri = args.connect or lv.default_uri()
            if group:
                from libvirt_cgrep.engine.protection import group_members

                names = group_members(lv.connect(uri), validate_name(group, "group name"))
            else:
                names = [validate_name(d, "domain name") for d in args.domains]
            if len(set(names)) != len(names):
                raise UsageError("a domain is named twice")
            from libvirt_cgrep.engine.libvirt_backend import LibvirtBackend

            # One connection per domain: several guests are paused, cut and resumed in parallel.
            out.extend(LibvirtBackend(lv.connect(uri), n, uri) for n in names)
        yield out
    finally:
        for b in out:
            with contextlib.suppress(Exception):
                b.close()


def cmd_point(args: argparse.Namespace) -> int:
    from libvirt_cgrep.engine.point import take_point

    deadline = parse_count(args.deadline, "deadline (ms)", 10, 60_000)
    targets = parse_targets(args.disks) if args.disks else None
    with backends_for(args) as backends:
        result = take_point(backends, targets=targets, fence=args.fence, deadline_ms=deadline)
    if args.json:
        emit_json(result.as_dict())
        return EXIT_OK
    fence = "-" if result.fence_ms is None else f"{result.fence_ms:.1f} ms"
    print(f"point {result.point_id} at {result.time_utc}  fence {result.fence} (hold {fence})  cut {result.cut_ms:.1f} ms")
    rows = list(result.as_dict()["disks"])  # type: ignore[call-overload]
    print_table(rows, [("domain", "DOMAIN"), ("target", "DISK"), ("frozen_image", "FROZEN"), ("active_image", "ACTIVE")])
    return EXIT_OK


def cmd_chain(args: argparse.Namespace) -> int:
    args.domains = [] if args.domains is None else [args.domains]
    if len(args.qmp) > 1:
        raise UsageError("chain shows one guest: give one --qmp SOCKET")
    with backends_for(args) as backends:
        guest = backends[0].discover()
    if args.json:
        emit_json({"domain": guest.name, "state": guest.state, "disks": [d.as_dict() for d in guest.disks]})
        return EXIT_OK
    rows = [
        {
            "target": d.target,
            "depth": len(d.chain),
            "ok": "yes" if d.supported else f"no: {d.reason}",
            "chain": " <- ".join(d.chain) or "-",
        }
        for d in guest.disks
    ]
    print_table(rows, [("target", "DISK"), ("ok", "PROTECTABLE"), ("depth", "DEPTH"), ("chain", "CHAIN (top first)")])
    return EXIT_OK
