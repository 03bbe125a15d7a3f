"""LocalStore: checkpoints as files in one directory, committed by fsync + rename + directory fsync."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO

from ml_playground.checkpoint._store import TEMP_PREFIX, Capabilities, StoredObject
from ml_playground.checkpoint._streams import FailureKeeping
from ml_playground.checkpoint.stores._translate import os_error
from ml_playground.checkpoint.stores.local._fileops import NO_FOLLOW, FileOps, open_regular_file
from ml_playground.checkpoint.stores.local._lease import WriterLease, lease_state
from ml_playground.errors import CheckpointExistsError, CheckpointNameError, CheckpointNotFoundError, StorageError
from ml_playground.locations import LocalLocation

__all__ = ["LocalStore"]

logger = logging.getLogger(__name__)

_HOST_TAG = hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()
_MAX_NAME_BYTES = 255
_WRITEBACK_CHUNK = 16 << 20
"""Writes are issued in pieces of at most this size, and the disk is asked to start on each piece."""


class _FdWriter(io.RawIOBase):
    """A raw binary stream over a file descriptor whose every write goes through ``FileOps``."""

    def __init__(self, fd: int, ops: FileOps) -> None:
        self._fd: int | None = fd
        self._ops = ops
        self._written = 0
        self._kicked = 0

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError("write to a released checkpoint stream")
        return self._fd

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        # A short write is fine: BufferedWriter writes the rest. Pieces bound how much dirty page cache
        # waits for the final fsync.
        view = memoryview(data).cast("B")[:_WRITEBACK_CHUNK]  # type: ignore[arg-type]
        written = self._ops.write(self.fd, view)
        self._written += written
        if self._written - self._kicked >= _WRITEBACK_CHUNK:
            self._ops.start_writeback(self.fd, self._kicked, self._written - self._kicked)
            self._kicked = self._written
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
        self._capabilities = Capabilities(
            writer_lease=partial(WriterLease, self._path),
            local_path=self.local_path,
            local_copy=None,
            max_name_bytes=_MAX_NAME_BYTES,
            lease_state=partial(lease_state, self._path),
        )

    @classmethod
    def from_location(cls, location: LocalLocation, *, create: bool = False) -> LocalStore:
        """The store of a validated local location (see :func:`~ml_playground.checkpoint.open_store`)."""
        return cls(location.path, create=create)

    @property
    def url(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def capabilities(self) -> Capabilities:
        """A writer lease (a file under ``flock``), its state for readers, and local paths."""
        return self._capabilities

    def _create(self) -> None:
        try:
            self._path.mkdir(parents=True, exist_ok=True)
            # an unpredictable name, never through a symlink: nothing planted here makes us write elsewhere
            probe = self._path / f"{_temp_name('')}probe"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise os_error(exc, f"cannot use {self._path} as a checkpoint location", self._path) from None

    def list(self) -> list[StoredObject]:
        try:
            with os.scandir(self._path) as entries:
                found = []
                for entry in entries:
                    if entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # deleted since the directory was read (rotation elsewhere)
                        continue
                    found.append(StoredObject(entry.name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        except OSError as exc:
            raise os_error(exc, f"cannot list {self._path}", self._path) from None
        return sorted(found, key=lambda obj: obj.name)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        path = self._child(name)
        with os.fdopen(self._open_regular(path), "rb") as handle:
            yield handle

    def local_path(self, name: str) -> Path:
        """The file of a committed object, for readers that want a path (``torch.load`` by path, mmap).

        It must be a regular file, not a symlink (checked without following one or blocking on a FIFO).
        """
        path = self._child(name)
        os.close(self._open_regular(path))
        return path

    @staticmethod
    def _open_regular(path: Path) -> int:
        try:
            return open_regular_file(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint {path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointNotFoundError(
                    f"no checkpoint {path}: it is a symbolic link, and checkpoints are read only from regular files"
                ) from None
            if exc.errno == errno.EINVAL:
                raise CheckpointNotFoundError(f"no checkpoint {path}: it is {exc.strerror}") from None
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None

    def delete(self, name: str) -> None:
        path = self._child(name)
        try:
            self._ops.unlink(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"cannot delete {path}: it does not exist") from None
        except OSError as exc:
            raise os_error(exc, f"cannot delete {path}", path) from None

    @contextlib.contextmanager
    def write(self, name: str) -> Iterator[IO[bytes]]:
        final = self._child(name)
        if os.path.lexists(final):
            raise CheckpointExistsError(f"{final} already exists; checkpoints are never overwritten")
        self._remove_stale_temporaries()
        temp = self._path / _temp_name(name)
        committed = False
        raw: _FdWriter | None = None
        kept: FailureKeeping | None = None
        stream: io.BufferedWriter | None = None
        try:
            raw = _FdWriter(self._ops.open(temp), self._ops)
            kept = FailureKeeping(raw)
            stream = io.BufferedWriter(kept, buffer_size=1 << 20)
            yield stream
            stream.flush()
            kept.raise_failure()  # a write failed and its caller swallowed it
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
            cause = exc
            if kept is not None and kept.failure is not None and isinstance(exc, Exception):
                cause = kept.failure  # a write's own error, not what its caller made of it
            if raw is not None:
                raw.release(quiet=True)
            if kept is not None:
                kept.close()
            if stream is not None:  # discard the buffer now, not as a failing flush at garbage collection
                with contextlib.suppress(Exception):
                    stream.close()
            for path in (temp, final if committed else None):
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            if isinstance(cause, OSError) and not isinstance(cause, CheckpointExistsError):
                raise os_error(cause, f"saving {final} failed; earlier checkpoints are intact", final) from None
            if cause is not exc:
                raise cause from exc
            raise

    def _remove_stale_temporaries(self) -> None:
        try:
            names = [n for n in os.listdir(self._path) if n.startswith(TEMP_PREFIX)]
        except OSError as exc:
            raise os_error(exc, f"cannot list {self._path}", self._path) from None
        for name in names:
            host, _, rest = name[len(TEMP_PREFIX) :].partition(".")
            pid_text = rest.partition(".")[0]
            if host != _HOST_TAG or not pid_text.isdigit() or len(pid_text) > 9 or _pid_alive(int(pid_text)):
                continue
            path = self._path / name
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(path).st_mode):  # never ours: report it, never fail a save on it
                    logger.warning("%s is named like a temporary of a save but is not a file; left alone", path)
                    continue
                os.unlink(path)

    def _child(self, name: str) -> Path:
        if not name or any(c in name for c in "/\\\0") or name in (".", "..") or name.startswith(TEMP_PREFIX):
            raise CheckpointNameError(f"{name!r} is not a valid object name in {self._path}")
        if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
            raise CheckpointNameError(
                f"{name[:60]!r}... is {len(name.encode('utf-8', 'surrogateescape'))} bytes long; a file name in "
                f"{self._path} has at most {_MAX_NAME_BYTES} bytes"
            )
        return self._path / name


def _temp_name(name: str) -> str:
    """``.ckpt-partial.<host>.<pid>.<token>.<name>``; without ``<name>`` when that would pass 255 bytes."""
    stem = f"{TEMP_PREFIX}{_HOST_TAG}.{os.getpid()}.{secrets.token_hex(8)}"
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
