"""The replication stream's optional features: offered by the receiver, checked on arrival."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.link import Link, parse_target


def test_the_local_receiver_offers_datav(tmp_path: Path) -> None:
    link = Link(parse_target(str(tmp_path / "t")))
    try:
        assert "datav" in link.features
    finally:
        link.close()


def test_datav_extents_must_add_up_to_the_payload() -> None:
    assert proto.extents({"ext": [[0, 65536], [1 << 20, 4096]], "n": 69632}) == [(0, 65536), (1 << 20, 4096)]
    for bad in ({"ext": [[0, 65536]], "n": 65537}, {"ext": [[-1, 10]], "n": 10}, {"ext": [[0, 0]], "n": 0}):
        with pytest.raises(proto.StreamError, match="add up"):
            proto.extents(bad)
