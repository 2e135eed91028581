"""The code stays lint- and type-clean, and its imports point down (the same checks as `tox -e lint,type`)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_clean() -> None:
    for args in (["check", "libvirt_cgrep", "tests", "bench"], ["format", "--check", "libvirt_cgrep", "tests", "bench"]):
        out = subprocess.run([str(BIN / "ruff"), *args], cwd=ROOT, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_clean() -> None:
    out = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


LINT_IMPORTS = BIN / "lint-imports"


def test_layers_contract_kept() -> None:
    """Every import points down (pyproject.toml's import-linter contracts; docs/ARCHITECTURE.md)."""
    out = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("core/names.py", "import libvirt_cgrep.engine.point", "layers"),  # core -> engine: upward
        ("replica/store.py", "import libvirt_cgrep.server.receiver", "layers"),  # library -> server
        ("continuous/mirror.py", "import libvirt_cgrep.recovery.failover", "layers"),  # two independent siblings
        ("agent/db.py", "import libvirt_cgrep.cli", "layers"),  # the service -> the operator layer
        ("engine/point.py", "import libvirt", "libvirt binding"),  # the binding outside the adapters
    ],
)
def test_layers_contract_catches_a_violation(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """The negative control: the same contracts on a copy with one bad import added must fail."""
    shutil.copytree(ROOT / "libvirt_cgrep", tmp_path / "libvirt_cgrep", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "libvirt_cgrep" / module
    target.write_text(f"{line}  # noqa\n" + target.read_text())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and broken in out.stdout, out.stdout


def _imports_inside_functions(tree: ast.AST) -> list[int]:
    found: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [n.lineno for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
    return found


def test_no_imports_inside_functions_outside_cli() -> None:
    """No import hides in a function to dodge a cycle; only cli/ imports lazily, for start-up time."""
    offenders = []
    for path in sorted((ROOT / "libvirt_cgrep").rglob("*.py")):
        rel = path.relative_to(ROOT / "libvirt_cgrep")
        if rel.parts[0] == "cli":
            continue
        lines = _imports_inside_functions(ast.parse(path.read_text()))
        offenders += [f"libvirt_cgrep/{rel}:{n}" for n in lines]
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    """No two modules of ours import each other, directly or through others (cli/ included)."""
    graph = grimp.build_graph("libvirt_cgrep")
    modules = sorted(graph.modules)
    edges = {m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in graph.modules) for m in modules}
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    assert not cycles, cycles
