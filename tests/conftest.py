"""Shared fixtures: real daemons, the real lab guest, lab domains that are always torn down.

Fixtures install nothing (``make test`` does that); they start ``virtlogd`` and
``libvirtd`` when they are not running, and remove every domain they created,
even when a test fails. No guest is left paused or running after the suite.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.build import GuestArtifacts, build_guest

URI = "qemu:///system"
PREFIX = f"cgt{os.getpid()}"
_counter = itertools.count()


def _daemon_running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


def ensure_daemons() -> None:
    """Start virtlogd and libvirtd (no systemd here) and wait for the socket."""
    for daemon in ("virtlogd", "libvirtd"):
        if not _daemon_running(daemon):
            subprocess.run([daemon, "-d"], check=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            libvirt.open(URI).close()
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def conn() -> Iterator[libvirt.virConnect]:
    ensure_daemons()
    c = lv.connect(URI)
    yield c
    # Safety net: nothing this session created may survive it.
    for dom in c.listAllDomains(0):
        if dom.name().startswith(PREFIX):
            with contextlib.suppress(Exception):
                labdom.down(c, dom.name())
    c.close()


@pytest.fixture(scope="session")
def guest() -> GuestArtifacts:
    return build_guest(offline=True)


def unique_name(tag: str = "vm") -> str:
    return f"{PREFIX}-{tag}{next(_counter)}"


LabFactory = Callable[..., labdom.LabDomain]


@pytest.fixture
def lab_vm(conn: libvirt.virConnect, guest: GuestArtifacts) -> Iterator[LabFactory]:
    """Factory: ``lab_vm(disks=4, size=64<<20, ...)`` starts a lab domain; all are removed after the test."""
    made: list[str] = []

    def make(disks: int = 2, size: int = 64 << 20, tag: str = "vm", **kw: object) -> labdom.LabDomain:
        name = unique_name(tag)
        spec = labdom.LabSpec(
            name=name,
            disks=disks,
            size=size,
            kernel=guest.kernel,
            initrd=guest.initrd,
            directory=labdom.lab_root() / name,
            **kw,  # type: ignore[arg-type]
        )
        made.append(name)
        return labdom.up(conn, spec)

    yield make
    for name in made:
        with contextlib.suppress(Exception):
            labdom.down(conn, name)
        assert not (labdom.lab_root() / name).exists()


def wait_progress(console_log: Path, records: int = 20, timeout: float = 30.0) -> int:
    """Wait until the workload acknowledged ``records`` more records; return the new last ack."""
    start = labdom.read_console(console_log).ack
    base = start.seq if start else -1
    return labdom.wait_for_ack(console_log, after=base + records, timeout=timeout).seq


@dataclass(frozen=True)
class SSHD:
    """A real sshd on loopback with its own host key, a client key and an ssh_config for it."""

    port: int
    config: Path

    def target(self, path: Path) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHD]:
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nSubsystem sftp internal-sftp\n"
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
            assert time.monotonic() < deadline, "sshd did not start"
            time.sleep(0.05)
        yield SSHD(port, d / "ssh_config")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def ssh_env(sshd: SSHD, monkeypatch: pytest.MonkeyPatch) -> SSHD:
    """Point the link at the loopback sshd and the remote command at this venv's virt-cgrep."""
    monkeypatch.setenv("CGREP_SSH_CONFIG", str(sshd.config))
    monkeypatch.setenv("CGREP_REMOTE_CMD", f"{sys.executable} -m libvirt_cgrep")
    return sshd
