"""``virt-cgrep receive --serve PATH``: the replica side of continuous mode, on stdin/stdout.

The session owns the target (its lock, for the whole session) and one
supervised ``qemu-storage-daemon`` that exports the set's live images over
NBD (one unix socket, one export per disk). The primary mirrors every disk
into its export; a cut is ONE transaction across every exported node of the
set (every domain of a group), over overlays created and added beforehand.

Commit rule (as :mod:`libvirt_cgrep.replica.store`): the frozen images are
flushed by QEMU inside the transaction (``blockdev-snapshot`` flushes the old
node), then fsynced, renamed and named by a manifest written last, only when
the primary confirms (``commit``) that every mirror stayed in sync up to the
cut. Live images are staging files: if the session ends in any other way
than a commit, nothing of them survives the next open of the target.

A domain restart need not recopy its disks: when the primary's domains stop
in sync, ``final`` stops the daemon and stages the live images as a point,
committed only if their content digests equal the primary's disks'; the next
session's ``start`` with ``resume`` (that point, still the newest) serves
live overlays over it, and the primary mirrors only its disks' new top.

Requests (stream protocol v1): ``start``, ``prepare``, ``cut``, ``commit``, ``final``,
``ping``, ``prune``, ``points``, ``bye``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from libvirt_cgrep.adapters import faults, nbd, qemu_img
from libvirt_cgrep.adapters.fs import fsync_dir, save_file
from libvirt_cgrep.adapters.qsd import StorageDaemon
from libvirt_cgrep.core import continuous as cc
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core.retention import PointTime
from libvirt_cgrep.core.retention import prune as prune_ids
from libvirt_cgrep.engine.libvirt_backend import qemu_owner
from libvirt_cgrep.errors import CgrepError, InternalError, QMPError, QMPOutcomeUnknown, StateError, UsageError
from libvirt_cgrep.replica import protocol as proto
from libvirt_cgrep.replica.store import StagedDisk, Store, _parse_time, sha256_file
from libvirt_cgrep.server.receiver import IdleTimeout, on_idle_alarm, points_reply

#: Where the daemon's sockets live (a short path: unix socket names are limited to 107 bytes).
RUN_DIR_ENV = "CGREP_RUN_DIR"
#: Test-only negative control: cut disk by disk, this many ms apart (never one transaction).
FAULT_SPLIT_CUT_ENV = faults.env_name("SPLIT_CUT_MS")
#: Test-only: ``final`` reports digests that match no disk (the mismatch path of a restart).
FAULT_FINAL_DIGEST_ENV = faults.env_name("FINAL_DIGEST")
#: The session ends when the primary is silent this long (it pings every 0.5 s).
IDLE_S = 30


def _die_with_parent() -> None:
    """In the daemon's child: SIGKILL it when this receiver dies (PR_SET_PDEATHSIG), so no daemon outlives us."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class ServeSession:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.daemon: StorageDaemon | None = None
        self.run_dir: Path | None = None
        self.set_name: str | None = None
        self.live: tuple[cc.LiveDisk, ...] = ()
        self.seq = 0
        self.pending: cc.ReplicaCut | None = None
        self.prepared: cc.ReplicaCut | None = None
        self.broken: str | None = None
        self.flushers: list[nbd.NBDClient] = []
        #: the daemon's node of every disk of every point this session cut or opened: {point id: {(domain, target): node}}
        self.nodes: dict[str, dict[tuple[str, str], str]] = {}
        #: ``final`` staged the live images as a point (the daemon is stopped)
        self.final_point = False

    # ---------------------------------------------------------------- start
    def start(self, req: proto.Start) -> dict[str, Any]:
        if self.daemon is not None:
            raise StateError("this session already serves a set")
        set_name = req.set_name
        sdir = self.store.set_dir(set_name)
        disks = list(req.disks)
        if not disks:
            raise UsageError("continuous mode needs at least one disk")
        (sdir / "points").mkdir(parents=True, exist_ok=True, mode=0o700)
        pts = self.store.points(set_name)
        newest = pts[-1] if pts else None
        resume = req.resume
        chains: dict[tuple[str, str], list[tuple[str, mf.DiskRecord]]] = {}
        if resume is not None:
            chains = self._resume_chains(pts, resume, disks)
        self.seq = 1
        live = cc.first_live(disks, self.seq, over=resume)
        base = os.environ.get(RUN_DIR_ENV) or tempfile.gettempdir()
        self.run_dir = Path(tempfile.mkdtemp(prefix="cgrep-serve-", dir=base))
        os.chmod(self.run_dir, 0o711)  # QEMU's user must reach the NBD socket (the socket itself is 0660, its own)
        self.set_name = set_name
        made: list[Path] = []
        try:
            self.daemon = StorageDaemon(self.run_dir, preexec=_die_with_parent)
            self.daemon.start_nbd(qemu_owner())
            for i, d in enumerate(live):
                path = sdir / d.image
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                path.unlink(missing_ok=True)
                qemu_img.create_qcow2_over(path, d.size, d.backing)
                made.append(path)
                # A resumed session opens the final point's chain itself, one named node per point, so that
                # retention merges across it in the daemon (as it merges this session's own points).
                below: str | None = None
                for j, (pid, rec) in enumerate(chains.get((d.domain, d.target), [])):
                    node = f"rp{j}x{i}"
                    self.daemon.add_image(node, str(sdir / rec.image), backing_null=below is None, backing=below)
                    self.nodes.setdefault(pid, {})[(d.domain, d.target)] = node
                    below = node
                self.daemon.add_image(d.node, str(path), backing=below)
                self.daemon.export(cc.export_name(d.domain, d.target), d.node, writethrough=req.writethrough)
            # One NBD client per export, to flush them before each cut (outside the transaction's drain).
            self.flushers = [nbd.NBDClient(self.daemon.nbd_path, cc.export_name(d.domain, d.target)) for d in live]
        except BaseException:
            self._teardown()
            for p in made:
                p.unlink(missing_ok=True)
            raise
        self.live = live
        exports = tuple((d.domain, d.target, cc.export_name(d.domain, d.target)) for d in live)
        return proto.StartReply(self.daemon.nbd_path, self.daemon.pid, exports, newest.point_id if newest else None).to_wire()

    def _resume_chains(
        self, pts: list[mf.Manifest], resume: str, disks: list[tuple[str, str, int]]
    ) -> dict[tuple[str, str], list[tuple[str, mf.DiskRecord]]]:
        """Each disk's chain of point images under the final point ``resume``, oldest first; StateError if unusable."""
        if not pts or pts[-1].point_id != resume:
            raise StateError(f"cannot restart from point {resume}: it is not the newest point of the set")
        if cc.resume_from_dict(pts[-1].extra.get("resume")) is None:
            raise StateError(f"cannot restart from point {resume}: it is not the final point of a clean stop")
        by_id = {m.point_id: {(r.domain, r.target): r for r in m.disks} for m in pts}
        out: dict[tuple[str, str], list[tuple[str, mf.DiskRecord]]] = {}
        for domain, target, size in disks:
            chain: list[tuple[str, mf.DiskRecord]] = []
            pid: str | None = resume
            while pid is not None:
                rec = by_id.get(pid, {}).get((domain, target))
                if rec is None:
                    raise StateError(f"cannot restart from point {resume}: {domain}/{target} has no image in point {pid}")
                chain.append((pid, rec))
                pid = mf.point_of_file(rec.backing) if rec.backing else None
            if chain[0][1].virtual_size != size:
                raise StateError(f"cannot restart from point {resume}: {domain}/{target} changed size")
            out[(domain, target)] = chain[::-1]
        return out

    def final(self, req: proto.Final) -> dict[str, Any]:
        """The primary's domains stopped: stop the daemon, stage the live images as point ``point_id``, digest them.

        The images become a point only on ``commit`` (the primary's disks hold the same digests); else the
        session's end discards them.
        """
        _, set_name = self._require()
        pid = req.point_id
        if not mf.valid_point_id(pid):
            raise UsageError(f"invalid point id {pid!r}")
        self._drop_prepared()
        self._teardown()  # exports end; QEMU flushes and closes every image
        sdir = self.store.set_dir(set_name)
        if self.pending is not None:
            # A cut whose commit never came (the domains stopped around it): fold its overlays back into
            # the frozen images, which then hold everything, as if the cut never happened.
            for st in self.pending.steps:
                new, old = sdir / st.new.image, sdir / st.old.image
                qemu_img.rebase_unsafe(new, old.name)
                qemu_img.commit_into_backing(new)
                new.unlink()
            self.live = tuple(st.old for st in self.pending.steps)
            self.pending = None
        steps = tuple(cc.CutStep(d, mf.disk_image_name(d.domain, d.target, pid), d) for d in self.live)
        self.pending = cc.ReplicaCut(pid, self.seq, steps)
        self.final_point = True
        t0 = time.monotonic()
        digests = {f"{d.domain}/{d.target}": qemu_img.content_digest(sdir / d.image) for d in self.live}
        if faults.value("FINAL_DIGEST"):
            digests = dict.fromkeys(digests, "0" * 64)  # test-only: a replica that differs from the primary
        return proto.FinalReply(digests, round((time.monotonic() - t0) * 1000.0, 3)).to_wire()

    # ------------------------------------------------------------------ cut
    def _require(self) -> tuple[StorageDaemon, str]:
        if self.broken:
            raise StateError(f"the session is broken: {self.broken}")
        if self.daemon is None or self.set_name is None:
            raise StateError("no set is served (start first)")
        if not self.daemon.alive():
            self.broken = "the storage daemon died"
            raise StateError("the storage daemon died")
        return self.daemon, self.set_name

    def prepare(self, req: proto.Prepare) -> dict[str, Any]:
        """Create the next live overlays' files (``qemu-img``; the daemon is not involved): slow work, before the cut."""
        _, set_name = self._require()
        if self.pending is not None:
            raise StateError("a cut is waiting for its commit")
        sdir = self.store.set_dir(set_name)
        self._drop_prepared()
        plan = cc.plan_cut(req.point_id, self.live, self.seq + 1)
        if any((sdir / s.final).exists() for s in plan.steps):
            raise StateError(f"point {plan.point_id} already exists")
        t0 = time.monotonic()
        self.prepared = plan
        for s in plan.steps:
            path = sdir / s.new.image
            path.unlink(missing_ok=True)
            qemu_img.create_qcow2_over(path, s.new.size, str(s.new.backing))
        return proto.PrepareReply(plan.point_id, round((time.monotonic() - t0) * 1000.0, 3)).to_wire()

    def _drop_prepared(self) -> None:
        if self.prepared is not None and self.set_name is not None:
            for s in self.prepared.steps:
                (self.store.set_dir(self.set_name) / s.new.image).unlink(missing_ok=True)
        self.prepared = None

    def cut(self, req: proto.Cut) -> dict[str, Any]:
        """Add the prepared overlays (``"backing": null``), flush the exports, then ONE transaction.

        The frozen images wait for ``commit``.
        """
        daemon, set_name = self._require()
        plan = self.prepared
        if plan is None or plan.point_id != req.point_id:
            raise StateError("cut without its prepare")
        sdir = self.store.set_dir(set_name)
        t0 = time.monotonic()
        added: list[cc.LiveDisk] = []
        try:
            for s in plan.steps:
                added.append(s.new)
                daemon.add_image(s.new.node, str(sdir / s.new.image), backing_null=True)
            add_ms = (time.monotonic() - t0) * 1000.0
            # Write back what the exports cached now, so the flush QEMU does inside the transaction
            # (blockdev-snapshot flushes the old node, guest I/O drained) finds little left to write.
            t1 = time.monotonic()
            for c in self.flushers:
                c.send_flush()
            for c in self.flushers:
                c.wait()
            preflush_ms = (time.monotonic() - t1) * 1000.0
            split = faults.number("SPLIT_CUT_MS")
            if split:
                cut_ms = 0.0
                for pair in plan.pairs():
                    cut_ms += daemon.snapshot([pair])
                    time.sleep(split / 1000.0)
            else:
                cut_ms = daemon.snapshot(plan.pairs())
        except QMPOutcomeUnknown as exc:
            self.broken = f"the cut's outcome is unknown: {exc}"
            raise
        except BaseException:
            for n in added:
                daemon.del_image(n.node)
            self._drop_prepared()
            raise
        self.prepared = None
        self.pending = plan
        self.seq = plan.seq
        self.live = tuple(s.new for s in plan.steps)
        return proto.CutReply(plan.point_id, round(add_ms, 3), round(preflush_ms, 3), round(cut_ms, 3)).to_wire()

    def commit(self, req: proto.Commit) -> dict[str, Any]:
        """Make the pending cut a point (fsync, rename, manifest last); ``abort`` ends the session instead."""
        if self.final_point and self.set_name is not None and not self.broken:
            set_name = self.set_name  # after ``final``: the daemon is stopped on purpose
        else:
            _, set_name = self._require()
        plan = self.pending
        if plan is None:
            raise StateError("commit without a cut")
        sdir = self.store.set_dir(set_name)
        draft = req.manifest
        if draft.point_id != plan.point_id:
            raise UsageError(f"commit names point {draft.point_id}, the cut was {plan.point_id}")
        pts = self.store.points(set_name)
        draft = replace(draft, parent=pts[-1].point_id if pts else None)
        t0 = time.monotonic()
        staged = [
            StagedDisk(s.old.domain, s.old.target, s.old.size, sdir / s.old.image, sdir / s.final, s.old.backing)
            for s in plan.steps
        ]
        shipped = {(s.domain, s.target): os.stat(s.path).st_blocks * 512 for s in staged}
        try:
            final = self.store.commit(set_name, draft, staged, shipped)
        except BaseException as exc:
            self.broken = f"commit failed: {exc}"
            raise
        self.pending = None
        self.nodes[plan.point_id] = {(st.old.domain, st.old.target): st.old.node for st in plan.steps}
        if self.final_point:
            self.live = ()  # renamed into the point: nothing is left to serve or discard
        return proto.CommitReply(final, round((time.monotonic() - t0) * 1000.0, 3)).to_wire()

    def ping(self, req: proto.Ping) -> dict[str, Any]:
        daemon, _ = self._require()
        return proto.PingReply(round(daemon.ping(req.timeout), 3)).to_wire()

    def prune(self, req: proto.Prune) -> dict[str, Any]:
        """Retention while serving: older points merge as in snapshot mode; this session's points merge in the daemon."""
        _, set_name = self._require()
        pol = req.policy
        now = datetime.fromisoformat(req.now) if req.now else datetime.now(UTC)
        deleted = self.store.prune(set_name, pol, now, protect=frozenset(self.nodes))
        pts = self.store.points(set_name)
        doomed = prune_ids([PointTime(m.point_id, _parse_time(m.time_utc)) for m in pts], now, pol)
        for pid in doomed:
            if pid in self.nodes:
                self._merge(set_name, pid)
                deleted.append(pid)
        return proto.PruneReply(tuple(deleted)).to_wire()

    def _merge(self, set_name: str, x_id: str) -> None:
        """Merge this session's point X into its child C with ``block-commit`` jobs in the daemon, exports live.

        The same steps and intent file as :meth:`Store.prune` (so a crash is
        finished by the next open): intent, X's manifest removed, C's clusters
        committed into X's image (C's view never changes), X's image renamed
        over C's, C's manifest rewritten; the layer above C keeps its backing
        name (``C.qcow2``), which now names the merged image.
        """
        daemon, _ = self._require()
        sdir = self.store.set_dir(set_name)
        pts = self.store.points(set_name)
        ids = [m.point_id for m in pts]
        i = ids.index(x_id)
        if i + 1 >= len(pts):
            return  # never the newest
        x, c = pts[i], pts[i + 1]
        above = pts[i + 2] if i + 2 < len(pts) else None
        if c.point_id not in self.nodes:
            return
        intent = {"point": x_id, "child": c.point_id, "parent": x.parent or ""}
        ipath = sdir / f"prune-{x_id}.json"
        save_file(ipath, json.dumps(intent).encode(), 0o600)
        mpath = sdir / "points" / f"{x_id}.json"
        mpath.unlink()
        fsync_dir(mpath.parent)
        live = {(d.domain, d.target): d.node for d in self.live}
        xrec = {(d.domain, d.target): d for d in x.disks}
        for d in c.disks:
            key = (d.domain, d.target)
            x_node, c_node = self.nodes[x_id][key], self.nodes[c.point_id][key]
            xb = xrec[key].backing
            below = self.nodes.get(mf.point_of_file(xb), {}).get(key) if xb else None
            daemon.qmp.job(
                "block-commit",
                {
                    "job-id": f"cgrep-merge-{c_node}",
                    "device": live[key],
                    "top-node": c_node,
                    "base-node": x_node,
                    "backing-file": mf.point_file(c.point_id),
                    "auto-dismiss": False,
                },
                timeout=3600.0,
            )
            if below is not None or not xb:
                # QEMU keeps the commit's metadata in its cache: write it out, or the checksum below would be
                # of an image that the daemon's exit changes again
                daemon.flush_image(x_node, below)
            x_img = (sdir / d.image).parent / mf.point_file(x_id)
            os.replace(x_img, sdir / d.image)
            fsync_dir(x_img.parent)
            daemon.del_image(c_node)
            self.nodes[c.point_id][key] = x_node
        new_disks = [replace(d, backing=xrec[(d.domain, d.target)].backing, sha256=sha256_file(sdir / d.image)) for d in c.disks]
        save_file(sdir / "points" / f"{c.point_id}.json", replace(c, disks=tuple(new_disks), parent=x.parent).to_json(), 0o600)
        if above is not None:  # its header was rewritten (same backing name): keep its checksum true
            new_above = [replace(d, sha256=sha256_file(sdir / d.image)) for d in above.disks]
            save_file(sdir / "points" / f"{above.point_id}.json", replace(above, disks=tuple(new_above)).to_json(), 0o600)
        del self.nodes[x_id]
        ipath.unlink()
        fsync_dir(sdir)

    # --------------------------------------------------------------- teardown
    def _teardown(self) -> None:
        for c in self.flushers:
            with contextlib.suppress(Exception):
                c.sock.close()
        self.flushers = []
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def close(self) -> None:
        """Stop the daemon and discard every live (uncommitted) image."""
        self._teardown()
        self._drop_prepared()
        if self.set_name is not None:
            sdir = self.store.set_dir(self.set_name)
            for d in self.live:
                (sdir / d.image).unlink(missing_ok=True)
            if self.pending is not None:
                for s in self.pending.steps:
                    (sdir / s.old.image).unlink(missing_ok=True)
            self.live = ()
            self.pending = None

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Parse one request and run its handler (:attr:`HANDLERS`); the reply to send."""
        req = proto.parse_request(msg, proto.SERVE_REQUESTS)
        handler = self.HANDLERS.get(type(req))
        if handler is None:
            raise UsageError(f"unknown request {msg.get('op')!r}")
        return handler(self, req)

    def points(self, req: proto.Points) -> dict[str, Any]:
        return points_reply(self.store, req.set_name)

    #: op -> handler: every request a continuous session answers
    HANDLERS: ClassVar[Mapping[type[Any], Callable[..., dict[str, Any]]]] = {
        proto.Start: start,
        proto.Prepare: prepare,
        proto.Cut: cut,
        proto.Commit: commit,
        proto.Final: final,
        proto.Ping: ping,
        proto.Prune: prune,
        proto.Points: points,
    }


def serve(root: Path, inp: BinaryIO, out: BinaryIO) -> int:
    """Run one continuous session; 0 on a clean end (``bye``), 1 after a reported failure."""
    proto.write_header(out)
    proto.read_header(inp)
    try:
        store = Store.open(root)
    except CgrepError as exc:
        proto.send(out, proto.error_reply(exc))
        out.flush()
        return 1
    session = ServeSession(store)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        proto.send(out, proto.Hello(proto.VERSION, str(root), serve=True).to_wire())
        out.flush()
        signal.signal(signal.SIGALRM, on_idle_alarm)
        while True:
            signal.alarm(IDLE_S)
            try:
                got = proto.recv(inp)
            except IdleTimeout:
                return 1
            finally:
                signal.alarm(0)
            if got is None or got[0].get("op") == proto.Bye.OP:
                return 0
            try:
                reply = session.handle(got[0])
            except CgrepError as exc:
                reply = proto.error_reply(exc)
            except Exception as exc:  # a bug: report it, end the session (live images discarded)
                proto.send(out, proto.error_reply(InternalError(f"{type(exc).__name__}: {exc}")))
                out.flush()
                return 1
            proto.send(out, reply)
            out.flush()
    except (KeyboardInterrupt, OSError, proto.StreamError, QMPError):
        return 1
    finally:
        session.close()
        store.close()
