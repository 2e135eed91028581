"""The man page and the bash completion: generated from the parser, checked in, and they cannot drift.

Pure tests (no libvirt, no QEMU): the completion is driven with a stub ``virsh`` and a stub ``virt-cgrep``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from libvirt_cgrep.cli import build_parser, completion, manpage, reference

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "completion" / "virt-cgrep.bash"
PAGE = ROOT / "man" / "virt-cgrep.1"


def test_manpage_matches_the_parser() -> None:
    """man/virt-cgrep.1 is generated from the parser ('make man'); it cannot drift."""
    assert manpage.main(["--check"]) == 0, "man/virt-cgrep.1 is stale: run 'make man'"


def test_completion_matches_the_parser() -> None:
    """completion/virt-cgrep.bash is generated from the parser ('make completion'); it cannot drift."""
    assert completion.main(["--check"]) == 0, "completion/virt-cgrep.bash is stale: run 'make completion'"


def _verb_paths() -> list[str]:
    return [" ".join(path) for path, _, _ in reference.verbs(build_parser())]


def test_manpage_has_every_verb_and_option() -> None:
    text = PAGE.read_text()
    for verb in _verb_paths():
        assert f'.SS "{manpage.esc(verb)}"' in text, verb
    for _, _, sub in reference.verbs(build_parser()):
        for action in sub._actions:
            for opt in action.option_strings:
                if isinstance(action, argparse._HelpAction):
                    continue  # every verb has -h/--help: the SYNOPSIS says so once
                assert f"\\fB{manpage.esc(opt)}\\fR" in text, (sub.prog, opt)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is missing (Debian package groff-base, with man-db)")
def test_manpage_renders_without_warnings() -> None:
    out = subprocess.run(
        ["groff", "-man", "-ww", "-z", "-Tutf8", str(PAGE)],
        capture_output=True,
        text=True,
        check=False,
        env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_manpage_escapes_roff() -> None:
    assert manpage.esc(".x\n'y\\z-w") == "\\&.x\n\\&'y\\ez\\-w"


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    """A bin dir with a ``virsh`` listing two domains (and logging its argv) and a ``virt-cgrep`` status."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "virsh").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/virsh.argv\nprintf "db1\\nweb1\\n"\n')
    status = (
        '[\n  {\n    "group": "app1",\n    "members": "db1,web1"\n  },\n  {\n    "group": "solo",\n    "members": "x"\n  }\n]'
    )
    (bindir / "virt-cgrep").write_text(f"#!/bin/sh\n[ \"$1\" = status ] && cat <<'EOF'\n{status}\nEOF\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    return bindir


def complete(words: list[str], cwd: Path | None = None, path: Path | None = None) -> list[str]:
    """COMPREPLY of ``_virt_cgrep`` for the command line ``words`` (the last one being completed)."""
    env = {"PATH": f"{path}:/usr/bin:/bin" if path else "/usr/bin:/bin", "LC_ALL": "C"}
    script = 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _virt_cgrep; printf "%s\\n" "${COMPREPLY[@]}"'
    out = subprocess.run(
        ["bash", "-c", script, "_", str(SCRIPT), *words], capture_output=True, text=True, check=True, cwd=cwd, env=env
    )
    return [w for w in out.stdout.splitlines() if w]


def test_completes_verbs_and_nested_verbs() -> None:
    top = [p for p in _verb_paths() if " " not in p]
    assert complete(["virt-cgrep", ""]) == top
    assert complete(["virt-cgrep", "te"]) == ["test-failover", "test-cleanup"]
    assert complete(["virt-cgrep", "-c", "qemu:///system", "-v", "prot"]) == ["protect"]
    assert complete(["virt-cgrep", "lab", ""]) == ["build", "up", "down", "list", "status", "check"]
    assert complete(["virt-cgrep", "hooks", "un"]) == ["uninstall"]


def test_completes_each_verbs_options() -> None:
    parser = build_parser()
    for path, _, sub in reference.verbs(parser):
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            continue
        want = sorted(o for a in sub._actions for o in a.option_strings if o.startswith("--"))
        assert sorted(complete(["virt-cgrep", *path, "--"])) == want, path
    assert complete(["virt-cgrep", "sync", "--keep-"]) == ["--keep-hourly", "--keep-daily"]
    assert complete(["virt-cgrep", "--con"]) == ["--connect"]


def test_completes_choices_and_takes_option_values_as_values() -> None:
    assert complete(["virt-cgrep", "point", "--fence", ""]) == ["none", "suspend"]
    assert complete(["virt-cgrep", "lab", "up", "--mode", "s"]) == ["scan"]
    assert complete(["virt-cgrep", "protect", "--mode", ""]) == ["snapshot", "continuous"]
    assert complete(["virt-cgrep", "sync", "--keep", "--"]) == []  # a count, not an option


def test_completes_domains_groups_and_targets(stubs: Path, tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv-file").write_text("")
    assert complete(["virt-cgrep", "point", ""], path=stubs) == ["db1", "web1"]
    assert complete(["virt-cgrep", "-c", "qemu+ssh://h/system", "protect", "w"], path=stubs) == ["web1"]
    assert (tmp_path / "virsh.argv").read_text().splitlines()[-1] == "-c qemu+ssh://h/system list --all --name"
    assert complete(["virt-cgrep", "history", ""], path=stubs) == ["app1", "solo"]
    assert complete(["virt-cgrep", "agent", "--only", "s"], path=stubs) == ["solo"]
    assert complete(["virt-cgrep", "failover", ""], path=stubs) == ["app1", "solo", "db1", "web1"]
    assert complete(["virt-cgrep", "sync", "db1", "--target", "sr"], cwd=tmp_path, path=stubs) == ["srv"]
    assert complete(["virt-cgrep", "sync", "db1", "--target", "s"], cwd=tmp_path, path=stubs) == ["srv", "ssh://"]
    assert complete(["virt-cgrep", "points", "ssh://h/"], cwd=tmp_path, path=stubs) == []
    assert complete(["virt-cgrep", "sync", "--group", "a"], path=stubs) == ["app1"]
    assert complete(["virt-cgrep", "lab", "down", "d"], path=stubs) == ["db1"]
