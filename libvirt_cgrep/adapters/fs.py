"""Durable file writes: the only way libvirt-cgrep writes a file that must survive.

``save_file`` guarantees that after it returns, the file has either its old
content or the complete new content, even across a crash: temp file in the same
directory, fsync, ``os.replace``, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path | str) -> None:
    """fsync one file's data and inode (not its directory entry: :func:`fsync_dir`)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_all(paths: Sequence[Path | str]) -> None:
    """fsync every file in ``paths`` side by side: the filesystem commits its journal once for all of them,
    not once per file (a guest flushing meanwhile waits behind each commit)."""
    if len(paths) <= 1:
        for p in paths:
            fsync_file(p)
        return
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        list(pool.map(fsync_file, paths))


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes between two files in the kernel (``copy_file_range``: no pages through this process).

    Falls back to ``pread``/``pwrite`` where the kernel refuses (another filesystem). OSError on a short source.
    """
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            buf = os.pread(src, min(length - done, 4 << 20), src_offset + done)
            n = os.pwrite(dst, buf, dst_offset + done) if buf else 0
        if n == 0:
            raise OSError(errno.EIO, f"short read at {src_offset + done}: the source ends early")
        done += n


def save_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically and durably replace ``path`` with ``data``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
