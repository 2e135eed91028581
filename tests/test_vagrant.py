"""The Vagrant lab's files: the Vagrantfile validates and the provisioning script parses."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parents[1] / "vagrant"


def test_provision_script_parses() -> None:
    subprocess.run(["bash", "-n", str(VAGRANT_DIR / "provision.sh")], check=True)


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (Debian: vagrant vagrant-libvirt)")
def test_vagrantfile_validates(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    r = subprocess.run(
        ["vagrant", "validate"], check=False, cwd=VAGRANT_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
