"""The QMP backend against real, bare QEMU processes (no libvirt), running the lab workload.

Each VM is ``qemu-system-x86_64 -accel tcg`` with N qcow2 disks attached with
``-blockdev`` and two QMP monitors: one for the backend, one for the guardian
(and for the tests' meddling behind the backend's back).
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.adapters.qmp import QMPCommandError, QMPConnection, QMPOutcomeUnknown, cont
from libvirt_cgrep.core.model import Guest, Transaction
from libvirt_cgrep.core.plan import plan_cut, point_id, select_disks
from libvirt_cgrep.engine.qmp_backend import QMPBackend, file_node_name
from libvirt_cgrep.errors import CutError, QMPError, UsageError
from libvirt_cgrep.lab.build import GuestArtifacts
from libvirt_cgrep.lab.check import check_images
from libvirt_cgrep.lab.domain import read_console, wait_for_ack

DISK_SIZE = 64 << 20
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 cgrep.mode=write"


@dataclass(frozen=True)
class BareVM:
    proc: subprocess.Popen[bytes]
    directory: Path
    qmp: str
    guardian: str
    console: Path
    images: tuple[Path, ...]

    def last_ack(self) -> int:
        ack = read_console(self.console).ack
        return ack.seq if ack else -1

    def progress(self, records: int = 50, timeout: float = 30.0) -> int:
        """Wait until the workload acknowledged ``records`` more records; return the new last ack."""
        return wait_for_ack(self.console, after=self.last_ack() + records, timeout=timeout).seq


VMFactory = Callable[..., BareVM]


def _target(i: int) -> str:
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[i]


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with {proc.returncode} before creating {path.name}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU did not create {path.name} within {timeout:g} s")
        time.sleep(0.05)


@pytest.fixture
def bare_vm(tmp_path: Path, guest: GuestArtifacts) -> Iterator[VMFactory]:
    """Factory: ``bare_vm(disks=N, raw=False, readonly=False, paused=False, name=None)``; every VM is killed after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def make(
        disks: int = 2, *, raw: bool = False, readonly: bool = False, paused: bool = False, name: str | None = None
    ) -> BareVM:
        d = tmp_path / f"vm{len(procs)}"
        d.mkdir()
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "192", "-nodefaults", "-nographic",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", CMDLINE,
            "-serial", f"file:{d / 'console.log'}",
        ]  # fmt: skip
        images = []
        for i in range(disks):
            img = d / f"{_target(i)}.qcow2"
            qemu_img.create_qcow2(img, DISK_SIZE)
            images.append(img)
            argv += [
                "-blockdev", f"driver=file,node-name=file{i},filename={img}",
                "-blockdev", f"driver=qcow2,node-name=disk{i},file=file{i}",
                "-device", f"virtio-blk-pci,drive=disk{i},id={_target(i)},serial=cgrep-d{i}",
            ]  # fmt: skip
        if raw:
            img = d / "vdz.raw"
            with open(img, "wb") as f:
                f.truncate(16 << 20)
            argv += [
                "-blockdev", f"driver=file,node-name=filez,filename={img}",
                "-blockdev", "driver=raw,node-name=diskz,file=filez",
                "-device", "virtio-blk-pci,drive=diskz,id=vdz",
            ]  # fmt: skip
        if readonly:
            img = d / "vdy.qcow2"
            qemu_img.create_qcow2(img, DISK_SIZE)
            argv += [
                "-blockdev", f"driver=file,node-name=filey,filename={img},read-only=on",
                "-blockdev", "driver=qcow2,node-name=disky,file=filey,read-only=on",
                "-device", "virtio-blk-pci,drive=disky,id=vdy",
            ]  # fmt: skip
        qmp, guardian = d / "qmp.sock", d / "guardian.sock"
        argv += [
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-qmp", f"unix:{guardian},server=on,wait=off",
        ]  # fmt: skip
        if paused:
            argv.append("-S")
        if name:
            argv += ["-name", name]
        with open(d / "qemu.err", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        procs.append(proc)
        _wait_for(qmp, proc)
        _wait_for(guardian, proc)
        vm = BareVM(proc, d, str(qmp), str(guardian), d / "console.log", tuple(images))
        if not paused:
            wait_for_ack(vm.console, after=100, timeout=60)
        return vm

    yield make
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def backends() -> Iterator[list[QMPBackend]]:
    """Backends registered here are closed after the test (before its VMs are killed)."""
    made: list[QMPBackend] = []
    yield made
    for b in made:
        b.close()


def _plan(g: Guest, salt: int, targets: list[str] | None = None) -> Transaction:
    (txn,) = plan_cut(point_id(datetime.now(UTC), salt=salt), [(g, select_disks(g, targets))]).transactions
    return txn


def _query(socket: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
    with QMPConnection(socket) as q:
        return q.execute(cmd, args)


def _node_names(socket: str) -> set[str]:
    return {n["node-name"] for n in _query(socket, "query-named-block-nodes", {"flat": True})}


@pytest.mark.parametrize("ndisks", [2, 4])
def test_points_are_consistent_and_chains_grow(bare_vm: VMFactory, backends: list[QMPBackend], ndisks: int) -> None:
    vm = bare_vm(disks=ndisks)
    b = QMPBackend(vm.qmp, name=f"bare{ndisks}", guardian_socket=vm.guardian)
    backends.append(b)
    g = b.discover()
    assert (g.name, g.kind, g.address, g.state) == (f"bare{ndisks}", "qmp", vm.qmp, "running")
    assert [d.target for d in g.disks] == [_target(i) for i in range(ndisks)]
    assert all(d.supported and d.format == "qcow2" for d in g.disks)
    assert [d.image for d in g.disks] == [str(p) for p in vm.images]
    assert [d.node for d in g.disks] == [f"disk{i}" for i in range(ndisks)]
    chains = {d.target: d.chain for d in g.disks}

    cut_ms: list[float] = []
    maxima: list[int] = []
    for i in range(1, 11):
        ack_before = vm.last_ack()
        txn = _plan(g, salt=i)
        assert len(txn.actions) == ndisks
        b.prepare(txn)
        cut = b.cut(txn)
        cut_ms.append(cut.cut_ms)
        verdict = check_images([Path(d.frozen_image) for d in cut.disks])
        assert verdict.consistent, f"point {i}: {verdict}"
        assert verdict.max >= ack_before, f"point {i}: cut max {verdict.max} < ack before {ack_before}"
        maxima.append(verdict.max)

        g = b.discover()
        by_target = {d.target: d for d in g.disks}
        for a, dc in zip(txn.actions, cut.disks, strict=True):
            d = by_target[a.target]
            assert (dc.frozen_image, dc.active_image) == (a.frozen, a.overlay)
            assert (d.image, d.node) == (a.overlay, a.overlay_node)
            assert d.chain == (a.overlay, *chains[a.target])
            assert qemu_img.chain(Path(a.overlay))[0].backing == a.frozen
            chains[a.target] = d.chain
    assert all(len(c) == 11 for c in chains.values())
    assert maxima == sorted(maxima) and maxima[-1] > maxima[0]
    after = vm.progress(records=200)
    print(f"\n{ndisks} disks: 10/10 points consistent, cut_ms median {statistics.median(cut_ms):.1f}, last ack {after}")


def test_pause_cut_resume_hold(bare_vm: VMFactory, backends: list[QMPBackend]) -> None:
    vm = bare_vm(disks=4)
    b = QMPBackend(vm.qmp, name="fence", guardian_socket=vm.guardian)
    backends.append(b)
    assert b.guardian_spec() == [f"qmp:{vm.guardian}"]
    holds: list[float] = []
    cuts: list[float] = []
    consistent = 0
    g = b.discover()
    for i in range(1, 11):
        txn = _plan(g, salt=i)
        b.prepare(txn)  # outside the hold
        ack_before = vm.last_ack()
        t0 = time.monotonic()
        b.pause()
        try:
            cut = b.cut(txn)
        finally:
            b.resume()
        holds.append((time.monotonic() - t0) * 1000.0)
        cuts.append(cut.cut_ms)
        verdict = check_images([Path(d.frozen_image) for d in cut.disks])
        consistent += verdict.consistent and verdict.max >= ack_before
        g = b.discover()
        assert g.state == "running"
    print(
        f"\nfence (stop + transaction + cont), 4 disks: hold median {statistics.median(holds):.1f} ms "
        f"(min {min(holds):.1f}, max {max(holds):.1f}); transaction median {statistics.median(cuts):.1f} ms; "
        f"consistent {consistent}/10"
    )
    assert consistent == 10
    assert statistics.median(holds) < 200.0
    vm.progress()

    # The guardian's path: a second monitor resumes a guest the backend paused.
    b.pause()
    assert b.discover().state == "paused"
    cont(vm.guardian)
    assert b.discover().state == "running"
    cont(vm.guardian)  # idempotent
    vm.progress()


def test_failed_transaction_leaves_old_chains(
    bare_vm: VMFactory, backends: list[QMPBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = bare_vm(disks=3)
    b = QMPBackend(vm.qmp, name="fail", guardian_socket=vm.guardian)
    backends.append(b)
    g = b.discover()
    old = {d.target: (d.node, d.image, d.chain) for d in g.disks}

    # 1. An overlay node vanishes behind the backend's back: the transaction is refused as a whole.
    txn = _plan(g, salt=1)
    b.prepare(txn)
    assert all(Path(a.overlay).exists() for a in txn.actions)
    _query(vm.guardian, "blockdev-del", {"node-name": txn.actions[1].overlay_node})
    ack = vm.last_ack()
    with pytest.raises(CutError, match="transaction failed"):
        b.cut(txn)
    assert {d.target: (d.node, d.image, d.chain) for d in b.discover().disks} == old
    tops = {d["qdev"]: d["inserted"]["node-name"] for d in _query(vm.guardian, "query-block")}
    assert sorted(tops.values()) == ["disk0", "disk1", "disk2"]
    b.discard(txn)
    assert not any(Path(a.overlay).exists() for a in txn.actions)
    assert not {n for n in _node_names(vm.guardian) if n.startswith("cg-")}
    assert vm.progress() > ack

    # 2. prepare fails on the last overlay (its directory does not exist): it removes what it made.
    txn = _plan(g, salt=2)
    gone = vm.directory / "gone" / "vdc.qcow2"
    txn = dataclasses.replace(txn, actions=(*txn.actions[:-1], dataclasses.replace(txn.actions[-1], overlay=str(gone))))
    with pytest.raises(CutError, match="cannot create overlays"):
        b.prepare(txn)
    assert not any(Path(a.overlay).exists() for a in txn.actions)
    assert not {n for n in _node_names(vm.guardian) if n.startswith("cg-")}
    assert {d.target: (d.node, d.image, d.chain) for d in b.discover().disks} == old

    # 3. An existing file is never overwritten, nor removed.
    txn = _plan(g, salt=3)
    Path(txn.actions[0].overlay).write_bytes(b"not ours")
    with pytest.raises(CutError, match="already exists"):
        b.prepare(txn)
    assert Path(txn.actions[0].overlay).read_bytes() == b"not ours"
    b.discard(txn)
    assert Path(txn.actions[0].overlay).read_bytes() == b"not ours"
    assert not any(Path(a.overlay).exists() for a in txn.actions[1:])

    # 4. The answer to the transaction is lost (connection dropped) after QEMU executed it:
    #    the backend reconnects, re-queries and finds the cut took effect.
    txn = _plan(g, salt=4)
    b.prepare(txn)
    real = b.qmp.execute

    def lost_answer(cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10.0) -> Any:
        out = real(cmd, args, timeout)
        if cmd == "transaction":
            b.qmp.close()
            raise QMPOutcomeUnknown("injected: answer lost")
        return out

    monkeypatch.setattr(b.qmp, "execute", lost_answer)
    cut = b.cut(txn)
    assert {d.target: d.image for d in b.discover().disks} == {a.target: a.overlay for a in txn.actions}
    assert check_images([Path(d.frozen_image) for d in cut.disks]).consistent
    g = b.discover()
    old = {d.target: (d.node, d.image, d.chain) for d in g.disks}

    # 5. The transaction times out before QEMU got it: re-queried, old chains, CutError.
    txn = _plan(g, salt=5)
    b.prepare(txn)

    conn = b.qmp

    def never_sent(cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10.0) -> Any:
        if cmd == "transaction":
            raise QMPOutcomeUnknown("injected: no answer")
        return QMPConnection.execute(conn, cmd, args, timeout)

    monkeypatch.setattr(conn, "execute", never_sent)
    with pytest.raises(CutError, match="did not take effect"):
        b.cut(txn)
    monkeypatch.undo()
    assert {d.target: (d.node, d.image, d.chain) for d in b.discover().disks} == old
    b.discard(txn)
    assert not any(Path(a.overlay).exists() for a in txn.actions)

    # 6. After all that, a point still works and is consistent.
    txn = _plan(g, salt=6)
    b.prepare(txn)
    cut = b.cut(txn)
    assert check_images([Path(d.frozen_image) for d in cut.disks]).consistent
    b.discard(txn)  # after a successful cut the overlays are live: nothing is removed
    assert all(Path(a.overlay).exists() for a in txn.actions)
    vm.progress()


def test_discover_reports_unsupported_disks(bare_vm: VMFactory, backends: list[QMPBackend]) -> None:
    vm = bare_vm(disks=1, raw=True, readonly=True, paused=True)
    b = QMPBackend(vm.qmp)
    backends.append(b)
    g = b.discover()
    assert g.name == vm.qmp and g.state == "prelaunch"
    by_target = {d.target: d for d in g.disks}
    assert set(by_target) == {"vda", "vdy", "vdz"}
    assert by_target["vda"].supported
    raw, ro = by_target["vdz"], by_target["vdy"]
    assert not raw.supported and raw.format == "raw" and "qcow2 is required" in (raw.reason or "")
    assert not ro.supported and ro.reason == "read-only"
    assert [d.target for d in select_disks(g)] == ["vda"]
    with pytest.raises(UsageError, match="vdz cannot be protected"):
        select_disks(g, ["vdz"])
    with pytest.raises(UsageError, match="second QMP monitor"):
        b.guardian_spec()


def test_qmp_adapter_errors(bare_vm: VMFactory, tmp_path: Path) -> None:
    with pytest.raises(QMPError, match="cannot connect"):
        QMPConnection(str(tmp_path / "nothing.sock"), timeout=1.0)
    vm = bare_vm(disks=1, paused=True)
    with QMPConnection(vm.qmp) as q:
        with pytest.raises(QMPCommandError, match="CommandNotFound") as info:
            q.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        with pytest.raises(QMPError, match="blockdev-create job"):
            q.run_job({"job-id": "j1", "options": {"driver": "file", "filename": str(tmp_path / "no" / "x"), "size": 0}})
        assert q.execute("query-jobs") == []
        assert q.execute("query-status")["status"] == "prelaunch"
    assert file_node_name("a" * 31) == "a" * 29 + "-f"
