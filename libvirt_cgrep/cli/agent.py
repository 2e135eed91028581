"""``protect``, ``unprotect``, ``agent``, ``status``, ``history``: protection as a service."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import libvirt

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.cli.output import emit_json, print_table
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.core import rpo
from libvirt_cgrep.core.names import parse_count, validate_name
from libvirt_cgrep.errors import EXIT_OK, NotFoundError, UsageError
from libvirt_cgrep.replica.link import parse_target

AGENT_HELP = """\
Run the scheduler in the foreground (systemd: contrib/virt-cgrep-agent.service).
It protects every domain whose metadata carries a <protection> element (set
with 'virt-cgrep protect'), one group at a time per group name (a domain
without a group is its own group). Each group's next cycle ('virt-cgrep sync'
as a child process) starts early enough that the newest committed point never
gets older than the RPO. Alerts: rpo-violated / rpo-restored (paired) and
rpo-at-risk, to the log, a JSON-lines file and an optional command.

signals:
  SIGTERM, SIGINT  finish running cycles (up to stop_timeout), then stop; a cycle
                   still running is abandoned safely (its guardian resumes any
                   held guest; the target keeps only whole points)
  SIGHUP           reload the configuration and rescan the domains
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "protect",
        help="protect a domain: store its protection in the domain's metadata",
        description="Store protection settings in DOMAIN's metadata (live and persistent). "
        "The agent picks them up. Nothing is written when any value is invalid.",
    )
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--target", required=True, metavar="T", help="replica target: /path or ssh://[user@]host[:port]/path")
    p.add_argument(
        "--rpo", help="recovery point objective: 30s, 5m, 1h, 1d (continuous mode: of its snapshot fallback, default 5m)"
    )
    p.add_argument("--mode", choices=prot.MODES, default="snapshot", help="snapshot (default) or continuous (mirrors, RPO 0)")
    p.add_argument("--interval", default="1m", metavar="DUR", help="continuous mode: time between points (default 1m)")
    p.add_argument(
        "--replica-timeout", default="5s", metavar="DUR", help="continuous mode: longest guest write wait (default 5s)"
    )
    p.add_argument("--group", metavar="NAME", help="consistency group (default: the domain alone)")
    p.add_argument("--keep", default="24", metavar="N", help="keep the newest N points (default 24)")
    p.add_argument("--keep-hourly", default="0", metavar="N")
    p.add_argument("--keep-daily", default="0", metavar="N")
    p.add_argument("--fence", choices=prot.FENCES, default="none")
    p.add_argument("--app-consistent", action="store_true", help="quiesce through the guest agent (recorded; not yet used)")
    p.set_defaults(func=cmd_protect)

    u = sub.add_parser(
        "unprotect",
        help="remove a domain's protection",
        description="Remove our protection element from DOMAIN's metadata. Replicas stay on the target.",
    )
    u.add_argument("domain", metavar="DOMAIN")
    u.set_defaults(func=cmd_unprotect)

    a = sub.add_parser(
        "agent", help="run the RPO scheduler", description=AGENT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a.add_argument("--config", type=Path, help="TOML configuration (default /etc/libvirt-cgrep/agent.toml if present)")
    a.add_argument("--state-dir", type=Path, help="state directory (default $CGREP_STATE_DIR or /var/lib/libvirt-cgrep)")
    a.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics on ADDR (host:port; loopback by default)")
    a.add_argument("--concurrency", metavar="N", help="at most N cycles at once (default 2)")
    a.add_argument("--alerts-file", metavar="FILE", help="append alerts as JSON lines to FILE")
    a.add_argument("--only", action="append", metavar="GROUP", help="manage only these groups (repeatable; default: all)")
    a.set_defaults(func=cmd_agent)

    s = sub.add_parser(
        "status",
        help="RPO status of every protected group",
        description="One row per group (and its members): RPO, age of the newest point, last cycle, "
        "next cycle, failures, state (ok, at-risk, violated, paused, error), last error. Read from the "
        "agent's state database.",
    )
    s.add_argument("--state-dir", type=Path)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    h = sub.add_parser("history", help="recent cycles of a group", description="Recent cycles and alerts of GROUP.")
    h.add_argument("group", metavar="GROUP")
    h.add_argument("--limit", default="20", metavar="N")
    h.add_argument("--state-dir", type=Path)
    h.add_argument("--json", action="store_true", help="machine-readable output")
    h.set_defaults(func=cmd_history)


def cmd_protect(args: argparse.Namespace) -> int:
    name = validate_name(args.domain, "domain name")
    target = parse_target(args.target)
    if args.rpo is None and args.mode != "continuous":
        raise UsageError("--rpo is required (snapshot mode)")
    p = prot.Protection(
        target=str(target),
        rpo=rpo.parse_duration(args.rpo or "5m"),
        mode=args.mode,
        interval=rpo.parse_duration(args.interval, "--interval", 1, 86400),
        replica_timeout=rpo.parse_duration(args.replica_timeout, "--replica-timeout", 1, 600),
        group=validate_name(args.group, "group name") if args.group else None,
        keep=parse_count(args.keep, "--keep", 0, 100_000),
        keep_hourly=parse_count(args.keep_hourly, "--keep-hourly", 0, 100_000),
        keep_daily=parse_count(args.keep_daily, "--keep-daily", 0, 100_000),
        fence=args.fence,
        app_consistent=args.app_consistent,
    )
    dom = lv.lookup(lv.connect(args.connect), name)
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    lv.call(
        f"writing metadata of {name!r}",
        dom.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        p.to_xml(),
        prot.PREFIX,
        prot.NS,
        flags,
    )
    mode = f", continuous (a point every {rpo.format_duration(p.interval)})" if p.mode == "continuous" else ""
    print(
        f"{name} protected: target {p.target}, RPO {rpo.format_duration(p.rpo)}{mode}" + (f", group {p.group}" if p.group else "")
    )
    return EXIT_OK


def cmd_unprotect(args: argparse.Namespace) -> int:
    name = validate_name(args.domain, "domain name")
    dom = lv.lookup(lv.connect(args.connect), name)
    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, prot.NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            raise NotFoundError(f"{name} is not protected") from exc
        raise lv.translate(exc, "reading metadata") from exc
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    lv.call(f"removing metadata of {name!r}", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, prot.NS, flags)
    print(f"{name} is no longer protected (its points stay on the target)")
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from libvirt_cgrep.agent import config
    from libvirt_cgrep.agent.alerts import AlertSink
    from libvirt_cgrep.agent.db import StateDB, db_path
    from libvirt_cgrep.agent.scheduler import Agent

    path = args.config or config.DEFAULT_PATH
    overrides = {
        "uri": args.connect,
        "metrics": args.metrics,
        "concurrency": parse_count(args.concurrency, "--concurrency", 1, 64) if args.concurrency else None,
        "alerts_file": args.alerts_file,
        "state_dir": str(args.state_dir) if args.state_dir else None,
        "only": tuple(validate_name(g, "group name") for g in args.only) if args.only else None,
    }

    def load() -> tuple[config.AgentConfig, AlertSink]:
        cfg = config.load(path, overrides)
        return cfg, AlertSink(cfg.alerts_file, cfg.alert_command)

    cfg, sink = load()
    logging.getLogger("libvirt_cgrep").setLevel(cfg.log_level.upper())
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(cfg.log_level.upper())
    db = StateDB(db_path(Path(cfg.state_dir) if cfg.state_dir else None))
    try:
        return Agent(cfg, db, sink, reload=load).run()
    finally:
        db.close()


def _open_db(args: argparse.Namespace) -> Any:
    from libvirt_cgrep.agent.db import StateDB, db_path

    return StateDB(db_path(args.state_dir), readonly=True)


def cmd_status(args: argparse.Namespace) -> int:
    from libvirt_cgrep.agent.continuous import read_sidecar
    from libvirt_cgrep.agent.db import state_dir

    db = _open_db(args)
    cont = read_sidecar(args.state_dir or state_dir())
    now = time.time()
    rows = []
    for g in db.groups():
        age = None if g.newest_time is None else round(now - g.newest_time, 1)
        c = cont.get(g.name, {})
        rows.append(
            {
                "group": g.name,
                "mode": c.get("mode", "snapshot"),
                "mirror": c.get("mirror"),
                "last_cut_ms": c.get("last_cut_ms"),
                "members": list(g.members),
                "target": g.target,
                "rpo": g.rpo,
                "state": g.state,
                "newest_point": g.newest_point,
                "age": age,
                "last_duration": None if g.last_duration is None else round(g.last_duration, 2),
                "last_bytes": g.last_bytes,
                "next_in": None if g.next_run is None else round(g.next_run - now, 1),
                "failures": g.failures,
                "last_error": g.last_error,
                "agent_seen": round(now - g.updated, 1),
            }
        )
    db.close()
    if args.json:
        emit_json(rows)
        return EXIT_OK
    table = [
        {
            **r,
            "rpo": rpo.format_duration(r["rpo"]),
            "members": ",".join(r["members"]),
            "age": "-" if r["age"] is None else f"{r['age']}s",
            "next_in": "-" if r["next_in"] is None else f"{r['next_in']}s",
            "last_duration": "-" if r["last_duration"] is None else f"{r['last_duration']}s",
            "mode": r["mode"] if r["mirror"] is None else f"{r['mode']}/{r['mirror']}",
        }
        for r in rows
    ]
    print_table(
        table,
        [
            ("group", "GROUP"),
            ("members", "MEMBERS"),
            ("rpo", "RPO"),
            ("mode", "MODE"),
            ("age", "AGE"),
            ("state", "STATE"),
            ("last_duration", "LAST CYCLE"),
            ("last_bytes", "BYTES"),
            ("next_in", "NEXT"),
            ("failures", "FAILS"),
            ("last_error", "LAST ERROR"),
        ],
    )
    if rows and max(r["agent_seen"] for r in rows) > 30:
        print("note: the agent has not updated this state for a while: is 'virt-cgrep agent' running?")
    return EXIT_OK


def fmt(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def cmd_history(args: argparse.Namespace) -> int:
    group = validate_name(args.group, "group name")
    limit = parse_count(args.limit, "--limit", 1, 10_000)
    db = _open_db(args)
    cycles = db.cycles(group, limit)
    alerts = db.alerts(group, limit)
    db.close()
    if not cycles and not alerts:
        raise NotFoundError(f"no history for group {group!r}")
    if args.json:
        emit_json({"group": group, "cycles": cycles, "alerts": alerts})
        return EXIT_OK
    print_table(
        [
            {
                **c,
                "started": fmt(c["started"]),
                "duration": f"{c['ended'] - c['started']:.2f}s",
                "ok": "ok" if c["ok"] else "FAILED",
            }
            for c in cycles
        ],
        [
            ("started", "STARTED (UTC)"),
            ("duration", "DURATION"),
            ("ok", "RESULT"),
            ("point_id", "POINT"),
            ("bytes", "BYTES"),
            ("error", "ERROR"),
        ],
    )
    if alerts:
        print()
        print_table(
            [{**a, "time": fmt(a["time"])} for a in alerts], [("time", "ALERT (UTC)"), ("kind", "KIND"), ("message", "MESSAGE")]
        )
    return EXIT_OK
