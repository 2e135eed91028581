"""``virt-cgrep hooks ...``: the libvirt qemu hook that tells the agent about domain starts and stops."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from libvirt_cgrep import hooks
from libvirt_cgrep.cli.output import emit_json
from libvirt_cgrep.errors import EXIT_OK

RESTART_NOTE = (
    "reload or restart libvirtd so it notices the new hook (hooks are read at daemon start and on reload): "
    "'systemctl reload libvirtd' or SIGHUP keeps guests and connections; a restart keeps guests"
)


def register(sub: Any) -> None:
    """Add the ``hooks`` verb and its sub-verbs to the top-level parser."""
    h = sub.add_parser(
        "hooks",
        help="install, remove or inspect the libvirt qemu hook",
        description=(
            "The qemu hook (HOOKS_DIR/qemu.d/virt-cgrep) writes one small JSON file into the spool when a "
            "domain with protection metadata starts, stops, is released, reconnected or migrated, so the "
            "agent reacts at once instead of at its next rescan. It always exits 0, never calls libvirt, "
            "and leaves other domains alone."
        ),
    )
    hs = h.add_subparsers(dest="hooks_verb", metavar="HOOKSVERB")
    hs.required = True

    def common(p: argparse.ArgumentParser, spool: bool) -> None:
        p.add_argument(
            "--hooks-dir",
            type=Path,
            default=hooks.DEFAULT_HOOKS_DIR,
            metavar="DIR",
            help=f"libvirt's hooks directory (default {hooks.DEFAULT_HOOKS_DIR})",
        )
        if spool:
            p.add_argument(
                "--spool",
                type=Path,
                default=None,
                metavar="DIR",
                help=f"the spool the hook writes to (default {hooks.DEFAULT_SPOOL})",
            )
        p.add_argument("--json", action="store_true", help="machine-readable output")

    i = hs.add_parser(
        "install",
        help="install or update the hook and create the spool",
        description=(
            "Write the hook script (mode 0755, atomically) with the spool path baked in, create the spool "
            "(mode 0700, or fix its mode). Idempotent. libvirtd looks for hook scripts when it starts and "
            "when it reloads: after the first install, reload (SIGHUP) or restart libvirtd."
        ),
    )
    common(i, spool=True)
    i.set_defaults(func=cmd_install)

    u = hs.add_parser(
        "uninstall",
        help="remove the hook (the spool is kept)",
        description="Remove virt-cgrep's hook script; refuses to remove a file that is not ours. The spool is left.",
    )
    common(u, spool=False)
    u.set_defaults(func=cmd_uninstall)

    s = hs.add_parser(
        "status",
        help="show whether the hook is installed and current, and the spool's state",
        description=(
            "Show whether the hook is installed and identical to what 'hooks install' would write, whether "
            "the spool exists with mode 0700, and how many events wait in it. Without --spool, the spool is "
            "the one the installed script writes to."
        ),
    )
    common(s, spool=True)
    s.set_defaults(func=cmd_status)


def cmd_install(args: argparse.Namespace) -> int:
    res = hooks.install(args.hooks_dir, args.spool or hooks.DEFAULT_SPOOL)
    if args.json:
        emit_json(res.as_dict())
        return EXIT_OK
    if res.spool_created:
        print(f"created spool {res.spool} (mode 0700)")
    elif res.spool_mode_fixed is not None:
        print(f"changed spool {res.spool} mode from {res.spool_mode_fixed:04o} to 0700")
    if res.created:
        print(f"installed {res.script} (spool {res.spool})")
    elif res.changed:
        print(f"updated {res.script} (spool {res.spool})")
    else:
        print(f"{res.script} is up to date (spool {res.spool})")
    if res.needs_restart:
        print(RESTART_NOTE)
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace) -> int:
    res = hooks.uninstall(args.hooks_dir)
    if args.json:
        emit_json(res.as_dict())
    else:
        print(f"removed {res.script}" if res.removed else f"{res.script} was not installed")
    return EXIT_OK


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def cmd_status(args: argparse.Namespace) -> int:
    st = hooks.status(args.hooks_dir, args.spool)
    if args.json:
        emit_json(st.as_dict())
        return EXIT_OK
    mode = "-" if st.spool_mode is None else f"{st.spool_mode:04o}"
    print(f"hook:       {st.script}")
    print(f"installed:  {_yes(st.installed)}")
    print(
        f"up to date: {_yes(st.up_to_date)}" + ("" if st.up_to_date or not st.installed else " (run 'virt-cgrep hooks install')")
    )
    print(f"spool:      {st.spool}")
    print(f"spool ok:   {_yes(st.spool_ok)} (exists: {_yes(st.spool_exists)}, mode {mode})")
    print(f"pending:    {st.pending}")
    return EXIT_OK
