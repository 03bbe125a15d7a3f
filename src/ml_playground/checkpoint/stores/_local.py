"""LocalStore: checkpoints as files in one directory, committed by fsync + rename + directory fsync."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ml_playground.checkpoint._store import TEMP_PREFIX, StoredObject
from ml_playground.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    StorageError,
    StorageUnavailableError,
)

__all__ = ["FileOps", "LocalStore"]

logger = logging.getLogger(__name__)

_HOST_TAG = hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()
_MAX_NAME_BYTES = 255
_UNAVAILABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
_WRITEBACK_CHUNK = 16 << 20
"""Writes are issued in pieces of at most this size, and the disk is asked to start on each piece."""


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
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)

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
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            _full_fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: Path) -> None:
        os.unlink(path)


def _full_fsync(fd: int) -> None:
    if sys.platform == "darwin":  # macOS's fsync does not flush the drive's cache; F_FULLFSYNC does
        import fcntl

        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        os.fsync(fd)


class _FdWriter(io.RawIOBase):
    """A raw binary stream over a file descriptor whose every write goes through ``FileOps``."""

    def __init__(self, fd: int, ops: FileOps) -> None:
        self._fd: int | None = fd
        self._ops = ops
        self._written = 0
        self._kicked = 0
        self.error: OSError | None = None
        """The first write error. torch.save turns it into a RuntimeError (or may carry on), so the
        store keeps it to report the real cause, and every later write fails with it."""

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError("write to a released checkpoint stream")
        return self._fd

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        if self.error is not None:
            raise self.error
        # A short write is fine: BufferedWriter writes the rest. Pieces bound how much dirty page cache
        # waits for the final fsync.
        view = memoryview(data).cast("B")[:_WRITEBACK_CHUNK]  # type: ignore[arg-type]
        try:
            written = self._ops.write(self.fd, view)
            self._written += written
            if self._written - self._kicked >= _WRITEBACK_CHUNK:
                self._ops.start_writeback(self.fd, self._kicked, self._written - self._kicked)
                self._kicked = self._written
        except OSError as exc:
            self.error = exc
            raise
        return written

    def release(self, *, quiet: bool = False) -> None:
        """Close the descriptor; later writes (e.g. a buffer flushed at garbage collection) raise."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if quiet:
            with contextlib.suppress(OSError):
                self._ops.close(fd)
        else:
            self._ops.close(fd)


class LocalStore:
    """Checkpoints as files in ``path``.

    A save writes ``.ckpt-partial.<host>.<pid>.<token>.<name>`` in the same directory, fsyncs it,
    renames it onto ``name`` and fsyncs the directory. Temporaries left by a writer that died are
    never listed, and the next writer on the same host removes them.
    """

    def __init__(self, path: Path, *, create: bool = False, file_ops: FileOps | None = None) -> None:
        self._path = Path(path)
        self._ops = file_ops or FileOps()
        if create:
            self._create()
        elif not self._path.is_dir():
            raise CheckpointNotFoundError(f"checkpoint location {self._path} does not exist or is not a directory")

    @property
    def url(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    def _create(self) -> None:
        try:
            self._path.mkdir(parents=True, exist_ok=True)
            probe = self._path / f"{TEMP_PREFIX}{_HOST_TAG}.{os.getpid()}.probe"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise _translate(exc, f"cannot use {self._path} as a checkpoint location", self._path) from None

    def list(self) -> list[StoredObject]:
        try:
            with os.scandir(self._path) as entries:
                found = []
                for entry in entries:
                    if entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                    found.append(StoredObject(entry.name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        except OSError as exc:
            raise _translate(exc, f"cannot list {self._path}", self._path) from None
        return sorted(found, key=lambda obj: obj.name)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        path = self._child(name)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, after the caller's block
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint {path}") from None
        except OSError as exc:
            raise _translate(exc, f"cannot open {path}", path) from None
        with handle:
            yield handle

    def local_path(self, name: str) -> Path:
        """The file of a committed object, for readers that want a path (``torch.load`` by path, mmap)."""
        path = self._child(name)
        if not path.is_file():
            raise CheckpointNotFoundError(f"no checkpoint {path}")
        return path

    def delete(self, name: str) -> None:
        path = self._child(name)
        try:
            self._ops.unlink(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"cannot delete {path}: it does not exist") from None
        except OSError as exc:
            raise _translate(exc, f"cannot delete {path}", path) from None

    @contextlib.contextmanager
    def write(self, name: str) -> Iterator[IO[bytes]]:
        final = self._child(name)
        if final.exists():
            raise CheckpointExistsError(f"{final} already exists; checkpoints are never overwritten")
        self._remove_stale_temporaries()
        temp = self._path / _temp_name(name)
        committed = False
        raw: _FdWriter | None = None
        stream: io.BufferedWriter | None = None
        try:
            raw = _FdWriter(self._ops.open(temp), self._ops)
            stream = io.BufferedWriter(raw, buffer_size=1 << 20)
            yield stream
            stream.flush()
            if raw.error is not None:  # a write failed and the encoder swallowed it
                raise raw.error
            self._ops.fsync(raw.fd)
            raw.release()
            try:
                self._ops.rename_no_replace(temp, final)
            except FileExistsError:
                raise CheckpointExistsError(
                    f"{final} was written by another writer meanwhile; not overwritten"
                ) from None
            committed = True
            self._ops.fsync_dir(self._path)
        except BaseException as exc:
            if raw is not None:
                raw.release(quiet=True)
            if stream is not None:  # discard the buffer now, not as a failing flush at garbage collection
                with contextlib.suppress(Exception):
                    stream.close()
            for path in (temp, final if committed else None):
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            cause = raw.error if isinstance(exc, Exception) and raw is not None and raw.error is not None else exc
            if isinstance(cause, OSError) and not isinstance(cause, CheckpointExistsError):
                raise _translate(cause, f"saving {final} failed; earlier checkpoints are intact", final) from None
            raise

    def _remove_stale_temporaries(self) -> None:
        try:
            names = [n for n in os.listdir(self._path) if n.startswith(TEMP_PREFIX)]
        except OSError as exc:
            raise _translate(exc, f"cannot list {self._path}", self._path) from None
        for name in names:
            host, _, rest = name[len(TEMP_PREFIX) :].partition(".")
            pid_text = rest.partition(".")[0]
            if host == _HOST_TAG and pid_text.isdigit() and not _pid_alive(int(pid_text)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path / name)

    def _child(self, name: str) -> Path:
        if not name or any(c in name for c in "/\\\0") or name in (".", "..") or name.startswith(TEMP_PREFIX):
            raise ValueError(f"{name!r} is not a valid object name in {self._path}")
        return self._path / name


def _temp_name(name: str) -> str:
    """``.ckpt-partial.<host>.<pid>.<token>.<name>``; without ``<name>`` when that would pass 255 bytes."""
    stem = f"{TEMP_PREFIX}{_HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}"
    full = f"{stem}.{name}"
    return full if len(full.encode("utf-8", "surrogateescape")) <= _MAX_NAME_BYTES else stem


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _translate(exc: OSError, what: str, path: Path) -> StorageError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return StorageError(f"{what}: no space left on the device holding {path}; free space and retry")
    if exc.errno in _UNAVAILABLE_ERRNOS:
        return StorageUnavailableError(f"{what}: {reason} ({path}); check that the location is writable")
    return StorageError(f"{what}: {reason} ({path})")
