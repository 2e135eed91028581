"""The one error tree of libvirt-cgrep, and its exit codes.

Every failure the project reports is a :class:`CgrepError` with a one-line
message. Lower layers raise these (wrapping the cause with ``raise ... from``);
only the CLI entry point turns them into an exit status, through
:func:`exit_code_for`. Nothing else calls ``sys.exit``.

::

    CgrepError                      (base; never raised itself)
     +-- UsageError            64   bad arguments: names, sizes, counts, options
     +-- NotFoundError         65   unknown domain, missing image or file
     +-- StateError            66   a domain or object is in the wrong state
     +-- ConflictError         67   already exists, or locked by another writer
     +-- UnavailableError      68   libvirtd, QEMU or a needed tool is unreachable
     +-- LibvirtError          69   a libvirt call failed (cause wrapped)
     +-- CommandError          71   an external command failed (qemu-img, apt-get...)
     |    +-- LabBuildError    72   building the lab guest failed
     |    +-- Qcow2Error       71   writing a new qcow2 image failed
     |    +-- NBDError         71   an NBD read or qemu-nbd failed
     |    +-- StreamError      71   the link to a receiver broke, or spoke an unknown protocol
     |         +-- StreamIdleError  71   the sender went silent (a dead link); nothing committed
     +-- FenceError            73   a hold passed its deadline; the guardian resumed the guests
     |    +-- GuardianError    73   the guardian could not be armed, or failed to resume in time
     +-- CutError              74   the transaction failed; guests run on their old chains
     +-- QMPError              75   a QMP command failed or timed out (cause wrapped)
     |    +-- QMPCommandError  75   QEMU answered with an error; the command did nothing
     |    +-- QMPOutcomeUnknown 75  no answer came (timeout, lost connection): re-query
     +-- ManifestError         76   a manifest (or a replica's record) is malformed or unsafe:
     |                              untrusted input refused, nothing changed
     +-- CheckError                 the write-order checker
     |    +-- InconsistentError 1   holes or bad records: NOT a consistent cut
     |    +-- CannotCheckError  2   the images could not be read
     +-- InternalError         70   a bug; the message says where

Entry points other than the CLI (the receiver, ``serve``, the guardian, the
lab relay, the agent's cycle children) map their failures through
:func:`exit_code_for` too; a process ended by a test-only fault switch exits
99 (``adapters/faults.FAULT_EXIT``).

Exit status 0 means success; 130 means interrupted (SIGINT).
"""

from __future__ import annotations


class CgrepError(Exception):
    """Base of every error we report. ``str(err)`` is one line for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(CgrepError):
    """Bad input from the operator: nothing was changed."""


class NotFoundError(CgrepError):
    """A named domain, image or file does not exist."""


class StateError(CgrepError):
    """The object exists but is in a state that does not allow the request."""


class ConflictError(CgrepError):
    """The object already exists, or another writer holds it."""


class UnavailableError(CgrepError):
    """A daemon or a tool we need cannot be reached or is not installed."""


class LibvirtError(CgrepError):
    """A libvirt call failed; the libvirt message is kept."""


class CommandError(CgrepError):
    """An external command exited non-zero; its last stderr line is kept."""


class LabBuildError(CommandError):
    """Building the lab guest (kernel, initramfs, workload) failed."""


class FenceError(CgrepError):
    """A hold passed its deadline (or could not be armed); the guests were resumed."""


class CutError(CgrepError):
    """The consistency point's transaction failed; every guest is on its old chain."""


class QMPError(CgrepError):
    """A QMP command failed, timed out or lost its connection."""


class Qcow2Error(CommandError):
    """The image cannot be written (too big for one refcount table cluster, or I/O failed)."""


class NBDError(CommandError):
    """The NBD server refused a request or the connection broke."""


class StreamError(CommandError):
    """The link to the receiver broke or spoke an unknown protocol."""


class StreamIdleError(StreamError):
    """The sender went silent (a dead link); nothing was committed."""


class GuardianError(FenceError):
    """The guardian could not be armed, or did not confirm the resume in time."""


class QMPCommandError(QMPError):
    """QEMU executed the command and answered with an error; nothing was done by it."""

    def __init__(self, message: str, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class QMPOutcomeUnknown(QMPError):
    """The command was sent but no answer came (timeout, lost connection): re-query state."""


class ManifestError(CgrepError):
    """A manifest or another record read from a replica is malformed or unsafe; nothing was changed."""


class CheckError(CgrepError):
    """Base for the write-order checker's two verdicts other than success."""


class InconsistentError(CheckError):
    """The images are NOT one consistent cut: a hole or a bad record."""


class CannotCheckError(CheckError):
    """The images could not be read, so nothing can be said about them."""


class InternalError(CgrepError):
    """An unexpected failure: a bug in libvirt-cgrep."""


#: The one table from error class to exit status. Subclasses not listed
#: take their nearest listed ancestor's code.
EXIT_CODES: dict[type[CgrepError], int] = {
    InconsistentError: 1,
    CannotCheckError: 2,
    UsageError: 64,
    NotFoundError: 65,
    StateError: 66,
    ConflictError: 67,
    UnavailableError: 68,
    LibvirtError: 69,
    InternalError: 70,
    CommandError: 71,
    LabBuildError: 72,
    FenceError: 73,
    CutError: 74,
    QMPError: 75,
    ManifestError: 76,
    CheckError: 2,
    CgrepError: 70,
}

EXIT_OK = 0
EXIT_INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to its exit status (70 for anything unexpected)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_CODES[InternalError]
