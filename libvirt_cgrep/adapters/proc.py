"""Run external commands as argv lists (never through a shell)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from libvirt_cgrep.errors import CommandError, UnavailableError

log = logging.getLogger(__name__)


def require_tool(name: str) -> str:
    """Return the path of ``name`` on PATH or raise UnavailableError."""
    path = shutil.which(name)
    if path is None:
        raise UnavailableError(f"{name} is not installed (run 'make install' or install its Debian package)")
    return path


def run(
    argv: Sequence[str],
    *,
    timeout: float = 600.0,
    input: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    error: type[CommandError] = CommandError,
) -> str:
    """Run ``argv``; return stdout as text. Raise ``error`` with stderr's last line on failure."""
    if shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
        raise UnavailableError(f"{argv[0]} is not installed (run 'make install' or install its Debian package)")
    log.debug("run %s", " ".join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            cwd=cwd,
            env=None if env is None else dict(env),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise error(f"{argv[0]} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise error(f"{' '.join(argv[:2])} failed (exit {proc.returncode}): {last}")
    return proc.stdout.decode(errors="replace")


def stop(proc: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signal ``proc`` (SIGTERM), wait up to ``timeout`` s, then SIGKILL and wait; returns its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


#: Flag of a listening socket in ``/proc/net/unix`` (``__SO_ACCEPTCON``).
_SO_ACCEPTCON = 0x10000


def listening_unix_paths() -> set[str]:
    """The paths of the unix sockets listening now (in this network namespace).

    A socket's file appears at ``bind()``, before ``listen()``; a connect in
    between is refused. This reads ``/proc/net/unix`` once and connects to
    nothing, so it is safe on sockets where a probe connection would have effects.
    """
    out = set()
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f, None)  # header
        for line in f:
            fields = line.split(maxsplit=7)
            if len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON:
                out.add(fields[7].rstrip("\n"))
    return out


def wait_listening(paths: Sequence[str], proc: subprocess.Popen[Any], *, what: str, timeout: float = 10.0) -> None:
    """Wait until ``proc`` listens on every unix socket in ``paths``.

    Returns once they all accept connections. Raises UnavailableError, with
    the last line of ``proc``'s piped stderr when it exited, if ``proc`` exits
    first or ``timeout`` seconds pass; ``proc`` is left as it is.
    """
    deadline = time.monotonic() + timeout
    while not set(paths) <= listening_unix_paths():  # one read of /proc/net/unix per poll
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            last = err.splitlines()[-1] if err else f"it exited with status {proc.returncode}"
            raise UnavailableError(f"{what} did not start: {last}")
        if time.monotonic() > deadline:
            raise UnavailableError(f"{what} did not start: no listening socket within {timeout:g} s")
        time.sleep(0.01)
