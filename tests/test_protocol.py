"""The replication stream's optional features: offered by the receiver, checked on arrival."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.link import Link, parse_target


def test_the_local_receiver_offers_datav_and_copyv(tmp_path: Path) -> None:
    link = Link(parse_target(str(tmp_path / "t")))
    try:
        assert {"datav", "copyv"} <= link.features
    finally:
        link.close()


def test_a_receiver_not_started_by_a_local_sync_refuses_copyv(tmp_path: Path) -> None:
    """``virt-cgrep receive`` (what ssh runs) offers no copyv, and refuses one: a sender names no file of the far side."""
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "receive", str(tmp_path / "t")],
        input=proto.MAGIC
        + struct.pack(">I", proto.VERSION)
        + _msg({"op": "copyv", "domain": "d", "target": "vda", "path": "/etc/passwd", "ext": [[0, 0, 65536]]}),
        capture_output=True,
        timeout=60,
        check=False,
    )
    replies = _replies(out.stdout[12:])
    assert "copyv" not in replies[0]["features"]
    assert replies[1]["ok"] is False and "own host" in replies[1]["error"]


def test_failback_start_is_offered_and_ends_the_session(tmp_path: Path) -> None:
    """``failback-start`` (the original site starts the originals) is named; with nothing to finish it says so."""
    out = subprocess.run(
        [sys.executable, "-m", "libvirt_cgrep", "receive", str(tmp_path / "t")],
        input=proto.MAGIC
        + struct.pack(">I", proto.VERSION)
        + _msg({"op": "failback-start", "set": "g", "start": None})
        + _msg({"op": "sets"}),
        capture_output=True,
        timeout=60,
        check=False,
    )
    replies = _replies(out.stdout[12:])
    assert "failback-start" in replies[0]["features"]
    assert replies[1]["ok"] is False and replies[1]["kind"] == "NotFoundError" and "no failback" in replies[1]["error"]


def test_copyv_extents_are_checked() -> None:
    assert proto.copy_extents({"ext": [[0, 7, 65536]]}) == [(0, 7, 65536)]
    for bad in ({"ext": [[0, -1, 10]]}, {"ext": [[0, 0, 0]]}, {"ext": [[0, 0, 10]], "n": 10}):
        with pytest.raises(proto.StreamError, match="copyv"):
            proto.copy_extents(bad)


def _msg(m: dict[str, object]) -> bytes:
    body = json.dumps(m).encode()
    return struct.pack(">I", len(body)) + body


def _replies(data: bytes) -> list[dict[str, Any]]:
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def test_datav_extents_must_add_up_to_the_payload() -> None:
    assert proto.extents({"ext": [[0, 65536], [1 << 20, 4096]], "n": 69632}) == [(0, 65536), (1 << 20, 4096)]
    for bad in ({"ext": [[0, 65536]], "n": 65537}, {"ext": [[-1, 10]], "n": 10}, {"ext": [[0, 0]], "n": 0}):
        with pytest.raises(proto.StreamError, match="add up"):
            proto.extents(bad)
