"""libvirt-python as an adapter.

Every libvirt call that can fail goes through :func:`call`, which turns
``libvirt.libvirtError`` into the project's error tree with the libvirt
message kept. Domain XML leaves this module as frozen dataclasses.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from libvirt_cgrep.core.domxml import chain_of, disk_sources, parse_qemu_owner
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


#: The one domain-XML disk parser is ``core.domxml``; its old name here serves the lab and CLI callers.
disks_from_xml = disk_sources


def persistent_xml(dom: libvirt.virDomain) -> str:
    """The persistent (inactive) definition, which is what a restart uses."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    xml: str = call("reading the domain definition", dom.XMLDesc, flags)
    return xml


def live_xml(dom: libvirt.virDomain) -> str:
    xml: str = call("reading the live domain definition", dom.XMLDesc, 0)
    return xml


# --- protection metadata ---
#: A libvirt domain handle, for the layers that may not import the binding.
Domain = libvirt.virDomain
#: A libvirt connection handle, for the layers that may not import the binding.
Connection = libvirt.virConnect


def protection_xml(dom: libvirt.virDomain, ns: str) -> str | None:
    """Our metadata element (namespace ``ns``) of the persistent definition; None if the domain has none."""
    try:
        xml: str = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise translate(exc, "reading metadata") from exc
    return xml


def set_protection_xml(dom: libvirt.virDomain, name: str, ns: str, prefix: str, xml: str | None) -> None:
    """Set (or with None remove) our metadata element, live and persistent."""
    live = call("reading domain state", dom.isActive)
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
    if xml is None:
        call(f"removing metadata of {name!r}", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, ns, flags)
    else:
        call(f"writing metadata of {name!r}", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, prefix, ns, flags)


def list_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """Every defined domain (persistent or transient)."""
    doms: list[libvirt.virDomain] = call("listing domains", conn.listAllDomains, 0)
    return doms


def domain_name(dom: libvirt.virDomain) -> str:
    name: str = call("reading a domain's name", dom.name)
    return name


_EVENT_LOOP: list[bool] = []


def start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread (domain events and keepalive need it); once per process."""
    if _EVENT_LOOP:
        return
    _EVENT_LOOP.append(True)
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()


def connect_watched(uri: str, on_lifecycle: Callable[[str, bool], None], on_change: Callable[[], None]) -> libvirt.virConnect:
    """A connection with keepalive and events: ``on_lifecycle(domain, defined_or_undefined)`` for each lifecycle
    event, ``on_change()`` for metadata changes and the connection's close. UnavailableError (libvirt's message)."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise UnavailableError(exc.get_error_message() or str(exc)) from exc
    with contextlib.suppress(libvirt.libvirtError):
        conn.setKeepAlive(2, 3)
    edges = (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED)

    def lifecycle(_c: object, dom: libvirt.virDomain, event: int, _detail: int, _o: object) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            on_lifecycle(dom.name(), event in edges)

    try:
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, lambda *a: on_change(), None)
        conn.registerCloseCallback(lambda *a: on_change(), None)
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        raise translate(exc, "registering for domain events") from exc
    return conn


def alive(conn: libvirt.virConnect) -> bool:
    """Whether the connection still works (False on any libvirt failure)."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def close(conn: libvirt.virConnect) -> None:
    """Close a connection, ignoring libvirt's failures (it may be broken already)."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


# --- recovery and continuous ---
#: A libvirt virtual network handle, for the layers that may not import the binding.
Network = libvirt.virNetwork


def find(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """The domain called ``name``, or None when libvirt cannot give it (whatever the reason)."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def uuid_owner(conn: libvirt.virConnect, uuid: str) -> str | None:
    """The name of the domain with this UUID, or None when libvirt cannot give one."""
    try:
        name: str = conn.lookupByUUIDString(uuid).name()
    except libvirt.libvirtError:
        return None
    return name


def metadata_or_none(dom: libvirt.virDomain, ns: str) -> str | None:
    """Our metadata element (namespace ``ns``) of the persistent definition; None on any libvirt failure."""
    try:
        xml: str = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError:
        return None
    return xml


def undefine(dom: libvirt.virDomain, what: str) -> None:
    """Undefine a domain with its snapshot and checkpoint metadata, managed save and NVRAM."""
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    call(what, dom.undefineFlags, flags)


def find_network(conn: libvirt.virConnect, name: str) -> libvirt.virNetwork | None:
    """The virtual network called ``name``, or None when libvirt cannot give it."""
    try:
        return conn.networkLookupByName(name)
    except libvirt.libvirtError:
        return None


def snapshot_disk_only(dom: libvirt.virDomain, what: str, xml: str) -> None:
    """``virDomainSnapshotCreateXML(DISK_ONLY|ATOMIC|NO_METADATA)``: external overlays, all disks or none."""
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    )
    call(what, dom.snapshotCreateXML, xml, flags)


def on_close(conn: libvirt.virConnect, callback: Callable[[int], None]) -> None:
    """Run ``callback(reason)`` when the connection closes; nothing if libvirt refuses (one callback per connection)."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.registerCloseCallback(lambda _c, reason, _o: callback(reason), None)


def clear_on_close(conn: libvirt.virConnect) -> None:
    """Remove the connection's close callback; never raises."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()


#: Block-copy job flags: the export is ours (REUSE_EXT), the job leaves no trace (TRANSIENT_JOB) and once
#: READY a guest write completes only when it is on the export too (SYNCHRONOUS_WRITES).
COPY_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    | libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
)
_JOB_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "gone",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "cancelled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}
_STOP_EVENTS = (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_CRASHED)


def block_copy(dom: libvirt.virDomain, what: str, target: str, dest_xml: str, bandwidth: int | None, *, shallow: bool) -> None:
    """One ``virDomainBlockCopy`` of disk ``target`` into ``dest_xml`` with :data:`COPY_FLAGS`, never pivoted.

    ``bandwidth`` (bytes/s) limits the background copy; ``shallow`` copies only the active image.
    """
    params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else None
    flags = COPY_FLAGS | (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW if shallow else 0)
    call(what, dom.blockCopy, target, dest_xml, params, flags)


def watch_copy_jobs(
    conn: libvirt.virConnect, dom: libvirt.virDomain, on_job: Callable[[str, str], None], on_stop: Callable[[], None]
) -> list[int]:
    """Register for ``dom``'s events: ``on_job(disk, state)`` for each copy-job event (``ready``, ``failed``,
    ``cancelled``, ``gone`` or ``syncing``), ``on_stop()`` when the domain stops. Both run in the event thread.
    Returns the registrations (for :func:`unwatch`)."""

    def job(_c: object, _d: object, disk: str, kind: int, status: int, _o: object) -> None:
        if kind == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
            on_job(disk, _JOB_STATUS.get(status, "syncing"))

    def lifecycle(_c: object, _d: object, event: int, _detail: int, _o: object) -> None:
        if event in _STOP_EVENTS:
            on_stop()

    register = conn.domainEventRegisterAny
    return [
        call("registering for block-job events", register, dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, job, None),
        call("registering for lifecycle events", register, dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None),
    ]


def unwatch(conn: libvirt.virConnect, ids: list[int]) -> None:
    """Deregister event callbacks; never raises."""
    for i in ids:
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(i)


def copy_job(dom: libvirt.virDomain, target: str) -> tuple[int, int] | None:
    """(bytes copied, bytes to copy) of disk ``target``'s copy job, asked now; None if QEMU runs none (or libvirt fails)."""
    try:
        info = dom.blockJobInfo(target, 0)
    except libvirt.libvirtError:
        return None
    if not info or info.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
        return None
    return int(info.get("cur", 0)), int(info.get("end", 0))


def write_stats(dom: libvirt.virDomain, target: str) -> tuple[int, int]:
    """(write operations, their total time in ns) of disk ``target``, QEMU's counters; (0, 0) if libvirt fails."""
    try:
        st = dom.blockStatsFlags(target, 0)
    except libvirt.libvirtError:
        return 0, 0
    return int(st.get("wr_operations", 0)), int(st.get("wr_total_times", 0))


def abort_block_job(dom: libvirt.virDomain, target: str) -> None:
    """Cancel disk ``target``'s block job (never a pivot); never raises."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.blockJobAbort(target, 0)


# --- engine ---
#: One atomic, metadata-free, external disk-only snapshot onto pre-made overlays (see engine.libvirt_backend).
SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
)

QEMU_CONF = "/etc/libvirt/qemu.conf"


def is_active(dom: libvirt.virDomain) -> bool:
    return bool(call("reading domain state", dom.isActive))


def uuid_of(dom: libvirt.virDomain) -> str:
    uuid: str = call("reading the domain's UUID", dom.UUIDString)
    return uuid


def live_chain(dom: libvirt.virDomain, target: str) -> tuple[str, ...]:
    """The live backing chain of disk ``target``, active image first; LibvirtError if there is no such disk."""
    chain = chain_of(live_xml(dom), target)
    if chain is None:
        raise LibvirtError(f"{domain_name(dom)}: no disk {target}")
    return chain


def snapshot(dom: libvirt.virDomain, xml: str) -> None:
    """``virDomainSnapshotCreateXML(xml, SNAPSHOT_FLAGS)``: one atomic cut; our error (message ``snapshot: ...``)."""
    call("snapshot", dom.snapshotCreateXML, xml, SNAPSHOT_FLAGS)


def resume(dom: libvirt.virDomain, what: str) -> None:
    """Resume the domain with one call; "not paused" is success (idempotent). Our error otherwise."""
    try:
        dom.resume()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and state(dom) != "paused":
            return
        raise translate(exc, what) from exc


def resume_if_paused(dom: libvirt.virDomain, what: str) -> None:
    """Resume the domain if (and only if) it is paused; our error if either call fails."""
    if state(dom) == "paused":
        call(what, dom.resume)


def block_commit(dom: libvirt.virDomain, target: str, base: str, top: str) -> None:
    """Start merging ``top`` (non-active) down into ``base``; libvirt deletes the merged files when the job ends."""
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE
    call(f"folding {target} of {domain_name(dom)!r}", dom.blockCommit, target, base, top, 0, flags)


def block_job_running(dom: libvirt.virDomain, target: str) -> bool:
    """Whether disk ``target`` has a block job."""
    return bool(call("reading the block job", dom.blockJobInfo, target, 0))


def _resolve(value: str, *, group: bool) -> int:
    """A qemu.conf user/group value (``name``, ``+N``, ``N``) as a numeric id; KeyError if unknown."""
    if value.startswith("+") and value[1:].isdigit():
        return int(value[1:])
    try:
        return grp.getgrnam(value).gr_gid if group else pwd.getpwnam(value).pw_uid
    except KeyError:
        if value.isdigit():
            return int(value)
        raise


def qemu_owner(conf: str = QEMU_CONF) -> tuple[int, int] | None:
    """The uid and gid libvirt runs QEMU as on this host, or None if they cannot be resolved."""
    try:
        text = Path(conf).read_text()
    except OSError:
        text = ""
    user, group = parse_qemu_owner(text)
    try:
        return _resolve(user, group=False), _resolve(group, group=True)
    except KeyError:
        return None


# --- lab ---


def metadata(dom: libvirt.virDomain, ns: str, what: str) -> str | None:
    """Our metadata element (namespace ``ns``) of the persistent definition; None if the domain has none.

    Any other libvirt failure is our error, its message prefixed by ``what``.
    """
    try:
        xml: str = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise translate(exc, what) from exc
    return xml


def discard(dom: libvirt.virDomain) -> None:
    """Best effort: destroy the domain if it runs, then undefine it with its snapshot and checkpoint metadata,
    managed save and NVRAM. Never raises (it may be gone already); the caller checks what is left."""
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )


def destroy_quietly(dom: libvirt.virDomain) -> None:
    """Best effort: stop the domain now (a power cut); never raises."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()


def active_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """The running (or paused) domains."""
    doms: list[libvirt.virDomain] = call("listing active domains", conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    return doms


def list_networks(conn: libvirt.virConnect) -> list[libvirt.virNetwork]:
    """Every defined virtual network."""
    nets: list[libvirt.virNetwork] = call("listing networks", conn.listAllNetworks, 0)
    return nets


def network_name(net: libvirt.virNetwork) -> str:
    name: str = call("reading a network's name", net.name)
    return name


def discard_network(net: libvirt.virNetwork) -> None:
    """Best effort: stop and undefine a virtual network; never raises."""
    with contextlib.suppress(libvirt.libvirtError):
        net.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        net.undefine()
