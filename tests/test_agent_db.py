"""The agent's state DB writes a group's row only when it changes (plus a heartbeat). SQLite only, no QEMU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from libvirt_cgrep.agent.db import HEARTBEAT, GroupRow, StateDB, db_path


def test_group_row_written_on_change_and_heartbeat(tmp_path: Path) -> None:
    db = StateDB(db_path(tmp_path))
    t = 1000.0
    row = GroupRow("g", ("vm",), "/r", 60.0, "ok", "p1", t - 5, t + 30, 0, None, 1.5, 10, t)
    assert db.upsert_group(row)
    before = db.conn.total_changes
    # 5 ticks a second for less than the heartbeat: nothing changed, nothing written
    ticks = [replace(row, updated=t + i / 5) for i in range(1, int(HEARTBEAT * 5))]
    assert not any(db.upsert_group(r) for r in ticks)
    assert db.conn.total_changes == before
    # a change is written at once, and read back as written
    assert db.upsert_group(replace(row, state="at-risk", updated=t + 1))
    assert db.groups()[0].state == "at-risk"
    # an unchanged row is rewritten after the heartbeat, so 'status' sees the agent alive
    assert db.upsert_group(replace(row, state="at-risk", updated=t + 1 + HEARTBEAT))
    assert db.groups()[0].updated == t + 1 + HEARTBEAT
    # a next run already due moves with 'now' at every tick (no point yet): still no write
    due = replace(row, next_run=t + 20, updated=t + 20)
    assert db.upsert_group(due)
    assert not db.upsert_group(replace(due, next_run=t + 20.2, updated=t + 20.2))
    # a dropped group is written again when it comes back
    db.drop_groups_except([])
    assert db.groups() == []
    assert db.upsert_group(replace(due, updated=t + 21))
    db.close()


def test_open_alert_is_the_last_raise_without_a_clear(tmp_path: Path) -> None:
    db = StateDB(db_path(tmp_path))
    assert db.open_alert("g", "group-blocked", "group-unblocked") is None
    db.add_alert("g", "group-blocked", 1.0, "member b is shutoff")
    db.add_alert("h", "group-unblocked", 2.0, "another group")
    db.add_alert("g", "rpo-violated", 3.0, "not this pair")
    assert db.open_alert("g", "group-blocked", "group-unblocked") == "member b is shutoff"
    db.add_alert("g", "group-unblocked", 4.0, "cleared")
    assert db.open_alert("g", "group-blocked", "group-unblocked") is None
    db.close()
