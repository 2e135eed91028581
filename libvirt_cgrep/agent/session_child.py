"""The agent's continuous-mode child: one continuous session for one group, in its own interpreter.

Guarantees:

- started by ``agent.continuous`` as ``python -c`` :data:`COMMAND` with a pickled :class:`SessionRequest` on
  stdin (no CLI, no argv to build): it runs ``continuous.session.Session`` directly;
- its events are JSON lines on stdout, flushed one by one; SIGTERM or SIGINT ends the session (mirrors aborted,
  the replica session ended) and the child exits 0;
- a failure is its error's one line on stderr (``virt-cgrep: error: MESSAGE``, the last line) and the exit status
  ``errors.exit_code_for`` of the error.
"""

from __future__ import annotations

import json
import logging
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.continuous.session import Options, Session
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.errors import EXIT_OK, CgrepError, exit_code_for
from libvirt_cgrep.replica.link import parse_target

PROG = "virt-cgrep"
#: the child's program (``python -c``); the request comes on its stdin
COMMAND = "from libvirt_cgrep.agent.session_child import main; main()"


@dataclass(frozen=True)
class SessionRequest:
    """One group's continuous session, as its protection asks for it."""

    uri: str
    members: tuple[str, ...]
    target: str
    set_name: str
    interval: float
    replica_timeout: float
    keep: int


def _emit(ev: dict[str, Any]) -> None:
    print(json.dumps(ev, separators=(",", ":")), flush=True)


def run(req: SessionRequest, stop: threading.Event) -> None:
    """Run the session until ``stop`` is set (or it ends by itself); our error on failure."""
    opts = Options(interval=req.interval, replica_timeout=req.replica_timeout, policy=Policy(keep_last=max(1, req.keep)))
    target = parse_target(req.target)
    lv.start_event_loop()
    conn = lv.connect(req.uri)
    try:
        Session(conn, req.uri, req.members, target, set_name=req.set_name, opts=opts, emit=_emit).run(stop)
    finally:
        lv.close(conn)


def main() -> None:
    """The child's entry point: read the request on stdin, run it, exit with its status."""
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s", stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: stop.set())
    status = EXIT_OK
    try:
        req: SessionRequest = pickle.load(sys.stdin.buffer)
        run(req, stop)
    except CgrepError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        status = exit_code_for(exc)
    sys.exit(status)
