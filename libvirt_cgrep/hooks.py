"""The libvirt qemu hook: install, uninstall, status, and the spool it fills.

The hook (``libvirt_cgrep/data/qemu-hook.sh``) runs inside libvirtd for every
domain operation. For a domain carrying the protection metadata it drops one
small JSON file per ``started``/``reconnect``/``stopped``/``release``/``migrate``
into the spool; the agent reads them with :func:`read_spool` and deletes them
with :func:`consume`. Events are hints (the agent rescans anyway): a lost or
repeated event costs a little latency, never correctness.

libvirtd looks for hook scripts only when it starts and when it reloads: after
the first install, reload it (``systemctl reload libvirtd``, i.e. SIGHUP, which
keeps guests and client connections; measured with libvirt 9.0) or restart it
(guests keep running, client connections drop). Later updates of the script's
content need neither: libvirtd runs the file by path each time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import stat
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from libvirt_cgrep.adapters.fs import save_file
from libvirt_cgrep.errors import ConflictError, InternalError, StateError, UsageError

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
DEFAULT_SPOOL = Path("/var/lib/libvirt-cgrep/spool")
SCRIPT_NAME = "virt-cgrep"
SCRIPT_MODE = 0o755
SPOOL_MODE = 0o700
#: In the script's header comment: how uninstall and install know a file is ours.
MARKER = "# virt-cgrep qemu hook"
OPS = ("started", "reconnect", "stopped", "release", "migrate")
#: A temp file older than this was left by a hook that died mid-write.
STALE_TEMP_SECONDS = 600.0
MAX_EVENT_BYTES = 64 << 10

_SPOOL_LINE = re.compile(r"^SPOOL=(.*)$", re.MULTILINE)
_EVENT_NAME = re.compile(r"^([0-9]{1,30})-([0-9]{1,10})\.json$")


@dataclass(frozen=True)
class InstallResult:
    script: Path
    spool: Path
    created: bool  # the script did not exist before
    changed: bool  # the script was written (new, different content or mode)
    spool_created: bool
    spool_mode_fixed: int | None  # the spool's old mode when it had to be chmod'ed to 0700
    needs_restart: bool  # libvirtd must be reloaded (SIGHUP) or restarted to notice a new hook script

    def as_dict(self) -> dict[str, object]:
        return {
            "script": str(self.script),
            "spool": str(self.spool),
            "created": self.created,
            "changed": self.changed,
            "spool_created": self.spool_created,
            "spool_mode_fixed": None if self.spool_mode_fixed is None else f"{self.spool_mode_fixed:04o}",
            "needs_restart": self.needs_restart,
        }


@dataclass(frozen=True)
class UninstallResult:
    script: Path
    removed: bool

    def as_dict(self) -> dict[str, object]:
        return {"script": str(self.script), "removed": self.removed}


@dataclass(frozen=True)
class HookStatus:
    script: Path
    installed: bool
    up_to_date: bool
    spool: Path  # the spool the installed script writes to (or the one asked about)
    spool_exists: bool
    spool_mode: int | None
    spool_ok: bool  # a directory with mode 0700
    pending: int  # event files waiting in the spool

    def as_dict(self) -> dict[str, object]:
        return {
            "script": str(self.script),
            "installed": self.installed,
            "up_to_date": self.up_to_date,
            "spool": str(self.spool),
            "spool_exists": self.spool_exists,
            "spool_mode": None if self.spool_mode is None else f"{self.spool_mode:04o}",
            "spool_ok": self.spool_ok,
            "pending": self.pending,
        }


@dataclass(frozen=True)
class SpoolEvent:
    domain: str
    op: str
    subop: str
    time: float
    path: Path

    def as_dict(self) -> dict[str, object]:
        return {"domain": self.domain, "op": self.op, "subop": self.subop, "time": self.time, "path": str(self.path)}


# --- the script ---------------------------------------------------------------


def packaged_script() -> str:
    """The hook script shipped in the package, with its default spool."""
    try:
        return resources.files("libvirt_cgrep").joinpath("data/qemu-hook.sh").read_text(encoding="utf-8")
    except OSError as exc:
        raise InternalError(f"the packaged hook script is missing: {exc}") from exc


def _check_dir_arg(path: Path, what: str) -> Path:
    text = str(path)
    if not path.is_absolute():
        raise UsageError(f"{what} must be an absolute path, not {text!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text) or ".." in path.parts:
        raise UsageError(f"{what} {text!r} contains '..' or control characters")
    return path


def render_script(spool: Path = DEFAULT_SPOOL) -> str:
    """The script as ``install`` writes it: the SPOOL line names ``spool``."""
    _check_dir_arg(spool, "spool")
    text = packaged_script()
    if len(_SPOOL_LINE.findall(text)) != 1 or MARKER not in text:
        raise InternalError("the packaged hook script has no single SPOOL= line or lacks its marker")
    return _SPOOL_LINE.sub(lambda _: f"SPOOL={shlex.quote(str(spool))}", text, count=1)


def installed_spool(script_text: str) -> Path | None:
    """The spool an installed script writes to (None if it cannot be read back)."""
    m = _SPOOL_LINE.search(script_text)
    if m is None:
        return None
    try:
        words = shlex.split(m.group(1))
    except ValueError:
        return None
    if len(words) != 1 or not words[0].startswith("/"):
        return None
    return Path(words[0])


def script_path(hooks_dir: Path = DEFAULT_HOOKS_DIR) -> Path:
    return hooks_dir / "qemu.d" / SCRIPT_NAME


def _read_ours(path: Path) -> str | None:
    """The text of our installed script; None when absent; ConflictError when not ours."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ConflictError(f"{path} exists and is not a regular file; remove it first")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = ""
    if MARKER not in text:
        raise ConflictError(f"{path} exists and is not virt-cgrep's hook; refusing to touch it")
    return text


# --- install / uninstall / status -----------------------------------------------


def _ensure_spool(spool: Path) -> tuple[bool, int | None]:
    """Create the spool 0700, or chmod it to 0700; returns (created, old mode if fixed)."""
    try:
        st = spool.lstat()
    except FileNotFoundError:
        try:
            spool.parent.mkdir(parents=True, exist_ok=True)
            spool.mkdir(mode=SPOOL_MODE)
        except OSError as exc:
            raise StateError(f"cannot create the spool {spool}: {exc.strerror or exc}") from exc
        os.chmod(spool, SPOOL_MODE)  # mkdir's mode is masked by the umask
        return True, None
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"spool {spool} exists and is not a directory (symlinks are refused)")
    old = stat.S_IMODE(st.st_mode)
    if old != SPOOL_MODE:
        os.chmod(spool, SPOOL_MODE)
        return False, old
    return False, None


def install(hooks_dir: Path = DEFAULT_HOOKS_DIR, spool: Path = DEFAULT_SPOOL) -> InstallResult:
    """Install (or update) the hook; idempotent. Creates the spool first, so the hook never lacks it."""
    _check_dir_arg(hooks_dir, "hooks directory")
    _check_dir_arg(spool, "spool")
    data = render_script(spool).encode()
    qemu_d = hooks_dir / "qemu.d"
    path = qemu_d / SCRIPT_NAME
    if qemu_d.exists() and not qemu_d.is_dir():
        raise StateError(f"{qemu_d} exists and is not a directory")
    old = _read_ours(path)
    spool_created, fixed = _ensure_spool(spool)
    try:
        qemu_d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create {qemu_d}: {exc.strerror or exc}") from exc
    changed = old is None or old.encode() != data or stat.S_IMODE(path.stat().st_mode) != SCRIPT_MODE
    if changed:
        save_file(path, data, SCRIPT_MODE)
    return InstallResult(
        script=path,
        spool=spool,
        created=old is None,
        changed=changed,
        spool_created=spool_created,
        spool_mode_fixed=fixed,
        needs_restart=old is None,
    )


def uninstall(hooks_dir: Path = DEFAULT_HOOKS_DIR) -> UninstallResult:
    """Remove our hook script (only ours: a foreign file there is a ConflictError). The spool is kept."""
    _check_dir_arg(hooks_dir, "hooks directory")
    path = script_path(hooks_dir)
    if _read_ours(path) is None:
        return UninstallResult(path, removed=False)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return UninstallResult(path, removed=True)


def status(hooks_dir: Path = DEFAULT_HOOKS_DIR, spool: Path | None = None) -> HookStatus:
    """What is installed. Without ``spool``, the spool is the one the installed script names."""
    _check_dir_arg(hooks_dir, "hooks directory")
    if spool is not None:
        _check_dir_arg(spool, "spool")
    path = script_path(hooks_dir)
    try:
        text = _read_ours(path)
    except ConflictError:
        text = None
    if spool is None:
        spool = (installed_spool(text) if text is not None else None) or DEFAULT_SPOOL
    up_to_date = False
    if text is not None:
        try:
            up_to_date = text == render_script(spool) and stat.S_IMODE(path.stat().st_mode) == SCRIPT_MODE
        except UsageError:
            up_to_date = False
    try:
        st = spool.lstat()
    except FileNotFoundError:
        st = None
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    mode = stat.S_IMODE(st.st_mode) if st is not None else None
    pending = sum(1 for name in os.listdir(spool) if _EVENT_NAME.match(name)) if is_dir else 0
    return HookStatus(
        script=path,
        installed=text is not None,
        up_to_date=up_to_date,
        spool=spool,
        spool_exists=st is not None,
        spool_mode=mode,
        spool_ok=is_dir and mode == SPOOL_MODE,
        pending=pending,
    )


# --- the spool --------------------------------------------------------------------


def _parse_event(raw: bytes, path: Path) -> SpoolEvent | None:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    domain, op, subop, when = doc.get("domain"), doc.get("op"), doc.get("subop"), doc.get("time")
    if not (isinstance(domain, str) and domain and isinstance(op, str) and op in OPS and isinstance(subop, str)):
        return None
    if isinstance(when, bool) or not isinstance(when, int | float):
        return None
    return SpoolEvent(domain=domain, op=op, subop=subop, time=float(when), path=path)


def _unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        os.unlink(name, dir_fd=dfd)


def read_spool(spool: Path = DEFAULT_SPOOL) -> list[SpoolEvent]:
    """The pending events, oldest first. A missing spool has none.

    Malformed files, and anything in the spool that is not a regular event
    file (symlinks included: they are never followed), are deleted. Temp files
    of a hook still writing are left alone unless older than ten minutes.
    """
    try:
        dfd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise StateError(f"cannot read the spool {spool}: {exc.strerror or exc}") from exc
    found: list[tuple[tuple[int, int], SpoolEvent]] = []
    try:
        for name in os.listdir(dfd):
            m = _EVENT_NAME.match(name)
            if m is None:
                if name.startswith("."):
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode) or time.time() - st.st_mtime < STALE_TEMP_SECONDS:
                            continue
                _unlink(dfd, name)
                continue
            event = _read_event(dfd, name, spool / name)
            if event is None:
                _unlink(dfd, name)
                continue
            found.append(((int(m.group(1)), int(m.group(2))), event))
    finally:
        os.close(dfd)
    found.sort(key=lambda item: item[0])
    return [e for _, e in found]


def _read_event(dfd: int, name: str, path: Path) -> SpoolEvent | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None  # a symlink, socket or directory: not ours
        if exc.errno == errno.ENOENT:
            return None
        raise StateError(f"cannot read spool file {path}: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, MAX_EVENT_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_EVENT_BYTES:
        return None
    return _parse_event(raw, path)


def consume(spool: Path, events: list[SpoolEvent]) -> None:
    """Delete the files of processed events (already gone: fine). Only event files inside ``spool``."""
    try:
        dfd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        for e in events:
            if e.path.parent != spool or not _EVENT_NAME.match(e.path.name):
                raise UsageError(f"{e.path} is not an event file of the spool {spool}")
            _unlink(dfd, e.path.name)
    finally:
        os.close(dfd)
