"""A private sshd on loopback for the lab, the tests and the benchmarks.

Its own host key, a client key, known_hosts and an ssh_config for both, all in
one directory; it listens on 127.0.0.1 only and is stopped (terminate, wait,
kill) when the context ends. Targets over it are checked with strict host
keys, as in production.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from libvirt_cgrep.adapters.proc import stop
from libvirt_cgrep.errors import UnavailableError


@dataclass(frozen=True)
class Sshd:
    """A private sshd on 127.0.0.1 with its own host key, a client key and an ssh_config for both."""

    port: int
    config: Path

    def target(self, path: Path) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{path}"

    def base(self, *options: str) -> list[str]:
        return ["ssh", "-F", str(self.config), "-o", "BatchMode=yes", *options, "-p", str(self.port), "root@127.0.0.1"]

    def argv(self, *remote: str, control: Path | None = None) -> list[str]:
        """ssh running ``remote`` (through the master connection on ``control`` if given)."""
        mux = ("-o", "ControlMaster=no", "-S", str(control)) if control else ()
        return [*self.base(*mux), "--", *remote]

    def env(self) -> dict[str, str]:
        """Environment for ``virt-cgrep sync``: this ssh_config, and this venv's receiver on the far side."""
        remote = f"{sys.executable} -m libvirt_cgrep"
        if os.environ.get("PYTHONPATH"):  # a checkout run without installing it: the same code on the far side
            remote = f"env PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {remote}"
        return {"CGREP_SSH_CONFIG": str(self.config), "CGREP_REMOTE_CMD": remote}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_sshd(d: Path) -> Iterator[Sshd]:
    """Start ``sshd -D`` on a free loopback port with keys and config in ``d``; stopped by pid on exit."""
    d.mkdir(mode=0o700)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    kind, blob = (d / "host_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {blob}\n")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\n"
    )
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1\n  IdentityFile {d / 'client_key'}\n  UserKnownHostsFile {d / 'known_hosts'}\n  IdentitiesOnly yes\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UnavailableError("the loopback sshd did not start")
            time.sleep(0.05)
        yield Sshd(port, d / "ssh_config")
    finally:
        stop(proc, timeout=5)
