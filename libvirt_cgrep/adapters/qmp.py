"""QMP as a synchronous adapter over qemu.qmp's async ``QMPClient``.

Each :class:`QMPConnection` owns a private asyncio event loop and runs every
call to completion on it, so callers stay synchronous. It is not thread-safe
and must not be used from inside a running event loop.

Guarantees:

- every wait has a timeout; nothing here blocks forever;
- every failure is a :class:`~libvirt_cgrep.errors.QMPError` with a one-line
  message: :class:`QMPCommandError` when QEMU answered with an error (its
  ``error_class`` is kept), :class:`QMPOutcomeUnknown` when the command was
  sent but no answer came (timeout or lost connection). After the latter the
  caller must re-query QEMU's state, never blindly retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp import QMPError as LibQMPError
from qemu.qmp.message import Message

from libvirt_cgrep.errors import QMPCommandError, QMPError, QMPOutcomeUnknown

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Seconds to wait for a connection and its capabilities negotiation.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for a disconnect to finish.
DISCONNECT_TIMEOUT = 2.0


class QMPConnection:
    """One QMP session to a QEMU monitor socket (QEMU accepts one client per monitor)."""

    def __init__(self, socket_path: str, timeout: float = CONNECT_TIMEOUT) -> None:
        """Connect and negotiate; QMPError if that fails within ``timeout`` seconds."""
        self.socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._client: QMPClient | None = None
        try:
            self._connect(timeout)
        except BaseException:
            self._loop.close()
            raise

    # -- plumbing ---------------------------------------------------------

    def _run(self, coro: Awaitable[_T], timeout: float, what: str) -> _T:
        """Run ``coro`` on the private loop with a timeout; map library errors to QMPError."""
        if self._loop.is_closed():
            raise QMPError(f"QMP {what} on {self.socket_path}: the connection is closed")
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError as exc:
            raise QMPOutcomeUnknown(f"QMP {what} on {self.socket_path}: no answer within {timeout:g} s") from exc
        except ExecuteError as exc:
            raise QMPCommandError(f"QMP {what} failed: {exc.error_class}: {exc}", exc.error_class) from exc
        except ExecInterruptedError as exc:
            raise QMPOutcomeUnknown(f"QMP {what} on {self.socket_path} was interrupted: {exc or 'disconnected'}") from exc
        except LibQMPError as exc:
            raise QMPError(f"QMP {what} on {self.socket_path} failed: {exc}") from exc
        except (OSError, EOFError) as exc:
            raise QMPOutcomeUnknown(f"QMP {what} on {self.socket_path} lost the connection: {exc}") from exc

    def _connect(self, timeout: float) -> None:
        async def go() -> QMPClient:
            client = QMPClient(f"cgrep:{self.socket_path}")
            try:
                await client.connect(self.socket_path)
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                raise
            return client

        try:
            self._client = self._run(go(), timeout, "connect")
        except QMPError as exc:
            raise QMPError(f"cannot connect to QMP socket {self.socket_path}: {_cause(exc)}") from exc

    @property
    def client(self) -> QMPClient:
        if self._client is None:
            raise QMPError(f"QMP connection to {self.socket_path} is closed")
        return self._client

    # -- API --------------------------------------------------------------

    def execute(self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10.0) -> Any:
        """Run one command and return its ``return`` value."""
        return self._run(self.client.execute(cmd, args), timeout, cmd)

    def run_job(self, create_args: Mapping[str, object], timeout: float = 30.0) -> None:
        """Run one ``blockdev-create`` job to its end, then ``job-dismiss`` it.

        ``create_args`` are the arguments of ``blockdev-create`` (``job-id`` and
        ``options``). Returns once the job concluded without error; raises
        QMPError with the job's error otherwise. A job still running at the
        deadline is cancelled (best effort) before the error is raised.
        """
        self.job("blockdev-create", create_args, timeout=timeout)

    def job(self, cmd: str, args: Mapping[str, object], timeout: float = 30.0) -> None:
        """Start a job with ``cmd`` (``args`` name its ``job-id``), await its end, read its error, dismiss it.

        The job must not dismiss itself (``blockdev-create`` never does; block
        jobs need ``auto-dismiss: false`` in ``args``): its error is read from
        ``query-jobs`` before ``job-dismiss``. Returns once the job concluded
        without error. Raises :class:`QMPCommandError` if QEMU refused to start
        it (no job of ours exists), QMPError with the job's error if it failed,
        and :class:`QMPOutcomeUnknown` if it did not conclude within
        ``timeout`` seconds or the connection was lost; then the job is
        cancelled and dismissed (best effort) and the caller must re-query
        QEMU's state (the job may have completed just before the cancel).
        """
        job_id = str(args["job-id"])
        client = self.client

        def ours(event: Message) -> bool:
            data = event.get("data")
            return isinstance(data, dict) and data.get("id") == job_id

        async def wait_concluded(listener: EventListener) -> None:
            async for event in listener:
                data = event.get("data")
                if isinstance(data, dict) and data.get("status") == "concluded":
                    return

        def abandon() -> None:
            """Best effort after a timeout or lost answer: cancel and dismiss the job if it exists."""
            with contextlib.suppress(QMPError):
                self.execute("job-cancel", {"id": job_id}, timeout=2.0)
            with contextlib.suppress(QMPError):
                self._run(wait_concluded(listener), 5.0, f"cancelling job {job_id}")
            with contextlib.suppress(QMPError):
                self.execute("job-dismiss", {"id": job_id}, timeout=2.0)

        listener = EventListener(names=("JOB_STATUS_CHANGE",), event_filter=ours)
        with client.listen(listener):
            try:
                self.execute(cmd, args, timeout=min(timeout, 10.0))
                self._run(wait_concluded(listener), timeout, f"{cmd} job {job_id}")
            except QMPCommandError:
                raise  # refused: no job of ours exists (the id may be someone else's)
            except QMPError:
                abandon()
                raise
        error: str | None = None
        for job in self.execute("query-jobs"):
            if job.get("id") == job_id:
                error = job.get("error")
        self.execute("job-dismiss", {"id": job_id})
        if error is not None:
            raise QMPError(f"{cmd} job {job_id} failed: {error}")

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is None or self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT))
        except Exception as exc:  # the session is gone either way
            log.debug("QMP disconnect from %s: %s", self.socket_path, exc)

    def close(self) -> None:
        """Disconnect and close the private loop. Idempotent; never raises."""
        if self._loop.is_closed():
            return
        self._disconnect()
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def __enter__(self) -> QMPConnection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _cause(exc: BaseException) -> str:
    """The innermost message of an exception chain, on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return " ".join(str(exc).split()) or type(exc).__name__


def cont(socket_path: str, timeout: float = 5.0) -> None:
    """Resume the QEMU behind ``socket_path`` unless it is already running.

    Used by the guardian: connects, ``query-status``, ``cont`` if the VM is
    not running, disconnects. Raises QMPError if QEMU cannot be reached.
    """
    with QMPConnection(socket_path, timeout=timeout) as qmp:
        status = qmp.execute("query-status", timeout=timeout)
        if not status.get("running"):
            qmp.execute("cont", timeout=timeout)
