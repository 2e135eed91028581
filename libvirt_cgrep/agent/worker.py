"""The agent's children: ``virt-cgrep`` verbs (sync, points) run in processes tied to the agent's life.

Guarantees:

- a child is killed (SIGKILL) as soon as its parent dies, SIGKILL included
  (``PR_SET_PDEATHSIG``, checked against a parent that died before it was
  set): a killed agent leaves no ``sync`` behind holding a target's lock (the
  child's receiver sees its link close and exits). A child killed inside a
  hold leaves its guests to its guardian, which resumes them: the guardian
  runs in its own session and is started with fork + exec, which clears the
  parent-death signal, so it outlives the child;
- by default children are forked from a ``multiprocessing`` forkserver that
  imported the CLI once (``fork`` mode): a cycle does not pay the
  interpreter's start-up and imports (about 0.3 s of CPU, 1-2 s of wall time
  on a loaded host). The forkserver exits when the agent dies, and its
  children with it. ``exec`` mode (``CGREP_AGENT_CHILDREN=exec``) starts
  ``python -m libvirt_cgrep`` instead, with the same parent-death signal;
- a child's stdout and stderr are returned whole after it exits (memory
  files in the child: no pipe to fill, whatever it prints).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

#: ``fork`` (default: pre-imported forkserver) or ``exec`` (a new interpreter per child).
MODE_ENV = "CGREP_AGENT_CHILDREN"
PR_SET_PDEATHSIG = 1
#: What the forkserver imports once for all its children.
PRELOAD = (
    "libvirt_cgrep.agent.worker",
    "libvirt_cgrep.cli",
    "libvirt_cgrep.cli.agent",
    "libvirt_cgrep.cli.engine",
    "libvirt_cgrep.cli.hooks",
    "libvirt_cgrep.cli.lab",
    "libvirt_cgrep.cli.replica",
    "libvirt_cgrep.engine.libvirt_backend",
    "libvirt_cgrep.engine.sync",
    "libvirt_cgrep.replica.receiver",
)
EXIT_INTERNAL = 70
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: a child only calls into it


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies; exit now if it already has.

    (The kernel means the parent *thread*: a parent must start children from threads that outlive them.)
    """
    parent = os.getppid()
    if _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:  # the parent died before the signal was armed: no one would send it
        os._exit(EXIT_INTERNAL)


class Child(Protocol):
    """A running child, as the agent tracks it (to signal it when stopping)."""

    pid: int

    def send_signal(self, sig: int) -> None: ...


class _Forked:
    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.pid: int = proc.pid

    def send_signal(self, sig: int) -> None:
        if self.proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _entry(target: Callable[..., Any], args: Sequence[Any], conn: Connection) -> None:
    """Runs in the forked child: arm the parent-death signal, capture fds 1 and 2, run, send (rc, out, err)."""
    set_pdeathsig()
    # Every forkserver child inherits the agent's end of the forkserver's "alive" pipe, which keeps the forkserver
    # (this child's parent) running while the child does: close it, so the forkserver exits when the agent dies.
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int):
        with contextlib.suppress(OSError):
            os.close(alive)
        setattr(server, "_forkserver_alive_fd", None)  # noqa: B010 - a private attribute, not typed
    out, err = os.memfd_create("stdout"), os.memfd_create("stderr")
    for stream, fd in ((sys.stdout, out), (sys.stderr, err)):
        with contextlib.suppress(Exception):
            stream.flush()
        os.dup2(fd, stream.fileno())
    try:
        rc = int(target(*args))
    except BaseException:  # the child's own crash is reported to the agent, as a bug
        traceback.print_exc()
        rc = EXIT_INTERNAL
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    conn.send((rc, _read(out), _read(err)))
    conn.close()
    sys.exit(rc)


def _cli(argv: Sequence[str]) -> int:
    from libvirt_cgrep.cli import run

    return run(list(argv))


class Runner:
    """Runs ``virt-cgrep ARGV`` (or, for tests, any module-level function) as a child; see the module's guarantees."""

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode or os.environ.get(MODE_ENV, "fork")
        if self.mode not in ("fork", "exec"):
            raise ValueError(f"{MODE_ENV} must be fork or exec, not {self.mode!r}")
        self.ctx: Any = None
        #: exec mode: the command ARGV is appended to
        self.exec_prefix = [sys.executable, "-m", "libvirt_cgrep"]
        self._live: set[Child] = set()
        self._lock = threading.Lock()
        if self.mode == "fork":
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(list(PRELOAD))

    def start_server(self) -> None:
        """Start the forkserver now (from the calling thread), so the first cycle does not wait for its imports."""
        if self.ctx is not None:
            from multiprocessing import forkserver

            forkserver.ensure_running()

    def live(self) -> list[Child]:
        """The children running now."""
        with self._lock:
            return list(self._live)

    def _track(self, child: Child, running: bool) -> None:
        with self._lock:
            if running:
                self._live.add(child)
            else:
                self._live.discard(child)

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of ``virt-cgrep ARGV``; killed after ``timeout`` s (status -9)."""
        if self.ctx is None:
            return self._exec(argv, timeout)
        return self.call(_cli, (list(argv),), timeout)

    def call(self, target: Callable[..., Any], args: Sequence[Any], timeout: float) -> tuple[int, str, str]:
        """Fork mode: run ``target(*args)`` in a child of the forkserver."""
        assert self.ctx is not None
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_entry, args=(target, list(args), send), daemon=True)
        proc.start()
        send.close()
        child = _Forked(proc)
        self._track(child, True)
        try:
            got: tuple[int, str, str] | None = None
            if recv.poll(timeout):
                with contextlib.suppress(EOFError, OSError):
                    got = recv.recv()
            if got is None and proc.exitcode is None:
                proc.join(1.0)  # it may be exiting (a crash before it could report)
                if proc.exitcode is None:
                    proc.kill()
            proc.join()
        finally:
            recv.close()
            self._track(child, False)
        if got is None:
            return int(proc.exitcode if proc.exitcode is not None else -9), "", f"the child died (status {proc.exitcode})"
        return got

    def _exec(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        proc = subprocess.Popen(
            [*self.exec_prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=set_pdeathsig,  # noqa: PLW1509 - only prctl and getppid run between fork and exec
        )
        self._track(proc, True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        finally:
            self._track(proc, False)
        return proc.returncode, out, err
