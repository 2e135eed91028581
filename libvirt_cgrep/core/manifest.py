"""Recovery-point manifests (replica format v1). Pure: build, serialise, parse, validate.

A manifest is the commit record of one recovery point: a point exists on a
target iff its manifest file exists there (see docs/replica-format.md). It
names, per disk, the point's top image (relative to the set directory), its
backing file (relative to the image's directory, always inside the target),
its virtual size, the bytes shipped for it and the SHA-256 of the image file.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from libvirt_cgrep.errors import CgrepError

FORMAT = "libvirt-cgrep-point"
VERSION = 1
TARGET_FORMAT = "libvirt-cgrep-replica"
TARGET_VERSION = 1

_POINT_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z(?:-[0-9]+)?")
_REL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*(?:/[A-Za-z0-9][A-Za-z0-9_.+-]*)*")


class ManifestError(CgrepError):
    """A manifest is malformed or of an unknown version (the point is not trusted)."""


@dataclass(frozen=True)
class DiskRecord:
    """One disk of a point. ``image`` is relative to the set directory."""

    domain: str
    target: str
    image: str
    backing: str | None
    virtual_size: int
    bytes_shipped: int
    sha256: str
    source_image: str
    primary_base: str


@dataclass(frozen=True)
class DomainRecord:
    name: str
    uuid: str | None
    xml: str


@dataclass(frozen=True)
class Manifest:
    """The commit record of one point."""

    point_id: str
    time_utc: str
    set_name: str
    group: str | None
    parent: str | None
    fence: str
    consistency: str
    domains: tuple[DomainRecord, ...]
    disks: tuple[DiskRecord, ...]
    committed_utc: str = ""
    format: str = FORMAT
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def disk(self, domain: str, target: str) -> DiskRecord | None:
        for d in self.disks:
            if d.domain == domain and d.target == target:
                return d
        return None

    def with_disk(self, new: DiskRecord) -> Manifest:
        disks = tuple(new if (d.domain, d.target) == (new.domain, new.target) else d for d in self.disks)
        return replace(self, disks=disks)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["domains"] = [asdict(x) for x in self.domains]
        d["disks"] = [asdict(x) for x in self.disks]
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()


def disk_image_name(domain: str, target: str, point_id: str) -> str:
    """Where a disk's image of a point lives, relative to the set directory."""
    return f"disks/{domain}/{target}/{point_file(point_id)}"


def point_file(point_id: str) -> str:
    """A point's image file name in its disk's directory: what the next layer names as its backing."""
    return f"{point_id}.qcow2"


def point_of_file(name: str) -> str:
    """The point id a backing file name (:func:`point_file`) names."""
    return name.removesuffix(".qcow2")


def valid_point_id(pid: str) -> bool:
    return bool(_POINT_ID.fullmatch(pid))


def _safe_rel(path: str) -> bool:
    return bool(_REL.fullmatch(path)) and ".." not in path.split("/")


def parse(data: bytes, *, committed: bool = True) -> Manifest:
    """Parse and validate a manifest; ManifestError if it is malformed or of another version.

    ``committed=False`` accepts a draft whose image names the receiver has yet to fill in.
    """
    try:
        d = json.loads(data)
        if d.get("format") != FORMAT:
            raise ManifestError(f"not a point manifest (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise ManifestError(f"manifest version {d.get('version')!r} is not supported (this reader: {VERSION})")
        m = Manifest(
            point_id=d["point_id"],
            time_utc=d["time_utc"],
            set_name=d["set_name"],
            group=d.get("group"),
            parent=d.get("parent"),
            fence=d["fence"],
            consistency=d["consistency"],
            domains=tuple(DomainRecord(**x) for x in d["domains"]),
            disks=tuple(DiskRecord(**x) for x in d["disks"]),
            committed_utc=d.get("committed_utc", ""),
            extra=d.get("extra", {}),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"malformed manifest: {exc}") from exc
    if not valid_point_id(m.point_id) or (m.parent is not None and not valid_point_id(m.parent)):
        raise ManifestError(f"malformed point id in manifest {m.point_id!r}")
    for disk in m.disks if committed else ():
        if not _safe_rel(disk.image) or (disk.backing is not None and not _safe_rel(disk.backing)):
            raise ManifestError(f"manifest {m.point_id}: image path outside the target: {disk.image!r}")
    return m


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    """The manifest as the JSON object it is written as (the stream carries it so)."""
    d: dict[str, Any] = json.loads(m.to_json())
    return d


def manifest_from_dict(d: dict[str, Any], *, committed: bool = True) -> Manifest:
    """Parse a manifest received as a JSON object; ManifestError as :func:`parse`."""
    return parse(json.dumps(d).encode(), committed=committed)
