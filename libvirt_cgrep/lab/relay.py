"""The host-side relay of a lab group: it carries the dependent-write chain from VM to VM.

A lab group's members run the workload in group mode: member ``I`` of ``V``
writes record ``n`` (``n % V == I``) only when it reads ``GO <n>`` on its
serial console, and then prints ``CGREP DONE seq=<n>``. The relay is the only
one who says GO: on ``DONE n`` from member ``n % V`` it sends ``GO n+1`` to
member ``(n+1) % V``. So record ``n+1`` is issued only after record ``n`` was
acknowledged on another VM, and a cut of the group is consistent only if it
holds the members still (a group fence).

The relay talks to each member through the pty of its ``<serial type='pty'>``
(QEMU's chardev: what is written there is the guest's console input, what the
guest prints can be read there). It reads the pty rather than following the
console log: once a pty is open QEMU sends it every byte the guest prints and
stalls the guest's console when nobody drains it, and reading it is also
quicker than polling the file virtlogd writes. The console log still gets
everything. Where to start is read from the logs: one past the highest record
any member scanned on its disks or acknowledged since it booted.

It never touches an image, it sends one GO at a time and only the next
record's. A GO that got no DONE within :data:`RESEND_S` of the target VM running is
sent again (a paused VM just waits; the guest answers a repeated GO for its
last record with DONE again, without writing). A member whose domain stops is
reconnected when it runs again, and gets the GO it awaits once its workload
scanned its disks (it drops console input that came before); when no member
exists any more the relay exits.

Run detached by ``lab up --group`` (``python -m libvirt_cgrep.lab.relay
--daemon --group G --dir DIR -c URI G-0 G-1 ...``); stopped with SIGTERM by
``lab down``. In the group directory: ``relay.pid``, ``relay.json`` (status,
rewritten every second) and ``relay.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from lxml import etree

from libvirt_cgrep.adapters import libvirt as lv
from libvirt_cgrep.adapters.fs import save_file
from libvirt_cgrep.core.names import validate_name
from libvirt_cgrep.errors import (
    EXIT_OK,
    CgrepError,
    ConflictError,
    InternalError,
    NotFoundError,
    StateError,
    UsageError,
    exit_code_for,
)
from libvirt_cgrep.lab.paths import lab_root

PID_FILE = "relay.pid"
STATUS_FILE = "relay.json"
LOG_FILE = "relay.log"
MODULE = "libvirt_cgrep.lab.relay"

#: Seconds without the awaited DONE before the GO is sent again (target running).
RESEND_S = 2.0
#: Seconds between attempts to reopen the pty of a member whose domain stopped.
RECONNECT_S = 1.0
#: Seconds between rewrites of relay.json.
STATUS_S = 1.0
_LOG_TAIL = 256 << 10

_LINE = re.compile(rb"CGREP (DONE|READY|SCAN|ACK|ERROR|FATAL|EXIT)\b([^\r\n]*)")
_KV = re.compile(rb"(\w+)=(-?\d+)")


def go_line(n: int) -> bytes:
    """The command for record ``n``: 16 bytes for n < 10**12, two UART trigger levels' worth."""
    return f"GO {n:012d}\n".encode()


# ------------------------------------------------------------------ control


@dataclass(frozen=True)
class RelayStatus:
    """A relay as seen from its pid file and status file."""

    pid: int | None
    running: bool
    next: int | None = None
    relayed: int | None = None
    rate: float | None = None
    updated: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "running": self.running,
            "next": self.next,
            "relayed": self.relayed,
            "rate": self.rate,
            "updated": self.updated,
        }


def _read_pid(gdir: Path) -> int | None:
    try:
        text = (gdir / PID_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_our_relay(pid: int, group: str | None) -> bool:
    """``pid`` is a live (not zombie) relay process, of ``group`` when given."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat[stat.rfind(")") + 2 :].startswith(("Z", "X")):
        return False
    args = cmdline.split(b"\0")
    if MODULE.encode() not in args:
        return False
    if group is None:
        return True
    return any(a == b"--group" and b == group.encode() for a, b in itertools.pairwise(args))


def status(gdir: Path) -> RelayStatus:
    """The relay of the group in ``gdir`` (``running`` False when there is none)."""
    pid = _read_pid(gdir)
    running = pid is not None and _is_our_relay(pid, None)
    try:
        data = json.loads((gdir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or data.get("pid") != pid:
        data = {}

    def num(key: str) -> float | None:
        v = data.get(key)
        return v if isinstance(v, int | float) and not isinstance(v, bool) else None

    nxt, relayed = num("next"), num("relayed")
    return RelayStatus(
        pid=pid,
        running=running,
        next=int(nxt) if nxt is not None else None,
        relayed=int(relayed) if relayed is not None else None,
        rate=num("rate"),
        updated=num("updated"),
    )


def start(gdir: Path, group: str, members: Sequence[str], *, uri: str, timeout: float = 120.0) -> int:
    """Start the relay of ``group`` detached; returns its pid once it runs (StateError if it cannot)."""
    argv = [sys.executable, "-m", MODULE, "--daemon", "--group", group, "--dir", str(gdir), "-c", uri]
    argv += ["--timeout", str(int(timeout)), *members]
    try:
        res = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 30, check=False, cwd="/"
        )
    except subprocess.TimeoutExpired as exc:
        stop(gdir, group)
        raise StateError(f"the relay of lab group {group!r} did not start within {timeout:.0f} s") from exc
    if res.returncode != 0:
        lines = [x for x in (res.stderr or "").splitlines() if x.strip()]
        why = lines[-1] if lines else f"exit status {res.returncode}"
        raise StateError(f"the relay of lab group {group!r} did not start: {why} (see {gdir / LOG_FILE})")
    pid = _read_pid(gdir)
    if pid is None or not _is_our_relay(pid, group):
        raise StateError(f"the relay of lab group {group!r} is not running (see {gdir / LOG_FILE})")
    return pid


def stop(gdir: Path, group: str, *, timeout: float = 10.0) -> bool:
    """Stop the relay of ``group`` (SIGTERM, then SIGKILL); True if one was running."""
    pid = _read_pid(gdir)
    if pid is None or not _is_our_relay(pid, group):
        with contextlib.suppress(OSError):
            (gdir / PID_FILE).unlink()
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_our_relay(pid, group):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        (gdir / PID_FILE).unlink()
    return True


# -------------------------------------------------------------------- relay


@dataclass
class _Member:
    name: str
    index: int
    fd: int | None = None
    pty: str | None = None
    log: Path | None = None
    buf: bytearray = field(default_factory=bytearray)
    done: int = -1  # highest DONE seen from this member on its pty
    listening: bool = True  # its workload reads GO lines (it scanned since it booted)
    mark: int = 0  # size of its console log when its console closed: a new boot shows after it


def _log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} relay: {msg}", flush=True)


class Relay:
    """The relay loop over the members' ptys (libvirt through :mod:`libvirt_cgrep.adapters.libvirt`)."""

    def __init__(self, uri: str, group: str, gdir: Path, names: Sequence[str]) -> None:
        self.conn = lv.connect(uri)
        self.group = group
        self.gdir = gdir
        self.members = [_Member(n, i) for i, n in enumerate(names)]
        self.vms = len(self.members)
        self.next = 0
        self.live = False  # relaying (not before the resume point is known)
        self.target_paused = False  # the VM the awaited GO went to was seen not running
        self.sent_at = 0.0
        self.relayed = 0
        self.stopping = False
        self.started = time.time()
        self.poller = select.poll()
        self.by_fd: dict[int, _Member] = {}

    # -- libvirt and ptys

    def _domain(self, name: str) -> lv.Domain | None:
        """The domain, or None if it does not exist (other libvirt failures raise our error)."""
        try:
            return lv.lookup(self.conn, name)
        except NotFoundError:
            return None

    def _running(self, name: str) -> bool:
        try:
            dom = self._domain(name)
            return dom is not None and lv.state(dom) == "running"
        except CgrepError:
            return False

    def connect(self, m: _Member) -> bool:
        """Open the member's pty (its domain must be active); False if it is not there now."""
        dom = self._domain(m.name)
        if dom is None or not lv.is_active(dom):
            return False
        root = etree.fromstring(lv.live_xml(dom).encode())
        serial = root.find("devices/serial[@type='pty']")
        src = serial.find("source") if serial is not None else None
        path = src.get("path") if src is not None else None
        if serial is None or not path:
            raise StateError(f"domain {m.name!r} has no pty serial console")
        log = serial.find("log")
        m.log = Path(log.get("file", "")) if log is not None and log.get("file") else None
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(termios.error):
            tty.setraw(fd)  # no echo of the guest's output back into its input
        m.fd, m.pty, m.buf = fd, path, bytearray()
        self.by_fd[fd] = m
        self.poller.register(fd, select.POLLIN)
        # The pty is open: what the log does not show yet comes here.
        m.listening = b"CGREP SCAN" in self._boot_text(m, since=m.mark)
        return True

    def disconnect(self, m: _Member, why: str) -> None:
        if m.fd is None:
            return
        self.poller.unregister(m.fd)
        del self.by_fd[m.fd]
        with contextlib.suppress(OSError):
            os.close(m.fd)
        m.fd = None
        m.mark = 0
        if m.log is not None:
            with contextlib.suppress(OSError):
                m.mark = m.log.stat().st_size
        _log(f"{m.name}: console closed ({why}); reconnecting when it runs")

    # -- where to start

    def _boot_text(self, m: _Member, since: int = 0) -> bytes:
        """The member's console log since its last boot (the rotated log too when needed).

        With ``since`` > 0 only what the log got past that offset counts, and it
        must show a boot (empty otherwise); a log shorter than that was rotated.
        """
        if m.log is None:
            return b""
        text = b""
        for p in (Path(f"{m.log}.0"), m.log):
            if since and p != m.log:
                continue
            try:
                with open(p, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    start = max(0, size - _LOG_TAIL)
                    if since and size >= since:
                        start = max(start, since)
                    f.seek(start)
                    text += f.read()
            except OSError:
                continue
        i = text.rfind(b"CGREP READY")
        if i < 0:
            return b"" if since else text
        return text[i:]

    def resume_point(self, timeout: float) -> int:
        """One past the highest record any member has, once every member scanned its disks."""
        deadline = time.monotonic() + timeout
        while True:
            highest = -1
            missing = []
            for m in self.members:
                text = self._boot_text(m)
                seen = False
                for kind, rest in _LINE.findall(text):
                    kv = dict(_KV.findall(rest))
                    if kind in (b"FATAL", b"EXIT"):
                        raise StateError(f"workload of {m.name!r} failed: {(kind + rest).decode(errors='replace')}")
                    key = b"max" if kind == b"SCAN" else b"seq"
                    if kind in (b"SCAN", b"DONE", b"ACK") and key in kv:
                        highest = max(highest, int(kv[key]))
                        seen = True
                highest = max(highest, m.done)
                if not seen:
                    missing.append(m.name)
            if not missing:
                return highest + 1
            if time.monotonic() > deadline:
                raise StateError(f"no scan result on the console of {', '.join(missing)} within {timeout:.0f} s")
            self.pump(0.1)

    # -- the chain

    def send(self, n: int, *, again: bool = False) -> None:
        m = self.members[n % self.vms]
        self.sent_at = time.monotonic()
        if not again:
            self.target_paused = False
        if m.fd is None:
            return
        try:
            os.write(m.fd, go_line(n))
        except BlockingIOError:
            _log(f"{m.name}: console input full, GO {n} not sent")
        except OSError as exc:
            self.disconnect(m, exc.strerror or str(exc))
            return
        if again:
            _log(f"{m.name}: no DONE for record {n} within {RESEND_S:.0f} s; sent GO {n} again")

    def line(self, m: _Member, raw: bytes) -> None:
        hit = _LINE.search(raw)
        if hit is None:
            return
        kind, rest = hit.group(1), hit.group(2)
        if kind == b"DONE":
            kv = dict(_KV.findall(rest))
            if b"seq" not in kv:
                return
            n = int(kv[b"seq"])
            m.done = max(m.done, n)
            if not self.live:
                return
            if n == self.next and n % self.vms == m.index:
                self.next = n + 1
                self.relayed += 1
                self.send(self.next)
            elif n > self.next:
                _log(f"{m.name}: DONE {n} ahead of the chain (expected {self.next}); not relayed")
        elif kind == b"SCAN":
            m.listening = True
            if self.live and self.next % self.vms == m.index:
                _log(f"{m.name}: workload (re)started; sending GO {self.next}")
                self.send(self.next)
        elif kind in (b"READY", b"ERROR", b"FATAL", b"EXIT"):
            if kind == b"READY":
                m.listening = False
            _log(f"{m.name}: {raw.decode(errors='replace').strip()}")

    def pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for console output and handle every complete line."""
        for fd, ev in self.poller.poll(int(timeout_s * 1000)):
            m = self.by_fd.get(fd)
            if m is None:
                continue
            data = b""
            if ev & select.POLLIN:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.disconnect(m, exc.strerror or str(exc))
                    continue
            if not data:
                self.disconnect(m, "hang-up")
                continue
            m.buf += data
            while True:
                i = m.buf.find(b"\n")
                if i < 0:
                    break
                raw = bytes(m.buf[:i])
                del m.buf[: i + 1]
                self.line(m, raw)
            if len(m.buf) > 4096:
                del m.buf[:-512]

    def write_status(self, rate: float | None) -> None:
        data = {
            "pid": os.getpid(),
            "group": self.group,
            "next": self.next,
            "relayed": self.relayed,
            "rate": rate,
            "started": self.started,
            "updated": time.time(),
            "members": {m.name: m.pty if m.fd is not None else None for m in self.members},
        }
        save_file(self.gdir / STATUS_FILE, (json.dumps(data, indent=2) + "\n").encode())

    def run(self) -> None:
        """Relay until SIGTERM, or until no member exists any more."""
        self.live = True
        self.send(self.next)
        last_reconnect = last_status = time.monotonic()
        last_relayed = self.relayed
        self.write_status(None)
        while not self.stopping:
            self.pump(0.2)
            now = time.monotonic()
            stalled = now - self.sent_at > RESEND_S
            if stalled or self.target_paused:
                target = self.members[self.next % self.vms]
                if target.fd is None or not target.listening or not self._running(target.name):
                    self.target_paused = True  # paused, stopped or booting: looked at every loop until it runs
                elif self.target_paused:
                    self.target_paused = False
                    self.sent_at = now  # it runs again: the wait for its DONE starts now
                else:
                    self.send(self.next, again=True)
            if now - last_reconnect >= RECONNECT_S and any(m.fd is None for m in self.members):
                last_reconnect = now
                gone = 0
                for m in self.members:
                    if m.fd is not None:
                        continue
                    try:
                        if self._domain(m.name) is None:
                            gone += 1
                        elif self.connect(m):
                            _log(f"{m.name}: console reopened ({m.pty})")
                    except (CgrepError, OSError) as exc:
                        _log(f"{m.name}: cannot reopen its console yet: {exc}")
                if gone == self.vms:
                    _log("no member exists any more; exiting")
                    return
            if now - last_status >= STATUS_S:
                rate = (self.relayed - last_relayed) / (now - last_status)
                last_status, last_relayed = now, self.relayed
                self.write_status(rate)


# --------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Relay the dependent-write chain of a lab group.")
    p.add_argument("--group", required=True, help="the group name")
    p.add_argument("--dir", type=Path, help="the group directory (default $CGREP_LAB_DIR/GROUP)")
    p.add_argument("-c", "--connect", default=None, help="libvirt URI (default $LIBVIRT_DEFAULT_URI or qemu:///system)")
    p.add_argument("--daemon", action="store_true", help="detach; return once relaying (exit 1 with the reason if not)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every member's scan (default 120)")
    p.add_argument("members", nargs="+", metavar="DOMAIN", help="the members, member 0 first")
    return p.parse_args(argv)


def _detach(gdir: Path) -> int:
    """Fork; the parent waits for the child's word and exits with it. Returns the child's write end.

    The word is ``ok`` once relaying, else ``STATUS reason`` with the status
    :func:`libvirt_cgrep.errors.exit_code_for` gave the child's failure. The
    parent leaves with ``os._exit`` (a forked parent must not run the child's
    cleanup): 0, or that status (70, InternalError's, if the child died silently).
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        msg = b""
        while chunk := os.read(r, 4096):
            msg += chunk
        if msg.startswith(b"ok"):
            os._exit(EXIT_OK)
        code, _, why = msg.decode(errors="replace").partition(" ")
        if not code.isdigit() or int(code) == EXIT_OK:
            code, why = str(exit_code_for(InternalError("relay exited during start-up"))), ""
        sys.stderr.write((why.strip() or "relay exited during start-up") + "\n")
        sys.stderr.flush()
        os._exit(int(code))
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(gdir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    return w


def _group_dir(args: argparse.Namespace) -> tuple[str, Path]:
    """The group's name and directory from the arguments; UsageError or ConflictError (nothing started)."""
    group = validate_name(args.group, "group name")
    for n in args.members:
        validate_name(n, "domain name")
    gdir: Path = args.dir or lab_root() / group
    if len(args.members) < 2:
        raise UsageError("a group needs at least 2 members")
    old = _read_pid(gdir)
    if old is not None and _is_our_relay(old, group):
        raise ConflictError(f"the relay of {group!r} already runs (pid {old})")
    return group, gdir


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay (detached with ``--daemon``); the exit status comes from :func:`libvirt_cgrep.errors.exit_code_for`."""
    args = _parse(argv)
    try:
        group, gdir = _group_dir(args)
    except CgrepError as exc:
        print(exc, file=sys.stderr)
        return exit_code_for(exc)
    ready = _detach(gdir) if args.daemon else None
    relay: Relay | None = None
    try:

        def on_signal(_sig: int, _frame: FrameType | None) -> None:
            if relay is not None:
                relay.stopping = True
            else:
                raise SystemExit(EXIT_OK)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        save_file(gdir / PID_FILE, f"{os.getpid()}\n".encode())
        relay = Relay(args.connect or lv.default_uri(), group, gdir, args.members)
        for m in relay.members:
            if not relay.connect(m):
                raise StateError(f"member {m.name!r} is not running")
        relay.next = relay.resume_point(args.timeout)
        _log(f"group {group}: {relay.vms} members, starting at record {relay.next}")
        if ready is not None:
            os.write(ready, b"ok\n")
            os.close(ready)
            ready = None
        relay.run()
        _log(f"stopped; relayed {relay.relayed} records, next {relay.next}")
        return EXIT_OK
    except BaseException as exc:
        why = str(exc) or type(exc).__name__
        _log(f"failed: {why}")
        stopped = isinstance(exc, SystemExit)  # SIGTERM or SIGINT before relaying: a clean stop, but no start
        if ready is not None:
            failed = exit_code_for(StateError(why) if stopped else exc)
            with contextlib.suppress(OSError):
                os.write(ready, f"{failed} {why}".encode())
        return EXIT_OK if stopped else exit_code_for(exc)
    finally:
        if _read_pid(gdir) == os.getpid():
            with contextlib.suppress(OSError):
                (gdir / PID_FILE).unlink()


if __name__ == "__main__":
    sys.exit(main())
