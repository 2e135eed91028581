"""The agent's state in SQLite (WAL): groups, cycles, alerts.

The agent is the only writer; ``virt-cgrep status`` and ``history`` read it
concurrently (WAL lets readers run while the agent writes). Losing this file
loses history, never a recovery point: points live on the targets.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from libvirt_cgrep.errors import NotFoundError

DEFAULT_STATE_DIR = Path("/var/lib/libvirt-cgrep")
#: A group's unchanged row is rewritten this often (s), so ``status`` sees the agent alive (it warns after 30 s).
HEARTBEAT = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY,
    members TEXT NOT NULL,
    target TEXT NOT NULL,
    rpo REAL NOT NULL,
    state TEXT NOT NULL,
    newest_point TEXT,
    newest_time REAL,
    next_run REAL,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_duration REAL,
    last_bytes INTEGER,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    grp TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    ok INTEGER NOT NULL,
    point_id TEXT,
    bytes INTEGER,
    changed INTEGER,
    hold_ms REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS cycles_grp ON cycles (grp, id);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    grp TEXT NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    message TEXT NOT NULL
);
"""


def state_dir() -> Path:
    return Path(os.environ.get("CGREP_STATE_DIR", str(DEFAULT_STATE_DIR)))


def db_path(directory: Path | None = None) -> Path:
    return (directory or state_dir()) / "agent.db"


@dataclass(frozen=True)
class GroupRow:
    name: str
    members: tuple[str, ...]
    target: str
    rpo: float
    state: str
    newest_point: str | None
    newest_time: float | None
    next_run: float | None
    failures: int
    last_error: str | None
    last_duration: float | None
    last_bytes: int | None
    updated: float
    #: each member's state (running, paused, shutoff, missing), in the order of ``members``
    member_states: tuple[str, ...] = ()


def _members_json(row: GroupRow) -> str:
    return json.dumps({"names": list(row.members), "states": list(row.member_states)})


def _members_parse(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The members column: a list of names (older agents) or names and states."""
    v = json.loads(text)
    if isinstance(v, list):
        return tuple(v), ()
    return tuple(v["names"]), tuple(v.get("states", ()))


_KEY_FIELDS = tuple(f.name for f in fields(GroupRow) if f.name not in ("updated", "next_run"))


def _unchanged_key(row: GroupRow) -> tuple[object, ...]:
    """What makes a row worth writing: all but ``updated``; a next run already due is just "due"."""
    due = row.next_run is not None and row.next_run <= row.updated
    return (*(getattr(row, f) for f in _KEY_FIELDS), -1.0 if due else row.next_run)


class StateDB:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        if readonly and not path.exists():
            raise NotFoundError(f"no agent state at {path} (has 'virt-cgrep agent' run on this host?)")
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self.conn = sqlite3.connect(uri, uri=True, timeout=5, check_same_thread=False, isolation_level=None)
        self._written: dict[str, tuple[tuple[object, ...], float]] = {}
        if not readonly:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
            os.chmod(path, 0o600)

    def close(self) -> None:
        self.conn.close()

    def upsert_group(self, row: GroupRow) -> bool:
        """Write a group's row if it changed (``updated`` aside) or every :data:`HEARTBEAT` s; True if written."""
        key = _unchanged_key(row)
        last = self._written.get(row.name)
        if last is not None and last[0] == key and row.updated - last[1] < HEARTBEAT:
            return False
        self._written[row.name] = (key, row.updated)
        self.conn.execute(
            "INSERT INTO groups VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
            "members=excluded.members, target=excluded.target, rpo=excluded.rpo, state=excluded.state, "
            "newest_point=excluded.newest_point, newest_time=excluded.newest_time, next_run=excluded.next_run, "
            "failures=excluded.failures, last_error=excluded.last_error, last_duration=excluded.last_duration, "
            "last_bytes=excluded.last_bytes, updated=excluded.updated",
            (
                row.name,
                _members_json(row),
                row.target,
                row.rpo,
                row.state,
                row.newest_point,
                row.newest_time,
                row.next_run,
                row.failures,
                row.last_error,
                row.last_duration,
                row.last_bytes,
                row.updated,
            ),
        )
        return True

    def drop_groups_except(self, names: Sequence[str]) -> None:
        marks = ",".join("?" for _ in names) or "''"
        self.conn.execute(f"DELETE FROM groups WHERE name NOT IN ({marks})", list(names))
        self._written = {k: v for k, v in self._written.items() if k in names}

    def groups(self) -> list[GroupRow]:
        rows = self.conn.execute("SELECT * FROM groups ORDER BY name").fetchall()
        out = []
        for r in rows:
            names, states = _members_parse(r[1])
            out.append(replace(GroupRow(r[0], names, *r[2:]), member_states=states))
        return out

    def add_cycle(
        self,
        grp: str,
        *,
        started: float,
        ended: float,
        ok: bool,
        point_id: str | None,
        nbytes: int | None,
        changed: int | None,
        hold_ms: float | None,
        error: str | None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO cycles (grp, started, ended, ok, point_id, bytes, changed, hold_ms, error) VALUES (?,?,?,?,?,?,?,?,?)",
            (grp, started, ended, int(ok), point_id, nbytes, changed, hold_ms, error),
        )
        self.conn.execute(
            "DELETE FROM cycles WHERE grp = ? AND id <= (SELECT MAX(id) - 10000 FROM cycles WHERE grp = ?)", (grp, grp)
        )

    def cycles(self, grp: str, limit: int = 20) -> list[dict[str, Any]]:
        cur = self.conn.execute(
            "SELECT started, ended, ok, point_id, bytes, changed, hold_ms, error FROM cycles "
            "WHERE grp = ? ORDER BY id DESC LIMIT ?",
            (grp, limit),
        )
        keys = ("started", "ended", "ok", "point_id", "bytes", "changed", "hold_ms", "error")
        return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()][::-1]

    def durations(self, grp: str, limit: int = 5) -> list[float]:
        cur = self.conn.execute(
            "SELECT ended - started FROM cycles WHERE grp = ? AND ok = 1 ORDER BY id DESC LIMIT ?", (grp, limit)
        )
        return [float(r[0]) for r in cur.fetchall()][::-1]

    def add_alert(self, grp: str, kind: str, time: float, message: str) -> None:
        self.conn.execute("INSERT INTO alerts (grp, kind, time, message) VALUES (?,?,?,?)", (grp, kind, time, message))

    def open_alert(self, grp: str, raised: str, cleared: str) -> str | None:
        """The message of ``grp``'s last ``raised`` alert if no ``cleared`` alert came after it (a pair still open)."""
        cur = self.conn.execute(
            "SELECT kind, message FROM alerts WHERE grp = ? AND kind IN (?, ?) ORDER BY id DESC LIMIT 1", (grp, raised, cleared)
        )
        r = cur.fetchone()
        return str(r[1]) if r is not None and r[0] == raised else None

    def alerts(self, grp: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if grp:
            cur = self.conn.execute(
                "SELECT grp, kind, time, message FROM alerts WHERE grp = ? ORDER BY id DESC LIMIT ?", (grp, limit)
            )
        else:
            cur = self.conn.execute("SELECT grp, kind, time, message FROM alerts ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(zip(("group", "kind", "time", "message"), r, strict=True)) for r in cur.fetchall()][::-1]
