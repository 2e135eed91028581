"""The agent's children: typed calls (``agent.tasks``: a cycle, a probe) run in processes tied to the agent's life.

Guarantees:

- a child is killed (SIGKILL) as soon as its parent dies, SIGKILL included
  (``PR_SET_PDEATHSIG``, checked against a parent that died before it was
  set): a killed agent leaves no ``sync`` behind holding a target's lock (the
  child's receiver sees its link close and exits). A child killed inside a
  hold leaves its guests to its guardian, which resumes them: the guardian
  runs in its own session and is started with fork + exec, which clears the
  parent-death signal, so it outlives the child;
- by default children are forked from a ``multiprocessing`` forkserver that
  imported the engine once (``fork`` mode): a cycle does not pay the
  interpreter's start-up and imports (about 0.3 s of CPU, 1-2 s of wall time
  on a loaded host). The forkserver exits when the agent dies, and its
  children with it. ``exec`` mode (``CGREP_AGENT_CHILDREN=exec``) starts a new
  interpreter per call instead (the call and its outcome pickled over its
  stdin and stdout), with the same parent-death signal;
- :meth:`Runner.invoke` returns an :class:`Outcome`: the function's value, or
  the class and message of the error it raised (any other exception is an
  InternalError); a child's exit status is ``errors.exit_code_for`` of its
  error;
- :meth:`Runner.call` (fork mode) returns a child's status, stdout and stderr
  whole after it exits (memory files in the child: no pipe to fill, whatever
  it prints); :meth:`Runner.run` runs ``virt-cgrep ARGV`` as a new process.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from typing import Any, Generic, Protocol, TypeVar

from libvirt_cgrep.errors import EXIT_OK, CgrepError, InternalError, exit_code_for

T = TypeVar("T")

#: ``fork`` (default: pre-imported forkserver) or ``exec`` (a new interpreter per child).
MODE_ENV = "CGREP_AGENT_CHILDREN"
PR_SET_PDEATHSIG = 1
#: What the forkserver imports once for all its children.
PRELOAD = (
    "libvirt_cgrep.agent.worker",
    "libvirt_cgrep.agent.tasks",
    "libvirt_cgrep.engine.libvirt_backend",
    "libvirt_cgrep.engine.sync",
    "libvirt_cgrep.replica.link",
    "libvirt_cgrep.server.receiver",
)
#: A child's status when it fails other than by our errors (a bug): ``exit_code_for`` of an InternalError.
EXIT_INTERNAL = exit_code_for(InternalError("child"))
#: exec mode: the interpreter that runs one pickled call (read on stdin; its outcome written on stdout)
EXEC_CALL = [sys.executable, "-c", "from libvirt_cgrep.agent.worker import serve_one; serve_one()"]
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


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What a typed call gave: its value, or its error's class and message (``status``: the child's exit status)."""

    value: T | None = None
    error: type[CgrepError] | None = None
    message: str = ""
    status: int = EXIT_OK

    @property
    def ok(self) -> bool:
        return self.error is None


#: An outcome as it crosses the process boundary: (value, error class, message, status).
_Wire = tuple[Any, type[CgrepError] | None, str, int]


def _outcome(target: Callable[..., Any], args: Sequence[Any]) -> _Wire:
    """Run ``target(*args)`` here; our errors come back as their class and message, anything else as an InternalError."""
    try:
        return target(*args), None, "", EXIT_OK
    except CgrepError as exc:
        return None, type(exc), str(exc), exit_code_for(exc)
    except BaseException as exc:  # the child's own crash is reported to the agent, as a bug
        traceback.print_exc()
        text = "".join(traceback.format_exception_only(exc)).strip().splitlines()
        return None, InternalError, (text[-1] if text else type(exc).__name__), exit_code_for(exc)


def _died(status: int | None) -> _Wire:
    code = int(status if status is not None else -signal.SIGKILL)
    return None, InternalError, f"the child died (status {status})", code


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


def _detach_forkserver() -> None:
    """Every forkserver child inherits the agent's end of the forkserver's "alive" pipe, which keeps the forkserver
    (this child's parent) running while the child does: close it, so the forkserver exits when the agent dies."""
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int):
        with contextlib.suppress(OSError):
            os.close(alive)
        setattr(server, "_forkserver_alive_fd", None)  # noqa: B010 - a private attribute, not typed


def _capture() -> tuple[int, int]:
    """Point fds 1 and 2 at memory files (returned)."""
    out, err = os.memfd_create("stdout"), os.memfd_create("stderr")
    for stream, fd in ((sys.stdout, out), (sys.stderr, err)):
        with contextlib.suppress(Exception):
            stream.flush()
        os.dup2(fd, stream.fileno())
    return out, err


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _entry(target: Callable[..., Any], args: Sequence[Any], conn: Connection) -> None:
    """Runs in the forked child: arm the parent-death signal, capture fds 1 and 2, run, send (rc, out, err)."""
    set_pdeathsig()
    _detach_forkserver()
    out, err = _capture()
    try:
        rc = int(target(*args))
    except BaseException as exc:  # the child's own crash is reported to the agent, as a bug
        traceback.print_exc()
        rc = exit_code_for(exc) if isinstance(exc, CgrepError) else EXIT_INTERNAL
    _flush()
    conn.send((rc, _read(out), _read(err)))
    conn.close()
    sys.exit(rc)


def _typed_entry(target: Callable[..., Any], args: Sequence[Any], conn: Connection) -> None:
    """Runs in the forked child: like :func:`_entry`, but sends the call's outcome (its output is dropped)."""
    set_pdeathsig()
    _detach_forkserver()
    _capture()
    wire = _outcome(target, args)
    _flush()
    conn.send(wire)
    conn.close()
    sys.exit(wire[3])


def serve_one() -> None:
    """exec mode, in the new interpreter: read one pickled (target, args) on stdin, write its outcome on stdout."""
    target, args = pickle.load(sys.stdin.buffer)
    result = os.dup(1)
    os.dup2(2, 1)  # whatever the call prints goes to stderr: stdout carries the outcome only
    wire = _outcome(target, args)
    _flush()
    with os.fdopen(result, "wb") as f:
        pickle.dump(wire, f)
    sys.exit(wire[3])


class Runner:
    """Runs typed calls (and, for tests and tools, ``virt-cgrep ARGV`` or any module-level function) as children."""

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode or os.environ.get(MODE_ENV, "fork")
        if self.mode not in ("fork", "exec"):
            raise ValueError(f"{MODE_ENV} must be fork or exec, not {self.mode!r}")
        self.ctx: Any = None
        #: :meth:`run`: the command ARGV is appended to
        self.exec_prefix = [sys.executable, "-m", "libvirt_cgrep"]
        self._live: set[Child] = set()
        self._lock = threading.Lock()
        if self.mode == "fork":
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(list(PRELOAD))

    def start_server(self) -> None:
        """Start the forkserver now (from the calling thread), so the first cycle does not wait for its imports."""
        if self.ctx is not None:
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

    def invoke(self, target: Callable[..., T], args: Sequence[Any], timeout: float) -> Outcome[T]:
        """``target(*args)`` in a child, killed after ``timeout`` s; its value or its error, as an :class:`Outcome`."""
        if self.ctx is None:
            wire = self._exec_call(target, args, timeout)
        else:
            wire = self._fork(_typed_entry, target, args, timeout) or _died(None)
        value, error, message, status = wire
        return Outcome(value, error, message, status)

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of ``virt-cgrep ARGV`` in a new process; killed after ``timeout`` s (status -9)."""
        return self._exec(argv, timeout)

    def call(self, target: Callable[..., Any], args: Sequence[Any], timeout: float) -> tuple[int, str, str]:
        """Fork mode: run ``target(*args)`` (returning its exit status) in a child of the forkserver."""
        got = self._fork(_entry, target, args, timeout)
        if isinstance(got, int) or got is None:
            return (-9 if got is None else got), "", f"the child died (status {got})"
        rc, out, err = got
        return int(rc), str(out), str(err)

    def _fork(self, entry: Callable[..., None], target: Callable[..., Any], args: Sequence[Any], timeout: float) -> Any:
        """The object the child sent, or if it sent none its exit status (None: unknown)."""
        assert self.ctx is not None
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=entry, args=(target, list(args), send), daemon=True)
        proc.start()
        send.close()
        child = _Forked(proc)
        self._track(child, True)
        try:
            got: Any = None
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
            if entry is _typed_entry:
                return _died(proc.exitcode)
            return proc.exitcode
        return got

    def _exec_call(self, target: Callable[..., Any], args: Sequence[Any], timeout: float) -> _Wire:
        proc = subprocess.Popen(
            EXEC_CALL,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=set_pdeathsig,  # noqa: PLW1509 - only prctl and getppid run between fork and exec
        )
        self._track(proc, True)
        try:
            out, _err = proc.communicate(pickle.dumps((target, list(args))), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _err = proc.communicate()
        finally:
            self._track(proc, False)
        try:
            wire: _Wire = pickle.loads(out)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError):
            return _died(proc.returncode)
        return wire

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
