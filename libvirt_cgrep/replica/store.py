"""A replica target directory (format v1, docs/replica-format.md).

What a commit guarantees: a point exists iff ``<set>/points/<id>.json`` exists.
That manifest is written last (temp file, fsync, rename, fsync dir), after
every image it names was fully written, fsynced and renamed into place. A
reader therefore never sees a partial point. Opening a target (which takes an
exclusive ``fcntl`` lock: one writer at a time) discards every leftover of an
uncommitted point and finishes any interrupted prune, so every listed point
stays readable whatever crashed when.

Layout::

    TARGET/cgrep-replica.json              {"format": "libvirt-cgrep-replica", "version": 1}
    TARGET/.lock
    TARGET/<set>/points/<id>.json          the commit records
    TARGET/<set>/disks/<dom>/<disk>/<id>.qcow2   one image per point (base, then deltas)
    TARGET/<set>/disks/<dom>/<disk>/.staging-<id>.qcow2   being written (discarded on open)
    TARGET/<set>/prune-<id>.json           an interrupted prune's intent (finished on open)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from libvirt_cgrep.adapters import faults, nbd, qemu_img
from libvirt_cgrep.adapters.fs import fsync_dir, fsync_file, save_file
from libvirt_cgrep.adapters.qcow2 import Qcow2Writer, Unaligned, create_image
from libvirt_cgrep.core import manifest as mf
from libvirt_cgrep.core import recovery
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.core.retention import PointTime, Policy, prune
from libvirt_cgrep.errors import ConflictError, NotFoundError, StateError, UsageError

_STAGING = re.compile(r"\.staging-(.+)\.qcow2")
_IMAGE = re.compile(r"(.+)\.qcow2")
#: names a writer makes and removes within one cycle (staged images, manifests being written, prune intents)
_TRANSIENT = re.compile(rf"{_STAGING.pattern}|\..+\.tmp|prune-.+\.json")


def transient(name: str) -> bool:
    """True for a file a running writer makes and removes again: never a committed point's part."""
    return _TRANSIENT.fullmatch(name) is not None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StagedDisk:
    domain: str
    target: str
    virtual_size: int
    path: Path
    final: Path
    backing: str | None
    #: the image starts as a copy of a local image (reverse protection), not empty
    seeded: bool = False


class StagedWriter:
    """Writes a staged image: natively (adapters.qcow2: the payload spliced straight into the file) while the
    requests cover whole clusters, through QEMU (qemu-nbd) from the first one that does not, and always for a
    seeded image (which holds data already). The NBD client's interface, so the receiver uses either alike."""

    def __init__(self, disk: StagedDisk) -> None:
        self.disk = disk
        self.native: Qcow2Writer | None = None
        self.nbd: nbd.NBDClient | None = None
        self._serve: contextlib.AbstractContextManager[nbd.NBDClient] | None = None
        if disk.seeded:
            self._to_nbd()
        else:
            self.native = Qcow2Writer(disk.path, disk.virtual_size, disk.backing)

    def _to_nbd(self) -> nbd.NBDClient:
        if self.native is not None:  # what was written natively becomes an ordinary image first
            self.native.finish()
            self.native.close()
            self.native = None
        if self.nbd is None:
            self._serve = nbd.serve(self.disk.path)
            self.nbd = self._serve.__enter__()
        return self.nbd

    @property
    def broken(self) -> bool:
        return bool((self.native and self.native.broken) or (self.nbd and self.nbd.broken))

    def _request(self, op: str, *args: object) -> None:
        """``op`` natively; through qemu-nbd if it is not cluster-aligned (Unaligned: nothing of it was written)."""
        if self.native is not None:
            try:
                getattr(self.native, op)(*args)
                return
            except Unaligned:
                pass
        getattr(self._to_nbd(), op)(*args)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._request("write", offset, data)

    def write_from(self, offset: int, fd: int, length: int) -> None:
        self._request("write_from", offset, fd, length)

    def copy_from(self, offset: int, fd: int, src_offset: int, length: int) -> None:
        self._request("copy_from", offset, fd, src_offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._request("write_zeroes", offset, length)

    def send_flush(self) -> None:
        if self.nbd is not None:
            self.nbd.send_flush()

    def wait(self) -> None:
        if self.native is not None:
            self.native.wait()
        if self.nbd is not None:
            self.nbd.wait()

    def finish(self) -> None:
        """The image is complete and closed (qemu-nbd flushed and exited)."""
        if self.native is not None:
            try:
                self.native.finish()
            finally:
                self.native.close()
                self.native = None
        if self._serve is not None:
            serve, self._serve, self.nbd = self._serve, None, None
            serve.__exit__(None, None, None)

    def abandon(self) -> None:
        """Stop without finishing (the image will be discarded): nothing is flushed or waited for."""
        if self.native is not None:
            self.native.close()
            self.native = None
        if self._serve is not None:
            serve, self._serve, self.nbd = self._serve, None, None
            with contextlib.suppress(Exception):
                serve.__exit__(RuntimeError, RuntimeError("abandoned"), None)


class Store:
    """An opened, locked, recovered target directory."""

    def __init__(self, root: Path, lock_fd: int) -> None:
        self.root = root
        self._lock_fd = lock_fd

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, root: Path, *, create: bool = True, readonly: bool = False) -> Store:
        """Lock and recover the target (creating it if ``create``); ConflictError if another writer holds it.

        ``readonly`` takes no lock and changes nothing: the commit rule makes
        every listed point whole even while a writer works.
        """
        if not root.is_absolute():
            raise UsageError(f"target path {str(root)!r} must be absolute")
        marker = root / "cgrep-replica.json"
        if not marker.exists():
            if not create or readonly:
                raise NotFoundError(f"{root} is not a libvirt-cgrep replica target")
            if root.exists() and any(root.iterdir()):
                raise UsageError(f"{root} exists, is not empty and is not a replica target; refusing to use it")
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            save_file(marker, json.dumps({"format": mf.TARGET_FORMAT, "version": mf.TARGET_VERSION}).encode() + b"\n")
        try:
            info = json.loads(marker.read_bytes())
        except ValueError as exc:
            raise StateError(f"{marker} is unreadable") from exc
        if info.get("format") != mf.TARGET_FORMAT or info.get("version") != mf.TARGET_VERSION:
            raise StateError(f"{root}: replica format {info.get('format')} v{info.get('version')} is not supported")
        if readonly:
            return cls(root, -1)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConflictError(f"target {root} is in use by another virt-cgrep") from None
        store = cls(root, fd)
        for s in store.sets():
            store._recover(s)
        return store

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    def set_dir(self, set_name: str) -> Path:
        return self.root / validate_name(set_name, "set name")

    def sets(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "points").is_dir())

    def points(self, set_name: str) -> list[mf.Manifest]:
        """Committed points of a set, oldest first."""
        pdir = self.set_dir(set_name) / "points"
        if not pdir.is_dir():
            return []
        out = []
        for f in pdir.glob("*.json"):
            if mf.valid_point_id(f.stem):
                out.append(mf.parse(f.read_bytes()))
        return sorted(out, key=lambda m: m.point_id)

    def point(self, set_name: str, point_id: str) -> mf.Manifest:
        f = self.set_dir(set_name) / "points" / f"{point_id}.json"
        if not mf.valid_point_id(point_id) or not f.exists():
            raise NotFoundError(f"no point {point_id!r} in set {set_name!r}")
        return mf.parse(f.read_bytes())

    def image_path(self, set_name: str, rel: str) -> Path:
        return self.set_dir(set_name) / rel

    def held_points(self, set_name: str) -> tuple[str, ...]:
        """Points that recovered domains run on (docs/recovery.md): they and older points are never pruned."""
        rdir = self.set_dir(set_name) / "recovery"
        journals: list[dict[str, object]] = []
        for f in sorted(rdir.glob("*.json")) if rdir.is_dir() else ():
            if not recovery.valid_run_id(f.stem):
                continue
            try:
                d = json.loads(f.read_bytes())
                journals.append(d if isinstance(d, dict) else {"point_id": "~"})
            except ValueError:
                journals.append({"point_id": "~"})  # unreadable: hold everything
        return recovery.held_points(journals)

    # ---------------------------------------------------------------- recovery
    def _recover(self, set_name: str) -> None:
        sdir = self.set_dir(set_name)
        for intent in sorted(sdir.glob("prune-*.json")):
            self._finish_prune(set_name, json.loads(intent.read_bytes()))
            intent.unlink()
            fsync_dir(sdir)
        committed = {(d.image) for m in self.points(set_name) for d in m.disks}
        ddir = sdir / "disks"
        if ddir.is_dir():
            for img in ddir.glob("*/*/*.qcow2"):
                rel = str(img.relative_to(sdir))
                if _STAGING.fullmatch(img.name) or rel not in committed:
                    img.unlink()
                    fsync_dir(img.parent)
        for tmp in (sdir / "points").glob(".*.tmp"):
            tmp.unlink()

    # ----------------------------------------------------------------- writing
    def stage(
        self,
        set_name: str,
        point_id: str,
        parent: mf.Manifest | None,
        disks: Sequence[tuple[str, str, int, bool]],
        seeds: Mapping[tuple[str, str], Path] | None = None,
    ) -> list[StagedDisk]:
        """Create the empty images of a new point: deltas over ``parent``'s images, or full bases (``full``).

        ``seeds`` (reverse protection): a full base starts as a local copy of that
        image (the old primary's surviving disk) instead of empty; nothing crosses the link.
        """
        if not mf.valid_point_id(point_id):
            raise UsageError(f"invalid point id {point_id!r}")
        sdir = self.set_dir(set_name)
        (sdir / "points").mkdir(parents=True, exist_ok=True, mode=0o700)
        if (sdir / "points" / f"{point_id}.json").exists():
            raise ConflictError(f"point {point_id} already exists in {set_name}")
        staged: list[StagedDisk] = []
        try:
            for domain, target, size, full in disks:
                validate_name(domain, "domain name")
                validate_name(target, "disk target")
                final_rel = mf.disk_image_name(domain, target, point_id)
                final = sdir / final_rel
                final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                path = final.parent / f".staging-{point_id}.qcow2"
                path.unlink(missing_ok=True)
                prev = parent.disk(domain, target) if parent and not full else None
                backing = Path(prev.image).name if prev else None
                if prev and prev.virtual_size != size:
                    backing = None  # a resized disk starts a new base
                seed = (seeds or {}).get((domain, target))
                seeded = seed is not None and backing is None
                staged.append(StagedDisk(domain, target, size, path, final, backing, seeded))  # so a failure removes it
                if seed is not None and seeded:
                    qemu_img.convert_qcow2(seed, path)
                    continue
                # an empty image (in-process): a valid image even if no writer follows; a StagedWriter rewrites it
                create_image(path, size, backing, mode=0o600)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    @contextlib.contextmanager
    def writer(self, disk: StagedDisk) -> Iterator[StagedWriter]:
        """A writer into a staged image; on normal exit the image is complete (not yet fsynced: see commit)."""
        w = StagedWriter(disk)
        try:
            yield w
        except BaseException:
            w.abandon()
            raise
        w.finish()

    def commit(
        self, set_name: str, manifest: mf.Manifest, staged: Sequence[StagedDisk], shipped: dict[tuple[str, str], int]
    ) -> mf.Manifest:
        """Make the point durable and visible: images fsynced and renamed, then the manifest (the commit record)."""
        sdir = self.set_dir(set_name)
        records = []

        def durable_digest(path: Path) -> str:
            fsync_file(path)
            return sha256_file(path)

        # fsync and hash every image side by side (hashlib releases the GIL), then rename each
        with ThreadPoolExecutor(max_workers=4) as pool:
            digests = list(pool.map(durable_digest, [s.path for s in staged]))
        for s, digest in zip(staged, digests, strict=True):
            os.replace(s.path, s.final)
            fsync_dir(s.final.parent)
            prev = manifest.disk(s.domain, s.target)
            assert prev is not None
            records.append(
                replace(
                    prev,
                    image=str(s.final.relative_to(sdir)),
                    backing=s.backing,
                    virtual_size=s.virtual_size,
                    bytes_shipped=shipped.get((s.domain, s.target), 0),
                    sha256=digest,
                )
            )
        _fault("after-rename")
        final = replace(manifest, disks=tuple(records), committed_utc=datetime.now(UTC).isoformat().replace("+00:00", "Z"))
        save_file(sdir / "points" / f"{manifest.point_id}.json", final.to_json(), 0o600)
        return final

    def discard(self, staged: Sequence[StagedDisk]) -> None:
        for s in staged:
            s.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------- prune
    def prune(self, set_name: str, policy: Policy, now: datetime, *, protect: frozenset[str] = frozenset()) -> list[str]:
        """Delete the points ``core.retention.prune`` selects (except ``protect``), merging each into its child."""
        pts = self.points(set_name)
        times = [PointTime(m.point_id, _parse_time(m.time_utc)) for m in pts]
        doomed = [p for p in recovery.prunable(prune(times, now, policy), self.held_points(set_name)) if p not in protect]
        for pid in doomed:
            pts = self.points(set_name)
            ids = [m.point_id for m in pts]
            i = ids.index(pid)
            child = pts[i + 1] if i + 1 < len(pts) else None
            if child is None:
                continue  # never delete the newest
            intent = {"point": pid, "child": child.point_id, "parent": pts[i].parent or ""}
            path = self.set_dir(set_name) / f"prune-{pid}.json"
            save_file(path, json.dumps(intent).encode(), 0o600)
            self._finish_prune(set_name, intent)
            path.unlink()
            fsync_dir(path.parent)
        return list(doomed)

    def _finish_prune(self, set_name: str, intent: dict[str, str]) -> None:
        """Idempotent: merge point X into its child C, so C keeps its content and X disappears."""
        sdir = self.set_dir(set_name)
        x_id, c_id = intent["point"], intent["child"]
        x_manifest_path = sdir / "points" / f"{x_id}.json"
        if x_manifest_path.exists():
            x_manifest_path.unlink()
            fsync_dir(x_manifest_path.parent)
        c = self.point(set_name, c_id)
        for d in c.disks:
            c_img = sdir / d.image
            x_img = c_img.parent / mf.point_file(x_id)
            if x_img.exists() and d.backing == x_img.name:
                # C's view never changes: commit writes only clusters C has into X.
                qemu_img.commit_into_backing(c_img)
                fsync_file(x_img)
                os.replace(x_img, c_img)
                fsync_dir(c_img.parent)
        new_disks = []
        for d in c.disks:
            c_img = sdir / d.image
            backing = qemu_img.backing_name(c_img)
            new_disks.append(replace(d, backing=backing, sha256=sha256_file(c_img)))
        parent = (intent["parent"] or None) if c.parent == x_id else c.parent
        save_file(sdir / "points" / f"{c_id}.json", replace(c, disks=tuple(new_disks), parent=parent).to_json(), 0o600)


def _parse_time(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _fault(where: str) -> None:
    """Test-only fault injection: CGREP_FAULT_RECEIVER=<where> kills this process there."""
    faults.die_at("RECEIVER", where)
