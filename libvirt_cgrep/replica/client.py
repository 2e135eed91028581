"""The one client of the replication stream: one method per request, typed messages in and out.

Every sender (a sync, a shipment, reverse protection and failback,
continuous mode, the CLI's read verbs) talks to a receiver through a
:class:`Client` over a :class:`~libvirt_cgrep.replica.link.Link`; the wire
format is :mod:`libvirt_cgrep.replica.protocol`'s. A failed request raises
the receiver's own error class (its exit code).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.retention import Policy
from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.link import Link, Target

R = TypeVar("R")


class Client:
    """A session with a target's receiver (``serve``: the continuous-mode session; ``readonly``: reads only)."""

    def __init__(self, target: Target, *, readonly: bool = False, serve: bool = False) -> None:
        self.target = target
        self.link = Link(target, readonly=readonly, serve=serve)

    @property
    def features(self) -> frozenset[str]:
        """The receiver's optional protocol features (:data:`protocol.FEATURES`)."""
        return self.link.features

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The receiver's process (local) or ssh's."""
        return self.link.proc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def request(self, req: proto.Request[R]) -> R:
        """Send ``req`` and wait for its reply (the receiver's error re-raised)."""
        reply: R = req.reply(self.link.request(req.to_wire()))
        return reply

    # ------------------------------------------------------------------ reads
    def sets(self) -> tuple[str, ...]:
        return self.request(proto.Sets()).sets

    def points(self, set_name: str) -> proto.PointsReply:
        return self.request(proto.Points(set_name))

    def verify(self, set_name: str, *, write_order: bool = False, point: str | None = None) -> proto.VerifyReply:
        return self.request(proto.Verify(set_name, write_order, point))

    def probe(self, paths: Sequence[str], exists: Sequence[str] = ()) -> proto.ProbeReply:
        return self.request(proto.Probe(tuple(paths), tuple(exists)))

    # ------------------------------------------------------------ one point
    def begin(
        self,
        set_name: str,
        point_id: str,
        parent: str | None,
        disks: Sequence[tuple[str, str, int, bool]],
        *,
        seed: Sequence[tuple[str, str, str]] | None = None,
    ) -> proto.BeginReply:
        return self.request(proto.Begin(set_name, point_id, parent, tuple(disks), None if seed is None else tuple(seed)))

    def zero(self, domain: str, target: str, offset: int, length: int) -> None:
        self.link.send(proto.Zero(domain, target, offset, length).to_wire())

    def data(self, domain: str, target: str, offset: int, payload: bytes, *, z: str | None = None) -> None:
        """Bytes at ``offset`` (compressed with ``z``)."""
        self.link.send(proto.Data(domain, target, offset, z).to_wire(), payload)

    def data_file(self, domain: str, target: str, offset: int, source: tuple[int, int, int]) -> None:
        """``source`` = (fd, file offset, length): those bytes of the file to ``offset``, sent with ``sendfile``."""
        fd, file_offset, length = source
        self.link.send_file(proto.Data(domain, target, offset).to_wire(), fd, file_offset, length)

    def datav_file(self, domain: str, target: str, fd: int, parts: Sequence[tuple[int, int, int]]) -> None:
        """One ``datav`` message: ``parts`` are (disk offset, file offset, length) of ``fd``."""
        msg = proto.DataV(domain, target, tuple((o, n) for o, _, n in parts))
        self.link.send_file_extents(msg, fd, [f for _, f, _ in parts])

    def copyv(self, domain: str, target: str, path: str, ext: Sequence[tuple[int, int, int]]) -> None:
        """Ranges of the file ``path`` on the receiver's host, copied there (flushed onto the link at once)."""
        self.link.send(proto.CopyV(domain, target, path, tuple(ext)).to_wire(), flush=True)

    def applied(self) -> None:
        self.request(proto.Applied())

    def commit(self, manifest: mf.Manifest, shipped: Sequence[tuple[str, str, int]] | None = None) -> proto.CommitReply:
        return self.request(proto.Commit(manifest, None if shipped is None else tuple(shipped)))

    def abort(self) -> None:
        self.request(proto.Abort())

    def prune(self, policy: Policy, *, set_name: str | None = None, now: str | None = None) -> tuple[str, ...]:
        return self.request(proto.Prune(policy, set_name, now)).deleted

    def failback_start(self, set_name: str, start: dict[str, object] | None) -> proto.FailbackStartReply:
        return self.request(proto.FailbackStart(set_name, start))

    # ------------------------------------------------------ continuous mode
    def start(
        self, set_name: str, disks: Sequence[tuple[str, str, int]], *, writethrough: bool = False, resume: str | None = None
    ) -> proto.StartReply:
        return self.request(proto.Start(set_name, tuple(disks), writethrough, resume))

    def prepare(self, point_id: str) -> proto.PrepareReply:
        return self.request(proto.Prepare(point_id))

    def cut(self, point_id: str) -> proto.CutReply:
        return self.request(proto.Cut(point_id))

    def final(self, point_id: str) -> proto.FinalReply:
        return self.request(proto.Final(point_id))

    def ping(self, timeout: float = 2.0) -> float:
        return self.request(proto.Ping(timeout)).ms

    # -------------------------------------------------------------- the end
    def close(self) -> None:
        """``bye``, then wait for the receiver to end."""
        self.link.close()

    def kill(self) -> None:
        self.link.kill()
