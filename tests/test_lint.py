"""The code stays lint- and type-clean (the same checks as `tox -e lint,type`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_clean() -> None:
    for args in (["check", "libvirt_cgrep", "tests", "bench"], ["format", "--check", "libvirt_cgrep", "tests", "bench"]):
        out = subprocess.run([str(BIN / "ruff"), *args], cwd=ROOT, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_clean() -> None:
    out = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
