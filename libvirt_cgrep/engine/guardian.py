"""The guardian: a separate process that resumes held guests if the holder cannot.

Guarantee: once armed, every guest it guards is resumed when the deadline
passes or when its parent dies (SIGKILL included: the parent's end of the
pipe closes), unless the parent said ``done`` first. It runs in its own
session, so a signal to the parent's process group does not reach it.

Protocol on its stdin/stdout (one word a line)::

    guardian -> parent   ready          connected to every guest, waiting
    parent -> guardian   armed          the hold starts now; the deadline runs
    parent -> guardian   done           the parent resumed the guests itself
    guardian -> parent   fired          the deadline passed; the guardian resumed them

SIGTERM, SIGHUP or SIGINT make it resume every guest at once and exit.

Guest specs: ``libvirt:URI:DOMAIN`` or ``qmp:SOCKET``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters.qmp import cont
from libvirt_cgrep.errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_OK, CgrepError, FenceError, UsageError

READY_TIMEOUT = 15.0


#: How long a guardian keeps trying to reach libvirtd again to resume a guest.
RECONNECT_S = 120.0

#: The guardian's exit statuses, from the one table of errors.py.
#: ``done`` came first: the parent resumed the guests itself.
EXIT_RELEASED = EXIT_OK
#: The deadline passed: the guardian resumed the guests (a FenceError for the holder).
EXIT_FIRED = EXIT_CODES[FenceError]
#: The parent died (its end of the pipe closed) before ``done``: the guardian resumed the guests.
EXIT_HOLDER_GONE = EXIT_CODES[FenceError]
#: SIGTERM, SIGHUP or SIGINT: the guardian resumed the guests and stopped.
EXIT_SIGNALLED = EXIT_INTERRUPTED


def _libvirt_resumer(uri: str, name: str) -> Callable[[], None]:
    """Resume through the connection opened at start; if libvirtd restarted since, reconnect until it works."""
    conn = lv.connect(uri)
    dom = lv.lookup(conn, name)
    what = f"resuming {name!r}"

    def resume() -> None:
        try:
            lv.resume_if_paused(dom, what)
            return
        except CgrepError:
            pass
        end = time.monotonic() + RECONNECT_S
        while True:
            try:
                fresh = lv.connect(uri)
                try:
                    lv.resume_if_paused(lv.lookup(fresh, name), what)
                    return
                finally:
                    lv.close(fresh)
            except CgrepError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)

    return resume


def _qmp_resumer(socket: str) -> Callable[[], None]:
    return lambda: cont(socket)


def _resumer(spec: str) -> Callable[[], None]:
    kind, _, rest = spec.partition(":")
    if kind == "libvirt":
        uri, _, name = rest.rpartition(":")
        return _libvirt_resumer(uri, name)
    if kind == "qmp":
        return _qmp_resumer(rest)
    raise UsageError(f"guardian: bad guest spec {spec!r}")


def _resume_all(resumers: Sequence[Callable[[], None]]) -> None:
    for r in resumers:
        with contextlib.suppress(Exception):
            r()


def serve(specs: Sequence[str], deadline_ms: float, stdin: int, out: Callable[[str], None]) -> int:
    """The guardian's loop; returns its exit status (:data:`EXIT_RELEASED`, :data:`EXIT_FIRED`, :data:`EXIT_HOLDER_GONE`)."""
    resumers = [_resumer(s) for s in specs]

    def on_signal(signum: int, frame: object) -> None:
        # Being told to stop (systemd stopping the agent's cgroup, an operator's kill)
        # must never leave a guest paused: resume first, then go.
        _resume_all(resumers)
        os._exit(EXIT_SIGNALLED)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    out("ready")
    buf = b""
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([stdin], [], [], timeout)
        if not ready:
            _resume_all(resumers)
            out("fired")
            return EXIT_FIRED
        chunk = os.read(stdin, 64)
        if not chunk:
            _resume_all(resumers)
            return EXIT_HOLDER_GONE
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word = line.strip().decode()
            if word == "armed" and deadline is None:
                deadline = time.monotonic() + deadline_ms / 1000.0
            elif word == "done":
                return EXIT_RELEASED


class Guardian:
    """Parent side: start the guardian before the hold, ``arm()`` at its start, ``release()`` at its end."""

    def __init__(self, specs: Sequence[str], deadline_ms: float) -> None:
        self.specs = list(specs)
        self.deadline_ms = deadline_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.fired = False

    def __enter__(self) -> Guardian:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "libvirt_cgrep.cli.guardian", "--deadline-ms", str(self.deadline_ms), *self.specs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], READY_TIMEOUT)
        line = self.proc.stdout.readline().strip() if ready else b""
        if line != b"ready":
            self._kill()
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
            raise FenceError(f"the guardian did not start: {err.splitlines()[-1] if err else 'no answer'}; nothing was held")
        return self

    def _send(self, word: str) -> None:
        assert self.proc is not None
        if self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(word.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            # The guardian has exited (its deadline fired): drop the pipe now, with what is still buffered in it,
            # so that nothing tries to flush it again when the file object is collected.
            stdin, self.proc.stdin = self.proc.stdin, None
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    def arm(self) -> None:
        """The hold starts now."""
        self._send("armed")

    def release(self) -> bool:
        """The parent resumed the guests; returns True if the guardian had already fired."""
        self._send("done")
        assert self.proc is not None and self.proc.stdout is not None
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill()
        out = self.proc.stdout.read()
        self.fired = b"fired" in out
        return self.fired

    def abandon(self) -> bool:
        """Hand the guests to the guardian: it resumes every one of them now (reconnecting if it must).

        The guardian is never killed here: it lives in its own session and
        exits by itself once every guest is resumed.
        """
        assert self.proc is not None
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        return True

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # An exception inside the hold: closing stdin makes the guardian resume everything.
            # It is left to finish by itself (never killed: it may be waiting for libvirtd).
            if self.proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            if f is not None:
                f.close()
