"""``protect``, ``unprotect``, ``agent``, ``status``, ``history``: protection as a service."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.cli.output import emit_json, print_table
from libvirt_cgrep.core import protection as prot
from libvirt_cgrep.core import rpo
from libvirt_cgrep.core.names import parse_count, validate_name
from libvirt_cgrep.engine import protection
from libvirt_cgrep.errors import EXIT_OK, NotFoundError, UsageError
from libvirt_cgrep.replica.link import parse_target

AGENT_HELP = """\
Run the scheduler in the foreground (systemd: contrib/virt-cgrep-agent.service).
It protects every domain whose metadata carries a <protection> element (set
with 'virt-cgrep protect'), one group at a time per group name (a domain
without a group is its own group). Each group's next cycle ('virt-cgrep sync'
as a child process) starts early enough that the newest committed point never
gets older than the RPO. A group ('protect A B --group G') is one unit: one
cycle cuts every member under one suspend fence (each member is paused for
about one snapshot call) and commits one point for all of them; a member that
is shut off, paused or missing fails the cycle (no partial group point) until
it runs again or is taken out with 'virt-cgrep unprotect'. Alerts:
rpo-violated / rpo-restored (paired), rpo-at-risk, group-blocked /
group-unblocked (paired), to the log, a JSON-lines file and an optional command.

signals:
  SIGTERM, SIGINT  finish running cycles (up to stop_timeout), then stop; a cycle
                   still running is abandoned safely (its guardian resumes any
                   held guest; the target keeps only whole points)
  SIGHUP           reload the configuration and rescan the domains
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "protect",
        help="protect domains: store their protection in the domains' metadata",
        description="Store protection settings in each DOMAIN's metadata (live and persistent). "
        "The agent picks them up. Several domains form one consistency group (--group NAME): the agent "
        "cuts them as one unit (--fence suspend pauses them all for the cut) with one RPO, and a member "
        "that is shut off or missing blocks the group until it runs again or is unprotected. "
        "Nothing is written when any value is invalid.",
    )
    p.add_argument("domains", nargs="+", metavar="DOMAIN")
    p.add_argument("--target", required=True, metavar="T", help="replica target: /path or ssh://[user@]host[:port]/path")
    p.add_argument(
        "--rpo", help="recovery point objective: 30s, 5m, 1h, 1d (continuous mode: of its snapshot fallback, default 5m)"
    )
    p.add_argument("--mode", choices=prot.MODES, default="snapshot", help="snapshot (default) or continuous (mirrors, RPO 0)")
    p.add_argument("--interval", default="1m", metavar="DUR", help="continuous mode: time between points (default 1m)")
    p.add_argument(
        "--replica-timeout", default="5s", metavar="DUR", help="continuous mode: longest guest write wait (default 5s)"
    )
    p.add_argument("--group", metavar="NAME", help="consistency group; added to its members (default: the domain alone)")
    p.add_argument("--keep", default="24", metavar="N", help="keep the newest N points (default 24)")
    p.add_argument("--keep-hourly", default="0", metavar="N")
    p.add_argument("--keep-daily", default="0", metavar="N")
    p.add_argument("--fence", choices=prot.FENCES, default=None, help="none, or suspend (default: suspend for a group)")
    p.add_argument("--app-consistent", action="store_true", help="quiesce through the guest agent (recorded; not yet used)")
    p.set_defaults(func=cmd_protect)

    u = sub.add_parser(
        "unprotect",
        help="remove domains' protection (and their group membership)",
        description="Remove our protection element from each DOMAIN's metadata and the domain from its group: "
        "the group's other members are cut without it from then on. A member whose domain no longer exists "
        "is removed from its group by name. Replicas stay on the target.",
    )
    u.add_argument("domains", nargs="+", metavar="DOMAIN")
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
    names = [validate_name(d, "domain name") for d in args.domains]
    if len(set(names)) != len(names):
        raise UsageError("a domain is named twice")
    group = validate_name(args.group, "group name") if args.group else None
    if len(names) > 1 and group is None:
        raise UsageError("several domains are protected as one consistency group: give --group NAME")
    target = parse_target(args.target)
    if args.rpo is None and args.mode != "continuous":
        raise UsageError("--rpo is required (snapshot mode)")
    p = prot.Protection(
        target=str(target),
        rpo=rpo.parse_duration(args.rpo or "5m"),
        mode=args.mode,
        interval=rpo.parse_duration(args.interval, "--interval", 1, 86400),
        replica_timeout=rpo.parse_duration(args.replica_timeout, "--replica-timeout", 1, 600),
        group=group,
        keep=parse_count(args.keep, "--keep", 0, 100_000),
        keep_hourly=parse_count(args.keep_hourly, "--keep-hourly", 0, 100_000),
        keep_daily=parse_count(args.keep_daily, "--keep-daily", 0, 100_000),
        fence=args.fence or ("suspend" if group else "none"),
        app_consistent=args.app_consistent,
    )
    if group and p.fence != "suspend":
        raise UsageError("a group is one consistent cut only while all its members are held: use --fence suspend")
    members = protection.protect(lv.connect(args.connect), names, p)
    mode = f", continuous (a point every {rpo.format_duration(p.interval)})" if p.mode == "continuous" else ""
    what = f"target {p.target}, RPO {rpo.format_duration(p.rpo)}{mode}" + (
        f", group {group} ({', '.join(members)})" if group else ""
    )
    print(f"{', '.join(names)} protected: {what}")
    return EXIT_OK


def cmd_unprotect(args: argparse.Namespace) -> int:
    names = [validate_name(d, "domain name") for d in args.domains]

    def report(u: protection.Unprotected) -> None:
        rest = u.rest
        left = f" and left group {u.group}" + (f" ({', '.join(rest)} go on without it)" if rest else "") if u.group else ""
        state = "is no longer protected" if u.removed else "was not protected any more: removed from its group"
        print(f"{u.name} {state}{left} (its points stay on the target)")

    protection.unprotect(lv.connect(args.connect), names, report)
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


STATUS_COLUMNS = [
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
    ("recovery", "RECOVERY"),
    ("last_error", "LAST ERROR"),
]


def cmd_status(args: argparse.Namespace) -> int:
    from libvirt_cgrep.agent.continuous import read_sidecar
    from libvirt_cgrep.agent.db import state_dir
    from libvirt_cgrep.core import continuous as cc

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
                "resync_done": c.get("resync_done"),
                "resync_total": c.get("resync_total"),
                "write_ms": c.get("write_ms"),
                "resumed_from": c.get("resumed_from"),
                "copied_bytes": c.get("copied_bytes"),
                "members": list(g.members),
                "member_rows": [
                    {"domain": m, "state": st}
                    for m, st in zip(g.members, g.member_states or ("?",) * len(g.members), strict=True)
                ],
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
                "recovery": _recovery_state(g.target, g.name),
            }
        )
    db.close()
    if args.json:
        emit_json(rows)
        return EXIT_OK
    table: list[dict[str, Any]] = []
    for r in rows:
        table.append(
            {
                **r,
                "rpo": rpo.format_duration(r["rpo"]),
                "members": ",".join(r["members"]),
                "age": "-" if r["age"] is None else f"{r['age']}s",
                "next_in": "-" if r["next_in"] is None else f"{r['next_in']}s",
                "last_duration": "-" if r["last_duration"] is None else f"{r['last_duration']}s",
                "mode": cc.mode_label(r["mode"], r["mirror"], r["resync_done"], r["resync_total"]),
            }
        )
        if len(r["member_rows"]) > 1 or (r["member_rows"] and r["member_rows"][0]["domain"] != r["group"]):
            # a group's member rows, under its group row: each member's domain state
            blank = dict.fromkeys((k for k, _ in STATUS_COLUMNS), "")
            table += [{**blank, "group": f"  {m['domain']}", "state": m["state"]} for m in r["member_rows"]]
    print_table(table, STATUS_COLUMNS)
    if rows and max(r["agent_seen"] for r in rows) > 30:
        print("note: the agent has not updated this state for a while: is 'virt-cgrep agent' running?")
    return EXIT_OK


def _recovery_state(target: str | None, group: str) -> str | None:
    """``failed-over``/``test-failover`` (with the run) when the group's local target journals an unfinished run."""
    if not target or not target.startswith("/"):
        return None
    from libvirt_cgrep.core.names import validate_name
    from libvirt_cgrep.recovery.journal import journals

    try:
        runs = [j for j in journals(Path(target), validate_name(group, "group name")) if j.state != "done"]
    except Exception:
        return None
    words = {"failover": "failed-over", "test-failover": "test-failover", "failback": "failed-back"}
    return ", ".join(f"{words.get(j.kind, j.kind)} ({j.run})" for j in runs) or None


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
