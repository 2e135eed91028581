"""The CLI's contract: bad input gives one line, a distinct exit code, and changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from libvirt_cgrep.cli import run
from libvirt_cgrep.errors import EXIT_CODES, CgrepError, InconsistentError, exit_code_for
from libvirt_cgrep.lab import domain as labdom
from tests.conftest import unique_name

HOSTILE = ["../etc", "a/b", "a b", "x;reboot", "$(id)", "`id`", "..", "a..b", "-rf", "", "x" * 64, "n\nx", "é"]


def test_exit_codes_are_distinct() -> None:
    leaves = {cls: code for cls, code in EXIT_CODES.items() if cls is not CgrepError}
    named = [code for cls, code in leaves.items() if cls.__name__ != "CheckError"]
    assert len(named) == len(set(named))
    assert exit_code_for(InconsistentError("x")) == 1
    assert exit_code_for(RuntimeError("x")) == 70


def test_help_reads_like_a_man_page(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section in ("verbs:", "exit status:", "environment:", "files:", "examples:", "guest pauses:"):
        assert section in out


def test_readme_cli_reference_matches_the_parser() -> None:
    """README.md's CLI reference is generated from the parser ('make readme'); it cannot drift."""
    from libvirt_cgrep.cli import reference

    assert reference.main(["--check"]) == 0, "README.md's CLI reference is stale: run 'make readme'"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name for p in labdom.lab_root().glob("*")} if labdom.lab_root().exists() else set()
    assert run(["lab", "up", name, "--disks", "1"]) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("virt-cgrep: error:")
    after = {p.name for p in labdom.lab_root().glob("*")} if labdom.lab_root().exists() else set()
    assert before == after


@pytest.mark.parametrize(
    "args",
    [
        ["lab", "up", "ok1", "--size", "12Q"],
        ["lab", "up", "ok1", "--size", "0"],
        ["lab", "up", "ok1", "--size", "-5M"],
        ["lab", "up", "ok1", "--disks", "0"],
        ["lab", "up", "ok1", "--disks", "99"],
        ["lab", "up", "ok1", "--disks", "two"],
        ["lab", "up", "ok1", "--bs", "1000"],
        ["lab", "up", "ok1", "--rate", "-1"],
        ["lab", "check"],
        ["failback", "g", "--target", "/nonexistent", "--to", "ssh://h/x", "--home-uri", "qemu:///system"],
        ["nosuchverb"],
    ],
)
def test_bad_values_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(args) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1


def test_unknown_domain(conn: libvirt.virConnect, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["-c", "qemu:///system", "lab", "status", "no-such-domain-x"]) == 65
    assert run(["lab", "down", "no-such-domain-x"]) == 65
    assert run(["lab", "check", "--domain", "no-such-domain-x"]) == 65
    assert "not found" in capsys.readouterr().err


def test_unreadable_image_cannot_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["lab", "check", str(tmp_path / "missing.qcow2")]) == 2
    (tmp_path / "garbage.qcow2").write_bytes(b"QFI\xfb" + b"\xff" * 600)
    assert run(["lab", "check", str(tmp_path / "garbage.qcow2")]) == 2


def test_non_lab_domain_is_left_alone(conn: libvirt.virConnect, capsys: pytest.CaptureFixture[str]) -> None:
    name = unique_name("plain")
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os></domain>"""
    dom = conn.defineXML(xml)
    try:
        assert run(["lab", "down", name]) == 66
        assert run(["lab", "status", name]) == 66
        assert conn.lookupByName(name).name() == name
    finally:
        dom.undefine()


def test_console_script_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "libvirt_cgrep", "version", "--json"], capture_output=True, text=True, check=True)
    assert '"version"' in out.stdout
