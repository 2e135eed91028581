"""Entry point of the guardian process (``python -m libvirt_cgrep.cli.guardian``); see engine.guardian."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from libvirt_cgrep.engine.guardian import serve
from libvirt_cgrep.errors import exit_code_for


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="virt-cgrep-guardian")
    p.add_argument("--deadline-ms", type=float, required=True)
    p.add_argument("specs", nargs="+")
    args = p.parse_args(argv)

    def out(word: str) -> None:
        sys.stdout.write(word + "\n")
        sys.stdout.flush()

    try:
        return serve(args.specs, args.deadline_ms, sys.stdin.fileno(), out)
    except Exception as exc:
        # Before "ready" (a guest it cannot reach): the parent shows this line and holds nothing.
        sys.stderr.write(f"guardian: {exc}\n")
        return exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
