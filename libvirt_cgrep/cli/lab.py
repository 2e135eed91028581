"""``virt-cgrep lab ...``: the lab guest, lab domains and the write-order checker."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.cli.output import emit_json, print_table
from libvirt_cgrep.core.names import format_size, parse_count, parse_size, validate_name
from libvirt_cgrep.errors import EXIT_OK, InconsistentError, UsageError


def register(sub: Any) -> None:
    """Add the ``lab`` verb and its sub-verbs to the top-level parser."""
    lab = sub.add_parser(
        "lab",
        help="lab guest, lab domains and the write-order checker",
        description=(
            "The lab proves write-order consistency: a tiny TCG guest writes a dependent-write chain "
            "of numbered 4 KiB records round-robin across all its data disks (O_DIRECT + fdatasync; "
            "record n+1 is issued only after record n is acknowledged), and 'lab check' says whether "
            "a set of images holds exactly the records {0..max} (the last ring's worth once the disks wrap)."
        ),
    )
    ls = lab.add_subparsers(dest="lab_verb", metavar="LABVERB")
    ls.required = True

    b = ls.add_parser(
        "build",
        help="build the lab guest (cached)",
        description=(
            "Build the lab guest from Debian packages only: the cloud kernel, busybox-static and the "
            "static C workload, packed into an initramfs. Skipped when the inputs are unchanged."
        ),
    )
    b.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    b.add_argument("--cache-dir", type=Path, help="build cache (default $CGREP_LAB_CACHE or /var/cache/libvirt-cgrep/lab)")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_build)

    u = ls.add_parser(
        "up",
        help="define and start a lab domain (or a group of them)",
        description=(
            "Define a persistent TCG libvirt domain NAME with N qcow2 data disks (vda, vdb, ...) and start "
            "the workload. Returns once the workload acknowledged its first record. On failure nothing is left behind. "
            "With --group G --vms V: define and start V domains G-0 .. G-{V-1} whose dependent-write chain spans "
            "the VMs (record n is written by G-{n mod V}, and only after a host-side relay saw record n-1 "
            "acknowledged on the previous VM's console); the relay runs detached until 'lab down G'. "
            "Returns once the chain ran across every VM."
        ),
    )
    u.add_argument("name", metavar="NAME", nargs="?", help="the domain (omit with --group)")
    u.add_argument("--group", metavar="G", help="start a lab group G of --vms VMs named G-0, G-1, ...")
    u.add_argument("--vms", default=None, help="number of VMs of the group, 2-16 (default 2; needs --group)")
    u.add_argument("--disks", default="2", help="number of data disks, 1-16 (default 2)")
    u.add_argument("--size", default="64M", help="size of each data disk, e.g. 64M or 1G (default 64M)")
    u.add_argument(
        "--mode",
        choices=("write", "scan", "idle"),
        default="write",
        help="workload mode: write the chain (default), scan the disks read-only, or idle",
    )
    u.add_argument("--rate", default="0", help="records per second, 0 = as fast as possible (default 0)")
    u.add_argument("--bs", default="4096", help="record size in bytes, a multiple of 4096 up to 1 MiB (default 4096)")
    u.add_argument("--no-wait", action="store_true", help="return once started, without waiting for the first record")
    u.add_argument("--json", action="store_true", help="machine-readable output")
    u.set_defaults(func=cmd_up)

    d = ls.add_parser(
        "down",
        help="destroy a lab domain (or group) and remove its files",
        description=(
            "Destroy (power off) the lab domain NAME, undefine it and remove its directory. Refuses domains without lab "
            "metadata. NAME may be a lab group or any member of one: the relay is stopped and every member removed."
        ),
    )
    d.add_argument("name", metavar="NAME")
    d.set_defaults(func=cmd_down)

    li = ls.add_parser("list", help="list lab domains", description="List the lab domains on the connection.")
    li.add_argument("--json", action="store_true", help="machine-readable output")
    li.set_defaults(func=cmd_list)

    s = ls.add_parser(
        "status",
        help="show a lab domain's (or group's) progress",
        description=(
            "Show a lab domain's state and the last record its workload acknowledged (read from its console log). "
            "For a lab group NAME: every member, and the relay (pid, next record, records relayed per second)."
        ),
    )
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    c = ls.add_parser(
        "check",
        help="check images for write-order consistency",
        description=(
            "Read the images (qcow2 with backing chains, or raw) through qemu-img -U, never writing or "
            "locking them, and check that the records across all of them are exactly {0..max} with valid "
            "checksums. Exit 0: consistent. Exit 1: a hole or a bad record (the first hole is printed). "
            "Exit 2: the images could not be read."
        ),
    )
    c.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    c.add_argument("--domain", metavar="NAME", help="check the images named by the domain's persistent definition")
    c.add_argument(
        "--group", metavar="G", help="check the images named by the persistent definitions of every member of lab group G"
    )
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_check)


def cmd_build(args: argparse.Namespace) -> int:
    from libvirt_cgrep.lab.build import build_guest

    def log(msg: str) -> None:
        if not args.json:
            print(f"lab build: {msg}", file=sys.stderr)

    art = build_guest(args.cache_dir, force=args.force, log=log)
    data = {
        "kernel": str(art.kernel),
        "initrd": str(art.initrd),
        "kernel_version": art.kernel_version,
        "stamp": art.stamp,
        "rebuilt": art.rebuilt,
    }
    if args.json:
        emit_json(data)
    else:
        print(f"{'built' if art.rebuilt else 'up to date'}: {art.kernel} {art.initrd} (kernel {art.kernel_version})")
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    from libvirt_cgrep.lab import domain
    from libvirt_cgrep.lab.build import build_guest

    if args.group is not None:
        if args.name is not None:
            raise UsageError("give either NAME or --group G, not both (the members are named G-0, G-1, ...)")
        name = validate_name(args.group, "group name")
        vms = parse_count(args.vms if args.vms is not None else "2", "VM count", 2, domain.MAX_GROUP_VMS)
        domain.member_names(name, vms)
    else:
        if args.name is None:
            raise UsageError("lab up: give NAME, or --group G --vms V")
        if args.vms is not None:
            raise UsageError("--vms needs --group")
        name = validate_name(args.name, "domain name")
        vms = 1
    disks = parse_count(args.disks, "disk count", 1, 16)
    size = parse_size(args.size, minimum=1 << 20, maximum=1 << 40)
    rate = parse_count(args.rate, "rate", 0, 1_000_000)
    bs = parse_count(args.bs, "record size", 4096, 1 << 20)
    if bs % 4096:
        raise UsageError(f"record size {bs} must be a multiple of 4096")
    if size < bs * disks:
        raise UsageError(f"disk size {format_size(size)} is too small for {bs}-byte records")
    if vms > 1 and rate:
        raise UsageError("--rate does not apply to a group: the relay sets the pace")
    conn = lv.connect(args.connect)
    art = build_guest(offline=True)
    if vms > 1:
        specs = domain.group_specs(
            name, vms, disks=disks, size=size, kernel=art.kernel, initrd=art.initrd, mode=args.mode, rate=rate, bs=bs
        )
        grp = domain.group_up(conn, name, specs, wait=not args.no_wait)
        if args.json:
            emit_json(grp.as_dict())
        else:
            relay = f"relay pid {grp.relay.pid}" if grp.relay.running else "no relay"
            done = grp.last_done if grp.last_done is not None else "-"
            print(
                f"lab group {grp.name}: {len(grp.members)} VMs ({', '.join(m.name for m in grp.members)}), "
                f"{disks} x {format_size(size)} disks each, {relay}, last done {done}"
            )
        return EXIT_OK
    spec = domain.LabSpec(
        name=name,
        disks=disks,
        size=size,
        kernel=art.kernel,
        initrd=art.initrd,
        directory=domain.lab_root() / name,
        mode=args.mode,
        rate=rate,
        bs=bs,
    )
    dom = domain.up(conn, spec, wait=not args.no_wait)
    if args.json:
        emit_json(dom.as_dict())
    else:
        ack = dom.last_ack.seq if dom.last_ack else "-"
        print(f"lab domain {dom.name} is {dom.state}: {dom.disks} x {format_size(dom.size)} disks, last ack {ack}")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from libvirt_cgrep.lab import domain

    conn = lv.connect(args.connect)
    group = _group_of(conn, args.name)
    if group is not None:
        removed = domain.group_down(conn, group)
        print(f"lab group {group} removed ({', '.join(removed) or 'no members left'})")
        return EXIT_OK
    domain.down(conn, args.name)
    print(f"lab domain {args.name} removed")
    return EXIT_OK


def _group_of(conn: Any, name: str) -> str | None:
    """The lab group that ``name`` names or belongs to, else None."""
    from libvirt_cgrep.errors import NotFoundError
    from libvirt_cgrep.lab import domain

    validate_name(name, "domain name")
    try:
        return domain.get(conn, name).group
    except NotFoundError:
        return name if domain.is_group(conn, name) else None


_COLUMNS = [
    ("name", "NAME"),
    ("state", "STATE"),
    ("disks", "DISKS"),
    ("size_h", "SIZE"),
    ("mode", "MODE"),
    ("last_ack", "LAST ACK"),
    ("group", "GROUP"),
]


def _rows(doms: Any) -> list[dict[str, object]]:
    return [{**d.as_dict(), "size_h": format_size(d.size)} for d in doms]


def cmd_list(args: argparse.Namespace) -> int:
    from libvirt_cgrep.lab import domain

    doms = domain.list_all(lv.connect(args.connect))
    if args.json:
        emit_json([d.as_dict() for d in doms])
    else:
        print_table(_rows(doms), _COLUMNS)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from libvirt_cgrep.errors import NotFoundError
    from libvirt_cgrep.lab import domain

    conn = lv.connect(args.connect)
    validate_name(args.name, "domain name")
    try:
        dom = domain.get(conn, args.name)
    except NotFoundError:
        if not domain.is_group(conn, args.name):
            raise
        grp = domain.get_group(conn, args.name)
        if args.json:
            emit_json(grp.as_dict())
            return EXIT_OK
        print_table(_rows(grp.members), [*_COLUMNS, ("last_done", "LAST DONE"), ("console_error", "ERROR")])
        r = grp.relay
        rate = f"{r.rate:.0f} records/s" if r.rate is not None else "-"
        state = f"running (pid {r.pid})" if r.running else "NOT running"
        print(f"relay: {state}, next record {r.next if r.next is not None else '-'}, {rate}")
        if grp.missing:
            print(f"missing members: {', '.join(grp.missing)}")
        return EXIT_OK
    if args.json:
        emit_json(dom.as_dict())
    else:
        print_table(_rows([dom]), [*_COLUMNS, ("lat_max_us", "LAT MAX us"), ("console_error", "ERROR")])
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from libvirt_cgrep.lab.check import check_images

    images: list[Path] = list(args.images)
    if sum(bool(x) for x in (images, args.domain, args.group)) > 1:
        raise UsageError("give one of IMAGE..., --domain NAME or --group G")
    if args.group:
        from libvirt_cgrep.lab import domain

        grp = domain.get_group(lv.connect(args.connect), validate_name(args.group, "group name"))
        if grp.missing:
            raise UsageError(f"lab group {grp.name!r} lacks members {', '.join(grp.missing)}: cannot check it whole")
        images = list(grp.images())
    if args.domain:
        validate_name(args.domain, "domain name")
        dom = lv.lookup(lv.connect(args.connect), args.domain)
        images = [Path(d.path) for d in lv.disks_from_xml(lv.persistent_xml(dom)) if d.path and d.device == "disk"]
    if not images:
        raise UsageError("lab check: give IMAGE..., --domain NAME or --group G")
    verdict = check_images(images)
    if args.json:
        emit_json({**verdict.as_dict(), "images": [str(p) for p in images]})
    elif verdict.consistent:
        print(
            f"consistent: records {verdict.window[0] if verdict.window else 0}..{verdict.max} all present "
            f"({verdict.count} records in {len(images)} images)"
        )
    if not verdict.consistent:
        detail = f"first hole at record {verdict.first_hole}" if verdict.first_hole is not None else "bad records"
        raise InconsistentError(
            f"NOT consistent: {verdict.holes} holes, {verdict.bad} bad records, max {verdict.max}, {detail}"
            + (f"; {verdict.problems[0]}" if verdict.problems else "")
        )
    return EXIT_OK
