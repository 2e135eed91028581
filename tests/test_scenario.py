"""The demo's story (make demo, vagrant/scenario) runs end to end and every one of its checks passes.

Two ways: ``--local`` (make demo, CI), and the two-host mode of the Vagrant lab
(``--replica-host/--primary-host``) with both hosts this one behind a loopback
sshd: the replica site's steps run in ssh sessions, in a working directory of
their own, and the original site's receiver starts the originals at failback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_cgrep.lab import domain as labdom
from libvirt_cgrep.lab.sshd import Sshd


@pytest.mark.parametrize("mode", ["local", "two-hosts"])
def test_scenario_checks_pass(mode: str, sshd: Sshd) -> None:
    root = labdom.lab_root() / "scenario-test"
    replica_root = labdom.lab_root() / "scenario-test-replica-site"
    base = [sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "scenario.py")]
    argv = [*base, "--rpo", "30s", "--points", "2", "--root", str(root)]
    env = None
    sites = ["--local"]
    if mode == "two-hosts":
        host = f"root@127.0.0.1:{sshd.port}"
        sites = ["--replica-host", host, "--primary-host", host, "--replica-root", str(replica_root)]
        env = {**os.environ, **sshd.env()}
    argv += sites
    clean = [*base, "--clean", "--root", str(root), *sites]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=1500, check=False, env=env)
        summary = json.loads((root / "summary.json").read_text())
        failed = [c for c in summary["checks"] if not c["ok"]]
        for c in failed:  # whole, on the captured output (the assertion's repr is cut short)
            print(f"FAILED CHECK {c['step']}: {c['detail']}")
        assert out.returncode == 0 and not failed, (failed, out.stdout[-4000:], out.stderr[-2000:])
        steps = {c["step"] for c in summary["checks"]}
        for step in (
            "test-cleanup leaves nothing",
            "failover: write order across both VMs",
            "reverse ships only the changes",
            "failback: originals run with every write",
        ):
            assert step in steps
        if mode == "two-hosts":  # the replica site worked in its own directory, through ssh
            assert "[replica]$ virt-cgrep test-cleanup" in out.stdout
            assert (replica_root / "replica" / "demo" / "points").is_dir()
            assert not (root / "replica").exists()
            subprocess.run(clean, capture_output=True, timeout=600, check=True, env=env)
            assert not replica_root.exists() and not root.exists()
        print(f"scenario ({mode}): {len(steps)} checks passed in {summary['seconds']:.0f} s; RPO held {summary['rpo_within']}")
    finally:
        subprocess.run(clean, capture_output=True, timeout=600, check=False, env=env)
        shutil.rmtree(replica_root, ignore_errors=True)
