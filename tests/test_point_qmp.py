"""The QMP backend against real, bare QEMU processes (no libvirt), running the lab workload.

Each VM is ``qemu-system-x86_64 -accel tcg`` with N qcow2 disks attached with
``-blockdev`` and two QMP monitors: one for the backend, one for the guardian
(and for the tests' meddling behind the backend's back).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from libvirt_cgrep.adapters import qemu_img
from libvirt_cgrep.adapters.proc import wait_listening
from libvirt_cgrep.adapters.qmp import QMPConnection, cont
from libvirt_cgrep.core.model import Guest, Transaction
from libvirt_cgrep.core.plan import plan_cut, point_id, select_disks
from libvirt_cgrep.core.qmp import file_node_name
from libvirt_cgrep.engine.point import take_point
from libvirt_cgrep.engine.qmp_backend import QMPBackend
from libvirt_cgrep.errors import CutError, QMPCommandError, QMPError, QMPOutcomeUnknown, StateError, UsageError
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
        wait_listening([str(qmp), str(guardian)], proc, what="QEMU")
        vm = BareVM(proc, d, str(qmp), str(guardian), d / "console.log", tuple(images))
        if not paused:
            wait_for_ack(vm.console, after=100, timeout=180)  # boot under TCG on a loaded host
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
    with pytest.raises(StateError, match="is prelaunch"):
        b.require_running()
    with pytest.raises(UsageError, match="has no name: start it with -name"):
        b.record()  # a replica needs a name; the socket path is not one
    assert b.chain("vdz") == (raw.image,)


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


# ---------------------------------------------------------------- points through take_point and the CLI, folds


def _cg_nodes(socket: str) -> set[str]:
    return {n for n in _node_names(socket) if n.startswith("cg-")}


def _node_of(socket: str, filename: str) -> str:
    """The format node (not the file node) QEMU opened ``filename`` with."""
    nodes = _query(socket, "query-named-block-nodes", {"flat": True})
    (node,) = [n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"] == filename]
    return str(node)


def _running(socket: str) -> bool:
    return bool(_query(socket, "query-status")["running"])


def test_cli_point_with_suspend_fence(bare_vm: VMFactory) -> None:
    vm = bare_vm(disks=4)
    base = [sys.executable, "-m", "libvirt_cgrep", "point", "--backend", "qmp", "--qmp", vm.qmp, "--json"]
    # Without a second monitor the fence cannot be guarded: refused before anything changes.
    out = subprocess.run([*base, "--fence", "suspend"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 64, out.stderr
    assert "second QMP monitor" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not _cg_nodes(vm.guardian) and sorted(vm.directory.glob("*.cgrep-*")) == []

    ack_before = vm.last_ack()
    out = subprocess.run(
        [*base, "--guardian-qmp", vm.guardian, "--fence", "suspend"], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert (res["backend"], res["fence"]) == ("qmp", "suspend")
    assert isinstance(res["fence_ms"], float) and res["fence_ms"] > 0
    disks = res["disks"]
    assert [d["target"] for d in disks] == [_target(i) for i in range(4)]
    assert [d["frozen_image"] for d in disks] == [str(p) for p in vm.images]
    assert all(Path(d["active_image"]).exists() and d["active_image"] != d["frozen_image"] for d in disks)
    verdict = check_images([Path(d["frozen_image"]) for d in disks])
    assert verdict.consistent and verdict.max >= ack_before, verdict
    assert _running(vm.guardian)
    vm.progress()
    print(f"\nCLI point, 4 disks, fence suspend: fence_ms {res['fence_ms']:.1f}, cut_ms {res['cut_ms']:.1f}")


def test_cli_chain_over_qmp(bare_vm: VMFactory) -> None:
    """`chain --backend qmp --qmp SOCKET`: each disk's chain and whether it can be protected; it grows with a point."""
    vm = bare_vm(disks=2, raw=True, paused=True, name="chainq")
    argv = [sys.executable, "-m", "libvirt_cgrep", "chain", "--backend", "qmp", "--qmp", vm.qmp]

    def chain_json() -> dict[str, Any]:
        out = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60, check=True)
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    before = chain_json()
    assert (before["domain"], before["state"]) == ("chainq", "prelaunch")
    by = {d["target"]: d for d in before["disks"]}
    assert [by[t]["chain"] for t in ("vda", "vdb")] == [[str(p)] for p in vm.images]
    assert not by["vdz"]["supported"] and "qcow2 is required" in by["vdz"]["reason"]
    _query(vm.guardian, "cont")
    point = [sys.executable, "-m", "libvirt_cgrep", "point", "--backend", "qmp", "--qmp", vm.qmp, "--disks", "vda,vdb", "--json"]
    res = json.loads(subprocess.run(point, capture_output=True, text=True, timeout=120, check=True).stdout)
    after = {d["target"]: d["chain"] for d in chain_json()["disks"]}
    assert [after[d["target"]] for d in res["disks"]] == [[d["active_image"], d["frozen_image"]] for d in res["disks"]]
    table = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert all(f"{d['active_image']} <- {d['frozen_image']}" in table for d in res["disks"]) and "no: raw image" in table
    for bad in ([*argv, "somedomain"], [*argv, "--qmp", vm.guardian]):
        out = subprocess.run(bad, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 64 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_take_point_suspend_in_process(bare_vm: VMFactory, backends: list[QMPBackend]) -> None:
    vm = bare_vm(disks=4, name="susp")
    b = QMPBackend(vm.qmp, guardian_socket=vm.guardian)
    backends.append(b)
    fences: list[float] = []
    cuts: list[float] = []
    consistent = 0
    for _ in range(10):
        ack_before = vm.last_ack()
        pt = take_point([b], fence="suspend")
        assert pt.fence_ms is not None
        fences.append(pt.fence_ms)
        cuts.append(pt.cut_ms)
        verdict = check_images([Path(d.frozen_image) for g in pt.guests for d in g.disks])
        consistent += verdict.consistent and verdict.max >= ack_before
        assert b.discover().state == "running"
    print(
        f"\ntake_point fence=suspend over QMP, 4 disks: fence_ms median {statistics.median(fences):.1f} "
        f"(min {min(fences):.1f}, max {max(fences):.1f}), cut_ms median {statistics.median(cuts):.1f}; "
        f"consistent {consistent}/10"
    )
    assert consistent == 10
    assert statistics.median(fences) < 200.0  # target 20 ms; generous on a shared TCG host
    vm.progress()


def test_fold_merges_layers_and_a_new_backend_folds_what_an_old_one_cut(bare_vm: VMFactory, backends: list[QMPBackend]) -> None:
    vm = bare_vm(disks=2, name="fold")
    targets = [_target(i) for i in range(2)]
    bases = {t: str(p) for t, p in zip(targets, vm.images, strict=True)}
    a = QMPBackend(vm.qmp, guardian_socket=vm.guardian)
    backends.append(a)
    assert a.record() == ("fold", None, "")
    a.require_running()
    fold_ms: list[float] = []

    def timed_fold(b: QMPBackend, t: str, base: str, top: str) -> None:
        t0 = time.monotonic()
        b.fold(t, base, top)
        fold_ms.append((time.monotonic() - t0) * 1000.0)

    frozen: list[tuple[Path, ...]] = []
    for _ in range(3):
        vm.progress(30)
        pt = take_point([a])
        frozen.append(tuple(Path(d.frozen_image) for g in pt.guests for d in g.disks))
    assert all(len(a.chain(t)) == 4 and a.chain(t)[-1] == bases[t] for t in targets)
    before = check_images(frozen[2])
    assert before.consistent

    # 1. Fold the oldest overlay into the base: one layer merged away, its nodes and file removed.
    for t in targets:
        ch = a.chain(t)
        merged = _node_of(vm.guardian, ch[-2])
        timed_fold(a, t, ch[-1], ch[-2])
        assert a.chain(t) == (*ch[:-2], ch[-1])
        assert not Path(ch[-2]).exists()
        assert qemu_img.chain(Path(ch[-3]))[0].backing == ch[-1]
        assert not {merged, file_node_name(merged)} & _node_names(vm.guardian)
        assert _running(vm.guardian)
    assert len(_cg_nodes(vm.guardian)) == 2 * 2 * 2  # two overlays per disk left, each a qcow2 and a file node
    assert check_images(frozen[2]) == before  # the newest frozen images read exactly as before

    # 2. A process dies after prepare, before its cut: its overlays stay as nodes and files.
    orphan = _plan(a.discover(), salt=99)
    a.prepare(orphan)
    a.close()
    assert all(Path(x.overlay).exists() for x in orphan.actions)

    # 3. A new backend (as a new process would) folds two layers the old one cut, and collects the orphans.
    b = QMPBackend(vm.qmp, guardian_socket=vm.guardian)
    backends.append(b)
    take_point([b])
    for t in targets:
        ch = b.chain(t)
        assert len(ch) == 4
        timed_fold(b, t, ch[-1], ch[1])
        assert b.chain(t) == (ch[0], ch[-1])
        assert not Path(ch[1]).exists() and not Path(ch[2]).exists()
    assert not any(Path(x.overlay).exists() for x in orphan.actions)
    live = {_node_of(vm.guardian, b.chain(t)[0]) for t in targets}
    assert _cg_nodes(vm.guardian) == live | {file_node_name(n) for n in live}
    assert sorted(p.name for p in vm.directory.glob("*.cgrep-*")) == sorted(Path(b.chain(t)[0]).name for t in targets)
    ack_before = vm.last_ack()
    pt = take_point([b])
    after = check_images([Path(d.frozen_image) for g in pt.guests for d in g.disks])
    assert after.consistent and after.max >= ack_before > before.max

    # 4. Refusals leave the chain as it is.
    ch = b.chain("vda")
    with pytest.raises(StateError, match="cannot fold"):
        b.fold("vda", ch[-1], ch[0])  # the active image
    with pytest.raises(StateError, match="cannot fold"):
        b.fold("vda", ch[1], ch[-1])  # upside down
    with pytest.raises(StateError, match="no disk vdz"):
        b.chain("vdz")
    # Someone else's slow commit job holds the chain: ours is refused, one line, chain unchanged.
    top_node, frozen_node = _node_of(vm.guardian, ch[0]), _node_of(vm.guardian, ch[1])
    with QMPConnection(vm.guardian) as other:  # the guardian monitor, as another client would
        other.execute(
            "block-commit", {"job-id": "other", "device": top_node, "top-node": frozen_node, "base-node": "disk0", "speed": 1}
        )
        with pytest.raises(QMPError, match="chain is unchanged") as info:
            b.fold("vda", ch[-1], ch[1])
        assert "\n" not in str(info.value)
        assert b.chain("vda") == ch
        other.execute("job-cancel", {"id": "other"})
        deadline = time.monotonic() + 10
        while any(j["id"] == "other" for j in other.execute("query-jobs")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert b.chain("vda") == ch and _running(vm.guardian)
    timed_fold(b, "vda", ch[-1], ch[1])
    assert b.chain("vda") == (ch[0], ch[-1])
    assert _query(vm.guardian, "query-jobs") == []
    vm.progress()
    print(f"\nfold over QMP (block-commit + cleanup), 2 disks: {', '.join(f'{x:.0f}' for x in fold_ms)} ms")


@pytest.mark.slow
@pytest.mark.parametrize("fence", ["none", "suspend"])
@pytest.mark.parametrize("ndisks", [2, 4, 8])
def test_hundred_points(bare_vm: VMFactory, backends: list[QMPBackend], ndisks: int, fence: str) -> None:
    """100 consecutive points, each checked on its frozen images; chains folded back to 2 every 10 points."""
    vm = bare_vm(disks=ndisks, name=f"hundred{ndisks}")
    b = QMPBackend(vm.qmp, guardian_socket=vm.guardian)
    backends.append(b)
    targets = [_target(i) for i in range(ndisks)]
    consistent = 0
    holds: list[float] = []
    cuts: list[float] = []
    folds: list[float] = []
    maxima: list[int] = []
    t_start = time.monotonic()
    for i in range(1, 101):
        ack_before = vm.last_ack()
        pt = take_point([b], fence=fence)
        cuts.append(pt.cut_ms)
        if pt.fence_ms is not None:
            holds.append(pt.fence_ms)
        verdict = check_images([Path(d.frozen_image) for g in pt.guests for d in g.disks])
        consistent += verdict.consistent and verdict.max >= ack_before
        maxima.append(verdict.max)
        if i % 10 == 0:
            t0 = time.monotonic()
            for t in targets:
                ch = b.chain(t)
                assert len(ch) == (11 if i == 10 else 12)  # 10 new overlays on the base (and the last active)
                b.fold(t, ch[-1], ch[1])
                assert len(b.chain(t)) == 2
            folds.append((time.monotonic() - t0) * 1000.0)
    assert _running(vm.guardian)
    assert len(list(vm.directory.glob("*.cgrep-*"))) == ndisks
    hold = f", hold median {statistics.median(holds):.1f} ms (max {max(holds):.1f})" if holds else ""
    print(
        f"\n{ndisks} disks, fence {fence}: consistent {consistent}/100, cut median {statistics.median(cuts):.1f} ms{hold}, "
        f"fold of 10 layers x {ndisks} disks median {statistics.median(folds):.0f} ms, total {time.monotonic() - t_start:.0f} s"
    )
    assert consistent == 100
    assert maxima == sorted(maxima)
    vm.progress()
