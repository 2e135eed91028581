"""Targets and the link to their receiver.

A target is a local absolute path or ``ssh://[user@]host[:port]/path``. Either
way the sender talks the stream protocol to ``virt-cgrep receive PATH``: run
locally as a subprocess, or on the far side through the system's OpenSSH
(argv, never a shell string; ``BatchMode=yes`` so it never prompts;
``StrictHostKeyChecking=yes`` so an unknown host key is refused).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import IO, Any, cast

from libvirt_cgrep.errors import UsageError
from libvirt_cgrep.replica import protocol as proto

_SSH = re.compile(
    r"ssh://(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9_.-]*)@)?(?P<host>[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(?::(?P<port>[0-9]{1,5}))?(?P<path>/.*)"
)
_PATH = re.compile(r"/[A-Za-z0-9_.+/-]*")

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20

#: The receiver command on the far side (a venv's virt-cgrep, for example).
REMOTE_CMD_ENV = "CGREP_REMOTE_CMD"
#: An ssh_config file for the link (identity, known_hosts, proxies): ``ssh -F``.
SSH_CONFIG_ENV = "CGREP_SSH_CONFIG"


@dataclass(frozen=True)
class Target:
    """Where points go. ``host`` is None for a local directory."""

    path: str
    host: str | None = None
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.host is None:
            return self.path
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}{self.path}"


def parse_target(text: str) -> Target:
    """Parse a target; UsageError for anything else (relative paths, '..', odd characters)."""
    m = _SSH.fullmatch(text)
    if m:
        path = m.group("path")
        port = int(m.group("port")) if m.group("port") else None
        if port is not None and not 1 <= port <= 65535:
            raise UsageError(f"invalid ssh port in {text!r}")
        target = Target(path, m.group("host"), m.group("user"), port)
    elif text.startswith("/"):
        target = Target(text)
    else:
        raise UsageError(f"invalid target {text!r}: give an absolute path or ssh://[user@]host[:port]/path")
    if not _PATH.fullmatch(target.path) or ".." in target.path.split("/") or target.path == "/":
        raise UsageError(f"invalid target path {target.path!r}: absolute, without '..', spaces or shell characters")
    return target


def ssh_argv(target: Target, *options: str) -> list[str]:
    """``ssh`` to the target's host (no remote command yet): BatchMode, strict host keys, keepalives."""
    assert target.host is not None
    argv = [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
    ]
    if os.environ.get(SSH_CONFIG_ENV):
        argv += ["-F", os.environ[SSH_CONFIG_ENV]]
    argv += list(options)
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    return [*argv, target.host]


def receiver_argv(target: Target, *, readonly: bool = False, serve: bool = False, ssh_options: tuple[str, ...] = ()) -> list[str]:
    """The argv that starts the target's receiver (``serve``: the continuous-mode session)."""
    mode = ["--read-only"] if readonly else ["--serve"] if serve else []
    if target.host is None:
        if serve:
            return [sys.executable, "-m", "libvirt_cgrep", "receive", *mode, target.path]
        return [sys.executable, "-m", "libvirt_cgrep.server.serve", *mode, target.path]  # lean: no CLI imports per cycle
    remote = shlex.split(os.environ.get(REMOTE_CMD_ENV, "virt-cgrep"))
    argv = ssh_argv(target, *ssh_options)
    # ssh joins the remote words with spaces for the remote shell: quote each one.
    argv += ["--", *(shlex.quote(w) for w in [*remote, "receive", *mode, target.path])]
    return argv


class Link:
    """A running receiver session."""

    def __init__(self, target: Target, *, readonly: bool = False, serve: bool = False) -> None:
        self.target = target
        self.proc = subprocess.Popen(
            receiver_argv(target, readonly=readonly, serve=serve),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self.inp = cast(IO[bytes], self.proc.stdin)
        self.out = cast(IO[bytes], self.proc.stdout)
        with contextlib.suppress(OSError):  # bigger pipe: fewer wake-ups per MiB shipped
            fcntl.fcntl(self.inp.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        self.writer = open(self.inp.fileno(), "wb", buffering=1 << 20, closefd=False)  # noqa: SIM115 - closed in close()
        self.reader = open(self.out.fileno(), "rb", buffering=1 << 16, closefd=False)  # noqa: SIM115
        try:
            proto.write_header(self.writer)
            proto.read_header(self.reader)
            #: the receiver's first reply
            self.hello = proto.Hello.from_wire(self._reply())
            #: the receiver's optional protocol features (protocol.FEATURES)
            self.features = frozenset(self.hello.features)
        except proto.StreamError as exc:
            raise proto.StreamError(f"{exc}{self._stderr_tail()}") from exc
        except BaseException:
            self.close()
            raise

    def _stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        return f" ({err[-1]})" if err else ""

    def _reply(self) -> dict[str, Any]:
        got = proto.recv(self.reader)
        if got is None:
            raise proto.StreamError(f"the receiver closed the link{self._stderr_tail()}")
        proto.raise_reply(got[0])
        return got[0]

    def send(self, msg: dict[str, Any], payload: bytes | memoryview = b"", *, flush: bool = False) -> None:
        """Send without waiting for a reply (data and zero messages); ``flush``: on the link now, not when the
        buffer fills. A broken link raises the receiver's own error."""
        try:
            proto.send(self.writer, msg, payload)
            if flush:
                self.writer.flush()
        except (BrokenPipeError, ConnectionResetError, ValueError):
            self._broken()

    def send_file_extents(self, msg: proto.DataV, fd: int, file_offsets: list[int]) -> None:
        """One ``datav`` message, its extents' bytes read from ``fd`` at ``file_offsets`` and sent with ``sendfile``."""
        parts = [(o, f, n) for (o, n), f in zip(msg.ext, file_offsets, strict=True)]
        try:
            proto.send(self.writer, msg.to_wire())
            self.writer.flush()
            for _, offset, length in parts:
                self._sendfile(fd, offset, length)
        except (BrokenPipeError, ConnectionResetError, ValueError):
            self._broken()

    def send_file(self, msg: dict[str, Any], fd: int, offset: int, length: int) -> None:
        """Send ``length`` bytes of ``fd`` from ``offset`` as the payload of ``msg``, with ``sendfile``.

        The kernel copies the file's pages straight into the link (no copy
        through this process); the wire format is that of :meth:`send`.
        """
        try:
            proto.send(self.writer, {**msg, "n": length})
            self.writer.flush()
            self._sendfile(fd, offset, length)
        except (BrokenPipeError, ConnectionResetError, ValueError):
            self._broken()

    def _sendfile(self, fd: int, offset: int, length: int) -> None:
        out = self.inp.fileno()
        done = 0
        while done < length:
            n = os.sendfile(out, fd, offset + done, length - done)
            if n == 0:
                raise proto.StreamError(f"short read from the image at {offset + done}")
            done += n

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            proto.send(self.writer, msg)
            self.writer.flush()
        except (BrokenPipeError, ConnectionResetError, ValueError):
            self._broken()
        return self._reply()

    def _broken(self) -> None:
        """The link broke while sending: report the receiver's own error if it sent one."""
        got = None
        with contextlib.suppress(Exception):
            got = proto.recv(self.reader)
        if got is not None:
            proto.raise_reply(got[0])
        raise proto.StreamError(f"the link to {self.target} broke{self._stderr_tail()}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            proto.send(self.writer, proto.Bye().to_wire())
            self.writer.flush()
        for f in (self.writer, self.reader):
            with contextlib.suppress(Exception):
                f.close()
        for f2 in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                if f2 is not None:
                    f2.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close()
