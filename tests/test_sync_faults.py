"""Faults during `virt-cgrep sync`: SIGKILL while shipping, committing and folding; ENOSPC on the target; a cut ssh link.

After each fault: the guest still runs, every listed point verifies (write order
included), the faulted cycle's point is absent (or, after its commit, present
and whole), and the next ``sync`` completes with deltas only (no full resync),
holds every write acknowledged before it started, and leaves the primary chains
at most 3 long.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import libvirt

from libvirt_cgrep.lab import domain as labdom
from tests.conftest import SSHD, URI, LabFactory, wait_progress
from tests.test_sync import chain_lengths, cli


class BackgroundSync:
    """A ``sync --json`` running in the background; its stderr lines (JSON progress) are collected as they come."""

    def __init__(self, name: str, target: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "libvirt_cgrep", "-c", URI, "sync", name, "--target", target, "--json", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def first_progress(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the first JSON progress line on stderr (shipping has started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                assert self.proc.poll() is None, f"sync ended ({self.proc.returncode}) before shipping: {''.join(self.stderr)}"
                continue
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and "progress" in obj:
                    return obj
        raise AssertionError(f"no progress line within {timeout} s: {''.join(self.stderr)}")

    def kill(self) -> None:
        """SIGKILL the sync process itself (not its children)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        """Wait for the end; (exit code, stdout, stderr)."""
        rc = self.proc.wait(timeout=timeout)
        self._pump.join(timeout=10)
        assert self.proc.stdout is not None
        return rc, self.proc.stdout.read(), "".join(self.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                if f is not None:
                    f.close()


# ---------------------------------------------------------------------------- checks


def point_ids(target: str) -> list[str]:
    return [p["id"] for p in json.loads(cli("points", target, "--json").stdout)]


def verify_all(target: str, point: str | None = None) -> list[dict[str, Any]]:
    """Every listed point (or ``point``) is whole and write-order consistent."""
    extra = ("--point", point) if point else ()
    out = cli("verify", target, "--write-order", "--json", *extra, check=False)
    results: list[dict[str, Any]] = json.loads(out.stdout)
    assert out.returncode == 0 and results, (out.stdout, out.stderr)
    for r in results:
        assert r["ok"] and r["write_order"]["consistent"], r
    return results


def guest_runs(conn: libvirt.virConnect, vm: labdom.LabDomain) -> int:
    """The domain is running and its workload progresses; returns the last acknowledged record."""
    assert labdom.get(conn, vm.name).state == "running"
    return wait_progress(vm.directory / "console.log", records=10)


def one_error_line(stderr: str) -> str:
    """The failed sync's error: exactly one ``virt-cgrep: error:`` line (besides JSON progress lines)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("virt-cgrep: error: "), stderr
    return lines[0]


def replica_files(root: Path) -> tuple[set[Path], set[Path]]:
    """(every image file, the images the committed manifests name) of a local target directory."""
    files = {p for p in root.glob("*/disks/*/*/*") if p.is_file()}  # pathlib's * matches dot files too
    named: set[Path] = set()
    for manifest in root.glob("*/points/*.json"):
        named |= {manifest.parent.parent / d["image"] for d in json.loads(manifest.read_text())["disks"]}
    return files, named


def receivers(path: Path) -> list[str]:
    """Processes serving ``receive PATH`` (the local child, or the far side of an ssh link)."""
    # the far side: 'python -m libvirt_cgrep receive PATH'; a local target: the lean 'libvirt_cgrep.server.serve PATH'
    pattern = f"libvirt_cgrep( receive|[.]server[.]serve)( --[a-z-]+)* {path}$"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return out.stdout.split()


def wait_no_receiver(path: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while receivers(path):
        assert time.monotonic() < t0 + timeout, f"a receiver of {path} survived: {receivers(path)}"
        time.sleep(0.1)
    print(f"receiver of {path.name} gone {time.monotonic() - t0:.1f} s after the fault")


def seed(conn: libvirt.virConnect, vm: labdom.LabDomain, target: str) -> str:
    res = json.loads(cli("sync", vm.name, "--target", target, "--json").stdout)
    assert all(d["full"] for d in res["disks"])
    assert max(chain_lengths(conn, vm.name)) <= 2
    return str(res["point_id"])


def next_sync(conn: libvirt.virConnect, vm: labdom.LabDomain, target: str, before: list[str]) -> dict[str, Any]:
    """The cycle after a fault: deltas only, holds every acknowledged write, chains back to at most 3."""
    acked = guest_runs(conn, vm)
    t0 = time.monotonic()
    res: dict[str, Any] = json.loads(cli("sync", vm.name, "--target", target, "--json").stdout)
    res["wall_s"] = time.monotonic() - t0
    assert [d["full"] for d in res["disks"]] == [False] * len(res["disks"]), res["disks"]
    assert res["parent"] == before[-1]
    assert max(chain_lengths(conn, vm.name)) <= 3
    assert point_ids(target) == [*before, res["point_id"]]
    verdict = verify_all(target, res["point_id"])[0]
    assert verdict["write_order"]["max"] >= acked, (verdict, acked)
    verify_all(target)
    guest_runs(conn, vm)
    return res


def clean_target(root: Path) -> None:
    """Only committed images remain: no staging file, no orphan of an uncommitted point."""
    files, named = replica_files(root)
    assert files == named, sorted(str(p) for p in files ^ named)
    assert not list(root.glob("*/prune-*.json"))


def write_for(vm: labdom.LabDomain, records: int) -> None:
    """Let the guest write ``records`` more records (several MiB for the next cycle to ship)."""
    wait_progress(vm.directory / "console.log", records=records, timeout=60)


# ---------------------------------------------------------------------------- faults


def test_sigkill_during_ship(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    vm = lab_vm(disks=2, tag="fship")
    root = tmp_path / "replica"
    target = str(root)
    first = seed(conn, vm, target)
    write_for(vm, 2000)  # ~8 MiB over both disks: ~8 s of shipping at 1 MiB/s
    bg = BackgroundSync(vm.name, target, "--bwlimit", "1M")
    try:
        shown = bg.first_progress()
        assert receivers(root), "the receiver child should be running while shipping"
        assert shown["done"] < shown["total"] or shown["progress"].endswith("/vda")
        bg.kill()
    finally:
        bg.close()
    # the receiver saw the link end: it discarded its staged images and exited
    wait_no_receiver(root)
    guest_runs(conn, vm)
    assert point_ids(target) == [first]
    verify_all(target)
    assert max(chain_lengths(conn, vm.name)) == 3  # the unshipped overlay stays until the next cycle
    next_sync(conn, vm, target, [first])
    clean_target(root)
    assert not list(root.glob("*/disks/*/*/.staging-*"))
    wait_no_receiver(root)


def test_sigkill_during_commit(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    vm = lab_vm(disks=2, tag="fcommit")
    root = tmp_path / "replica"
    target = str(root)
    first = seed(conn, vm, target)
    write_for(vm, 100)
    # the receiver exits right after renaming the images into place, before writing the manifest
    out = cli("sync", vm.name, "--target", target, "--json", check=False, env={"CGREP_FAULT_RECEIVER": "after-rename"})
    assert out.returncode != 0 and out.stdout == ""
    line = one_error_line(out.stderr)
    assert "receiver" in line, line
    guest_runs(conn, vm)
    assert point_ids(target) == [first]
    verify_all(target)
    files, named = replica_files(root)
    orphans = files - named
    assert len(orphans) == 2 and not any(p.name.startswith(".staging-") for p in orphans), orphans
    next_sync(conn, vm, target, [first])
    # opening the target for the next cycle removed the renamed but uncommitted images
    assert not any(p.exists() for p in orphans)
    clean_target(root)


def test_sigkill_during_fold(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    vm = lab_vm(disks=4, tag="ffold")
    root = tmp_path / "replica"
    target = str(root)
    first = seed(conn, vm, target)
    write_for(vm, 100)
    bg = BackgroundSync(vm.name, target, env={"CGREP_FAULT_BEFORE_FOLD_MS": "60000"})
    try:
        deadline = time.monotonic() + 60
        while len(ids := point_ids(target)) < 2:
            assert bg.proc.poll() is None, "".join(bg.stderr)
            assert time.monotonic() < deadline, "the faulted cycle never committed"
            time.sleep(0.2)
        bg.kill()
    finally:
        bg.close()
    wait_no_receiver(root)
    assert ids[0] == first
    committed = ids[1]
    guest_runs(conn, vm)
    assert point_ids(target) == [first, committed]
    verify_all(target)  # the committed point of the faulted cycle is whole
    assert chain_lengths(conn, vm.name) == [3] * 4  # committed but not folded
    res = next_sync(conn, vm, target, [first, committed])
    # the repair folded the committed layer: only what was written since that point was shipped
    assert res["changed_bytes"] > 0
    assert chain_lengths(conn, vm.name) == [2] * 4
    clean_target(root)


def _umount(path: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode == 0:
            return
        if subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode != 0:
            return
        time.sleep(0.2)
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_enospc_on_target(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path) -> None:
    # a slow writer on small disks: the seed and the catch-up cycle both fit in the tmpfs
    vm = lab_vm(disks=2, size=16 << 20, tag="fspace", rate=100)
    root = tmp_path / "replica"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48M,mode=0700", "tmpfs", str(root)], check=True)
    try:
        target = str(root)
        first = seed(conn, vm, target)
        # fill the target: first too full for the new point's empty images (ENOSPC while staging), then with
        # room for them but not for their data (ENOSPC while shipping, reported by qemu-nbd through NBD)
        filler = root / "filler"
        write_for(vm, 300)  # ~1.2 MiB to ship
        for reserve in (256 << 10, 512 << 10):
            filler.unlink(missing_ok=True)
            st = os.statvfs(root)
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - reserve)
            out = cli("sync", vm.name, "--target", target, "--json", check=False)
            assert out.returncode != 0 and out.stdout == ""
            line = one_error_line(out.stderr)
            assert "No space left on device" in line, line
            wait_no_receiver(root)
            guest_runs(conn, vm)
            assert point_ids(target) == [first]
            verify_all(target)
        # the second attempt's open removed the first one's leftovers, and its own failure discarded its images
        assert not list(root.glob("*/disks/*/*/.staging-*"))
        clean_target(root)
        filler.unlink()
        next_sync(conn, vm, target, [first])
        clean_target(root)
        wait_no_receiver(root)
    finally:
        _umount(root)


def test_ssh_link_cut_mid_transfer(conn: libvirt.virConnect, lab_vm: LabFactory, tmp_path: Path, ssh_env: SSHD) -> None:
    vm = lab_vm(disks=2, tag="fssh")
    root = tmp_path / "replica"
    target = ssh_env.target(root)
    first = seed(conn, vm, target)
    write_for(vm, 2000)
    bg = BackgroundSync(vm.name, target, "--bwlimit", "1M")
    try:
        bg.first_progress()
        ssh = subprocess.run(["pgrep", "-P", str(bg.proc.pid), "-x", "ssh"], capture_output=True, text=True, check=False)
        pids = ssh.stdout.split()
        assert len(pids) == 1, ssh
        os.kill(int(pids[0]), signal.SIGKILL)
        rc, stdout, stderr = bg.finish()
    finally:
        bg.close()
    assert rc != 0 and stdout == ""
    line = one_error_line(stderr)
    assert "link" in line and target in line, line
    # the far side saw the channel close: its receiver discarded the staged images and exited
    wait_no_receiver(root)
    assert not list(root.glob("*/disks/*/*/.staging-*"))
    guest_runs(conn, vm)
    assert point_ids(target) == [first]
    verify_all(target)
    next_sync(conn, vm, target, [first])
    clean_target(root)
