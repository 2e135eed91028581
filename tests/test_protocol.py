"""The replication stream's optional features: offered by the receiver, checked on arrival."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.errors import UsageError
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


def _manifest() -> mf.Manifest:
    disk = mf.DiskRecord("d", "vda", "", None, 1 << 20, 0, "", "/img/top.qcow2", "/img/base.qcow2")
    return mf.Manifest("20260101T000000.000000Z", "2026-01-01T00:00:00Z", "g", None, None, "none", "crash", (), (disk,))


def test_every_request_round_trips_with_the_wire_keys_of_version_1() -> None:
    """Typed messages write the same JSON objects as the hand-built dicts they replaced, and parse back equal."""
    pid = "20260101T000000.000000Z"
    cases: list[tuple[proto.Request[Any], dict[str, Any]]] = [
        (proto.Points("g"), {"op": "points", "set": "g"}),
        (proto.Sets(), {"op": "sets"}),
        (proto.Applied(), {"op": "applied"}),
        (
            proto.Begin("g", pid, None, (("d", "vda", 4096, True),)),
            {"op": "begin", "set": "g", "point_id": pid, "parent": None, "disks": [["d", "vda", 4096, True]]},
        ),
        (proto.Zero("d", "vda", 0, 4096), {"op": "zero", "domain": "d", "target": "vda", "offset": 0, "length": 4096}),
        (proto.Data("d", "vda", 8192, "zlib"), {"op": "data", "domain": "d", "target": "vda", "offset": 8192, "z": "zlib"}),
        (
            proto.CopyV("d", "vda", "/x", ((0, 0, 4096),)),
            {"op": "copyv", "domain": "d", "target": "vda", "path": "/x", "ext": [[0, 0, 4096]]},
        ),
        (proto.Verify("g", True, pid), {"op": "verify", "set": "g", "write_order": True, "point": pid}),
        (proto.Probe(("/a",), ("/b",)), {"op": "probe", "paths": ["/a"], "exists": ["/b"]}),
        (proto.FailbackStart("g", None), {"op": "failback-start", "set": "g", "start": None}),
        (
            proto.Prune(Policy(3, 0, 1), "g", "2026-01-01T00:00:00+00:00"),
            {
                "op": "prune",
                "set": "g",
                "policy": {"keep_last": 3, "keep_hourly": 0, "keep_daily": 1},
                "now": "2026-01-01T00:00:00+00:00",
            },
        ),
        (
            proto.Start("g", (("d", "vda", 4096),), True, pid),
            {"op": "start", "set": "g", "disks": [["d", "vda", 4096]], "writethrough": True, "resume": pid},
        ),
        (proto.Prepare(pid), {"op": "prepare", "point_id": pid}),
        (proto.Cut(pid), {"op": "cut", "point_id": pid}),
        (proto.Final(pid), {"op": "final", "point_id": pid}),
        (proto.Ping(2.5), {"op": "ping", "timeout": 2.5}),
    ]
    for req, wire in cases:
        assert req.to_wire() == wire
        assert list(req.to_wire()) == list(wire)  # the keys in the same order: the same bytes
        parsed = proto.parse_request(json.loads(json.dumps(wire)), {**proto.REQUESTS, **proto.SERVE_REQUESTS})
        assert parsed == req
    commit = proto.Commit(_manifest(), (("d", "vda", 10),))
    assert proto.parse_request(json.loads(json.dumps(commit.to_wire()))) == commit


def test_requests_are_validated_where_parsed() -> None:
    bad: dict[str, Any]
    for bad in (
        {"op": "points", "set": "../x"},
        {"op": "begin", "set": "g", "point_id": "nope", "parent": None, "disks": []},
        {"op": "zero", "domain": "d", "target": "vda", "offset": -1, "length": 1},
        {"op": "prepare", "point_id": "x"},
        {"op": "nosuch"},
    ):
        with pytest.raises(UsageError):
            proto.parse_request(bad, {**proto.REQUESTS, **proto.SERVE_REQUESTS})
