"""Output for the CLI: JSON for machines, short aligned tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (one document, newline-terminated)."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """Render rows as a left-aligned table; ``columns`` is (key, heading) pairs."""
    head = [h for _, h in columns]
    body = [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head, *body]]
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> None:
    print(table(rows, columns))
