"""``python -m libvirt_cgrep.server.serve [--read-only] PATH``: the local receiver a sync starts for a local target.

The same session as ``virt-cgrep receive PATH`` (``receiver.serve``), but
without the whole CLI's imports (libvirt, the agent, hooks, lab), which every
cycle to a local target would pay again: about half the receiver's start-up
CPU, and seconds of wall time on a loaded host. Errors: one line on stderr,
the exit code of ``errors.EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from libvirt_cgrep.errors import EXIT_OK, CgrepError, UsageError, exit_code_for
from libvirt_cgrep.replica.link import parse_target
from libvirt_cgrep.server.receiver import serve


def main(argv: Sequence[str] | None = None) -> int:
    """Run the session; the exit status of :func:`errors.exit_code_for` (0: a clean end, 1: a failure reported to the sender)."""
    p = argparse.ArgumentParser(prog="virt-cgrep receive")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("path")
    args = p.parse_args(argv)
    try:
        target = parse_target(args.path)
        if target.host:
            raise UsageError("receive takes a local path")
        # started by a sync on this host for a local target: it may name its own files (copyv)
        return serve(Path(target.path), sys.stdin.buffer, sys.stdout.buffer, readonly=args.read_only, local=True)
    except CgrepError as exc:
        print(f"virt-cgrep: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
