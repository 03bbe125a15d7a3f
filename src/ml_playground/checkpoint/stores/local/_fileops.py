"""The file-system calls a local save makes, in one place: tests fail the N-th one for real.

Commits use a rename that never replaces an existing name (``renameat2(RENAME_NOREPLACE)`` on Linux,
else a hard link), and ``fsync`` (``F_FULLFSYNC`` on macOS).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

__all__ = ["NO_FOLLOW", "FileOps", "fsync_dir", "open_regular_file"]

logger = logging.getLogger(__name__)

NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
"""Flags of every file we open in a run location: a symlink planted there is never followed."""


def _linux_libc(name: str, *argtypes: Any) -> Any:
    """The Linux libc function ``name`` returning an int (errno kept), or None where it does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _linux_libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2
_RENAMEAT2 = _linux_libc("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
"""What ``renameat2`` answers on a file system without ``RENAME_NOREPLACE`` (NFS, many FUSE mounts), or
under a seccomp filter that refuses the call (EPERM; a real permission problem fails the link again)."""
_NO_HARD_LINKS = {errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL}


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, decided atomically where the file system can.

    ``renameat2(RENAME_NOREPLACE)`` on Linux; where that is missing, a hard link (which fails if ``dst``
    exists) and an unlink of ``src``. Only a file system with neither (some FUSE mounts) gets a check and a
    rename, two steps, so two writers of one name in the same instant could both pass the check there.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if dst.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.replace(src, dst)
        return
    # Linked: the checkpoint is committed. A temporary left behind is disk space, not a wrong checkpoint.
    try:
        os.unlink(src)
    except OSError as exc:
        logger.warning("committed %s but could not remove its temporary %s (%s); delete it by hand", dst, src, exc)


class FileOps:
    """The file-system calls a save makes, in one place, so tests can fail the N-th one for real.

    Subclass and override to inject faults; the default calls the OS.
    """

    def open(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o644)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk now, without waiting.

        Durability still comes from ``fsync``; this only lets the disk work while the rest of the file
        is being produced, so the final fsync has little left to do (docs/performance.md). A no-op
        where ``sync_file_range`` does not exist; its errors are ignored because fsync reports them.
        """
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def fsync(self, fd: int) -> None:
        _full_fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename_no_replace(self, src: Path, dst: Path) -> None:
        """Rename ``src`` to ``dst``, or raise FileExistsError if ``dst`` exists: a committed name is never replaced."""
        _rename_no_replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fsync_dir(path)

    def unlink(self, path: Path) -> None:
        os.unlink(path)


def open_regular_file(path: Path) -> int:
    """A read-only descriptor of ``path`` if it is a regular file, opened without following a symlink and
    without blocking (a FIFO with no writer would hang the open). Raises OSError: ELOOP for a symlink,
    EINVAL (with a message saying what it is) for anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NO_FOLLOW)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise OSError(errno.EINVAL, f"{kind}, not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _full_fsync(fd: int) -> None:
    if sys.platform == "darwin":  # macOS's fsync does not flush the drive's cache; F_FULLFSYNC does
        import fcntl

        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _full_fsync(fd)
    finally:
        os.close(fd)
