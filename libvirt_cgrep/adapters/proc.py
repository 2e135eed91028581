"""Run external commands as argv lists (never through a shell)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

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
    error: type[CommandError] = CommandError,
) -> str:
    """Run ``argv``; return stdout as text. Raise ``error`` with stderr's last line on failure."""
    require_tool(argv[0])
    log.debug("run %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise error(f"{argv[0]} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise error(f"{argv[0]} failed: {last}")
    return proc.stdout.decode(errors="replace")
