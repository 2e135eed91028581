"""Shared fixtures: real daemons, the real lab guest, lab domains that are always torn down.

Fixtures install nothing (``make test`` does that); they start ``virtlogd`` and
``libvirtd`` when they are not running, and remove every domain they created,
even when a test fails. No guest is left paused or running after the suite.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.build import GuestArtifacts, build_guest
from libvirt_cgrep.lab.sshd import Sshd, loopback_sshd

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


SSHD = Sshd


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with loopback_sshd(tmp_path_factory.mktemp("sshd") / "d") as s:
        yield s


@pytest.fixture
def ssh_env(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> Sshd:
    """Point the link at the loopback sshd and the remote command at this venv's virt-cgrep."""
    for key, value in sshd.env().items():
        monkeypatch.setenv(key, value)
    return sshd


GroupFactory = Callable[..., labdom.LabGroup]


@pytest.fixture
def lab_group(conn: libvirt.virConnect, guest: GuestArtifacts) -> Iterator[GroupFactory]:
    """Factory: ``lab_group(vms=2, disks=2, size=16<<20)`` starts a lab group (members and relay); all removed after."""
    made: list[str] = []

    def make(vms: int = 2, disks: int = 2, size: int = 16 << 20, tag: str = "grp", **kw: object) -> labdom.LabGroup:
        name = unique_name(tag)
        specs = labdom.group_specs(name, vms, disks=disks, size=size, kernel=guest.kernel, initrd=guest.initrd, **kw)
        made.append(name)
        return labdom.group_up(conn, name, specs)

    yield make
    for name in made:
        with contextlib.suppress(Exception):
            labdom.group_down(conn, name)
        assert not labdom.group_dir(name).exists()
        assert not list(labdom.lab_root().glob(f"{name}-*"))
        assert not subprocess.run(["pgrep", "-f", f"lab.relay .*--group {name} "], capture_output=True, check=False).stdout
