"""The ``virt-cgrep`` command: parse, dispatch, report errors. The only place that exits."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable, Sequence

from libvirt_cgrep import __version__
from libvirt_cgrep.errors import EXIT_CODES, EXIT_OK, CgrepError, UsageError, exit_code_for

Handler = Callable[[argparse.Namespace], int]

PROG = "virt-cgrep"

DESCRIPTION = """\
Write-order-consistent replication of multi-disk libvirt/QEMU virtual machines.

A recovery point is one consistent cut across every disk of a VM: if the
guest issued write B after write A was acknowledged, any point holding B
also holds A. virt-cgrep takes such cuts through libvirt (one atomic,
disk-only snapshot per domain, which QEMU runs as ONE transaction), and
never changes a domain's backing chain behind libvirt's back.
"""

EPILOG = """\
verbs:
  point DOMAIN...         take a write-order-consistent point: one transaction per domain
                          (several domains or --group G: one group point, --fence suspend)
  chain DOMAIN            show each disk's backing chain and whether it can be protected
                          (bare QEMU: chain --backend qmp --qmp SOCKET)
  sync DOMAIN... --target T   one cycle: cut, ship changed clusters, commit atomically, fold, prune
  points T                list the committed recovery points on a target
  verify T                re-check checksums and chains (--write-order: the lab checker)
  receive PATH            the replica side of a stream (run by sync, locally or over ssh)
  continuous DOMAIN... --target T --interval 1m   RPO 0: mirrors to a replica-side daemon, points cut there
  protect DOMAIN --target T --rpo 5m   store protection in the domain's metadata
  protect A B --group G --target T --rpo 5m   protect several domains as ONE group (one cut, one RPO)
  unprotect DOMAIN        remove it (and take it out of its group)
  agent                   the RPO scheduler (long-running; see 'virt-cgrep agent --help')
  status                  RPO state of every protected group (ok, at-risk, violated, paused, error)
  history GROUP           recent cycles and alerts of a group
  hooks install|uninstall|status   the libvirt qemu hook that tells the agent about starts/stops
  failover GROUP|DOMAIN --target T   define and start a point's domains on new overlays (replica host)
  test-failover GROUP --target T     the same as NAME-test on an isolated network, beside live replication
  test-cleanup GROUP --target T      remove exactly what test failovers created
  reverse GROUP --target T --to T2   protect failed-over domains back, seeded from the old primary's images
  failback GROUP --target T --to T2  planned return: final point, originals back, protection resumes
  recovery T              list the recovery runs journaled on a target
  lab build               build the lab guest (kernel, busybox initramfs, workload)
  lab up NAME             define and start a lab domain with N data disks
  lab up --group G --vms V   V lab domains G-0..G-(V-1) whose dependent-write chain spans them (host relay)
  lab down NAME           destroy a lab domain and remove its files
  lab list                list lab domains
  lab status NAME         show a lab domain's last acknowledged record
  lab check IMAGE...      check that images form one write-order-consistent cut (--domain NAME, --group G)
  version                 print the version

  Run 'virt-cgrep VERB --help' (e.g. 'virt-cgrep lab up --help') for a verb's options.
  Every read verb takes --json for machine-readable output on stdout.

guest pauses:
  Only --fence suspend pauses guests (point, sync, and every group: a
  group's points always use it): from the pause to the resume, about as long
  as libvirt's snapshot call (~50-150 ms for 2-8 disks under TCG; a group of
  2-3 VMs ~1.1-1.5x that, all members at once, see docs/operations-hold.md),
  never longer than --deadline (a guardian process resumes them).
  --fence none (the default for one domain) never pauses: QEMU drains the
  disks for the few ms of the transaction. A pause-free group cut comes with
  the continuous mode. The lab's checks only read images.

exit status:
{exit_table}

environment:
  LIBVIRT_DEFAULT_URI     connection URI when -c is not given (default qemu:///system)
  CGREP_LAB_DIR           lab domains' files (default /var/lib/libvirt-cgrep/lab)
  CGREP_LAB_CACHE         lab guest build cache (default /var/cache/libvirt-cgrep/lab)
  CGREP_STATE_DIR         agent state (default /var/lib/libvirt-cgrep)
  CGREP_SSH_CONFIG        ssh_config file for ssh:// targets (ssh -F)
  CGREP_REMOTE_CMD        the receiver command on ssh:// targets (default virt-cgrep)
  CGREP_RUN_DIR           continuous mode: where NBD sockets live (default the temp dir; QEMU's user must reach it)
  CGREP_CONTINUOUS_RETRY_S  agent: seconds before a degraded continuous mode is retried (default 30)

files:
  /var/lib/libvirt-cgrep/lab/NAME/     a lab domain's disks and console.log
  /var/cache/libvirt-cgrep/lab/        vmlinuz, initrd.img and their input stamp
  /var/lib/libvirt-cgrep/agent.db      the agent's state (SQLite, WAL)
  /etc/libvirt-cgrep/agent.toml        the agent's configuration

examples:
  virt-cgrep point db1 --json
  virt-cgrep point db1 --fence suspend --deadline 500 --disks vda,vdb
  virt-cgrep protect db1 web1 --group app1 --target ssh://dr/srv/replica --rpo 5m
  virt-cgrep sync --group app1 --target /srv/replica --fence suspend
  virt-cgrep chain db1
  virt-cgrep lab build
  virt-cgrep lab up db1 --disks 4 --size 64M
  virt-cgrep lab status db1 --json
  virt-cgrep lab check --domain db1
  virt-cgrep lab check /var/lib/libvirt-cgrep/lab/db1/vd?.qcow2
  virt-cgrep lab down db1
  virt-cgrep test-failover app1 --target /srv/replica && virt-cgrep test-cleanup app1 --target /srv/replica
"""

_EXIT_MEANING = {
    0: "success",
    1: "lab check: the images are NOT a consistent cut (a hole or a bad record)",
    2: "lab check: the images could not be read",
    64: "usage: a bad argument (name, size, count, option); nothing was changed",
    65: "not found: unknown domain, image or file",
    66: "wrong state: e.g. the domain is not running, or not a lab domain's",
    67: "conflict: already exists, or held by another writer",
    68: "unavailable: libvirtd, QEMU or a needed tool cannot be reached",
    69: "a libvirt operation failed",
    70: "internal error (a bug: please report it)",
    71: "an external command failed (qemu-img, apt-get, gcc, ...)",
    72: "building the lab guest failed",
    73: "fence: a hold passed its deadline; the guardian resumed the guests",
    74: "cut: the transaction failed; every guest runs on its old chain, nothing lost",
    75: "QMP: a command failed, timed out or lost its connection",
    76: "a manifest or record read from a replica is malformed or unsafe; nothing was changed",
    130: "interrupted",
}


def _exit_table() -> str:
    codes = sorted({*EXIT_CODES.values(), 0, 130})
    return "\n".join(f"  {c:<3}  {_EXIT_MEANING.get(c, '')}" for c in codes)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from libvirt_cgrep.cli import agent, continuous, engine, hooks, lab, recovery, replica

    p = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG.format(exit_table=_exit_table()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c", "--connect", metavar="URI", help="libvirt connection URI (default: $LIBVIRT_DEFAULT_URI or qemu:///system)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress on stderr (-vv: debug)")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    v = sub.add_parser("version", help="print the version", description="Print the version of virt-cgrep.")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_version)

    engine.register(sub)
    replica.register(sub)
    continuous.register(sub)
    agent.register(sub)
    hooks.register(sub)
    recovery.register(sub)
    lab.register(sub)
    return p


def _version(args: argparse.Namespace) -> int:
    from libvirt_cgrep.cli.output import emit_json

    if args.json:
        emit_json({"version": __version__})
    else:
        print(f"{PROG} {__version__}")
    return EXIT_OK


def wrap(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the verb; return the exit status (never exits)."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.WARNING - 10 * min(int(args.verbose), 2),
            format=f"{PROG}: %(message)s",
            stream=sys.stderr,
        )
        func: Handler = args.func
        return func(args)
    except CgrepError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return exit_code_for(KeyboardInterrupt())
    except BrokenPipeError:
        return EXIT_OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
