"""libvirt-python as an adapter.

Every libvirt call that can fail goes through :func:`call`, which turns
``libvirt.libvirtError`` into the project's error tree with the libvirt
message kept. Domain XML leaves this module as frozen dataclasses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
from lxml import etree

from libvirt_cgrep.errors import (
    CgrepError,
    LibvirtError,
    NotFoundError,
    StateError,
    UnavailableError,
)

T = TypeVar("T")

DEFAULT_URI = "qemu:///system"

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


def _quiet(_ctx: object, _err: object) -> None:
    """Swallow libvirt's default stderr printing: we report errors ourselves."""


libvirt.registerErrorHandler(_quiet, None)


def default_uri() -> str:
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def translate(exc: libvirt.libvirtError, what: str) -> CgrepError:
    """Map a libvirtError to our tree, keeping libvirt's one-line message."""
    code = exc.get_error_code()
    raw = exc.get_error_message() or str(exc) or "unknown error"
    text = f"{what}: {raw.splitlines()[0]}"
    if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_STORAGE_VOL):
        return NotFoundError(text)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return StateError(text)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_AUTH_FAILED):
        return UnavailableError(text)
    return LibvirtError(text)


def call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Call a libvirt function; raise our error (cause kept) if it fails."""
    try:
        return fn(*args)
    except libvirt.libvirtError as exc:
        raise translate(exc, what) from exc


def connect(uri: str | None = None) -> libvirt.virConnect:
    """Open a read-write connection (default: $LIBVIRT_DEFAULT_URI or qemu:///system)."""
    uri = uri or default_uri()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise UnavailableError(f"cannot connect to libvirt at {uri}: is libvirtd running? ({exc.get_error_message()})") from exc


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """The domain called ``name``, or NotFoundError."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotFoundError(f"domain {name!r} not found") from exc
        raise translate(exc, f"looking up domain {name!r}") from exc


def state(dom: libvirt.virDomain) -> str:
    """The domain's state as a word: running, paused, shutoff, ..."""
    st, _reason = call("reading domain state", dom.state)
    return _STATES.get(st, "unknown")


@dataclass(frozen=True)
class DiskSource:
    """A ``<disk>`` of a domain definition: enough to read or check its image."""

    target: str
    device: str
    kind: str
    path: str | None
    format: str | None
    readonly: bool
    shareable: bool


def disks_from_xml(xml: str) -> tuple[DiskSource, ...]:
    """Parse the ``<disk>`` elements of a domain XML, in document order."""
    root = etree.fromstring(xml.encode())
    out: list[DiskSource] = []
    for d in root.iterfind("devices/disk"):
        src = d.find("source")
        drv = d.find("driver")
        tgt = d.find("target")
        path = None
        if src is not None:
            path = src.get("file") or src.get("dev")
        out.append(
            DiskSource(
                target=tgt.get("dev", "") if tgt is not None else "",
                device=d.get("device", "disk"),
                kind=d.get("type", "file"),
                path=path,
                format=drv.get("type") if drv is not None else None,
                readonly=d.find("readonly") is not None,
                shareable=d.find("shareable") is not None,
            )
        )
    return tuple(out)


def persistent_xml(dom: libvirt.virDomain) -> str:
    """The persistent (inactive) definition, which is what a restart uses."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    xml: str = call("reading the domain definition", dom.XMLDesc, flags)
    return xml


def live_xml(dom: libvirt.virDomain) -> str:
    xml: str = call("reading the live domain definition", dom.XMLDesc, 0)
    return xml
