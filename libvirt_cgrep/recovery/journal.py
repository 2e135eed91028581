"""The recovery journal store: one JSON file per run in ``TARGET/SET/recovery/RUN.json``.

Guarantees:

- a journal is written whole (temporary file, fsync, rename: ``adapters/fs.save_file``),
  mode 0600, so a reader sees the previous or the new version, never a mix;
- only files named by a valid run id are journals (``core/recovery.valid_run_id``):
  other files of ``recovery/`` (modes, a pending failback start) are never listed;
- :func:`locked` is the target's writer lock (``replica/store.Store``), waited for:
  a replication cycle holds it for seconds. Holds registered under it cannot be
  pruned (the store reads the same journals to find held points).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from libvirt_cgrep.adapters.fs import save_file
from libvirt_cgrep.core import recovery as rc
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.errors import ConflictError
from libvirt_cgrep.replica.store import Store

#: How long :func:`locked` waits for the target's writer lock.
LOCK_WAIT_S = 120.0


def utcnow() -> str:
    """The time now as a journal timestamp (ISO 8601, UTC, ``Z``)."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@contextlib.contextmanager
def locked(root: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[Store]:
    """The target's writer lock, waited for (a replication cycle holds it for seconds)."""
    end = time.monotonic() + wait_s
    while True:
        try:
            store = Store.open(root, create=False)
            break
        except ConflictError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    try:
        yield store
    finally:
        store.close()


def recovery_dir(root: Path, set_name: str) -> Path:
    """``TARGET/SET/recovery``: the set's journals and the run directories."""
    return root / validate_name(set_name, "set name") / "recovery"


def journal_path(root: Path, set_name: str, run_id: str) -> Path:
    return recovery_dir(root, set_name) / f"{run_id}.json"


def save_journal(root: Path, j: rc.Journal) -> None:
    """Write run ``j``'s journal whole (the recovery directory is created if needed)."""
    rdir = recovery_dir(root, j.set_name)
    rdir.mkdir(mode=0o755, exist_ok=True)
    save_file(journal_path(root, j.set_name, j.run), (json.dumps(j.to_dict(), indent=1) + "\n").encode(), 0o600)


def remove_journal(root: Path, j: rc.Journal) -> None:
    """Remove run ``j``'s journal (nothing if it is gone already)."""
    journal_path(root, j.set_name, j.run).unlink(missing_ok=True)


def journals(root: Path, set_name: str) -> list[rc.Journal]:
    """Every run journal of a set, oldest first."""
    rdir = recovery_dir(root, set_name)
    out = []
    for f in sorted(rdir.glob("*.json")) if rdir.is_dir() else ():
        if rc.valid_run_id(f.stem):
            out.append(rc.journal_from_dict(json.loads(f.read_bytes())))
    return out


def all_journals(root: Path) -> list[rc.Journal]:
    """Every run journal of every set on the target."""
    store = Store.open(root, readonly=True)
    return [j for s in store.sets() for j in journals(root, s)]


def unfinished(root: Path, ro: Store, name: str, kind: str) -> list[rc.Journal]:
    """Unfinished runs of ``kind`` for set ``name``, or for the sets whose runs recovered domain ``name``."""
    sets = (
        [name]
        if name in ro.sets()
        else [s for s in ro.sets() if any(d.original == name for j in journals(root, s) for d in j.domains)]
    )
    return [j for s in sets for j in journals(root, s) if j.kind == kind and j.state != "done"]
