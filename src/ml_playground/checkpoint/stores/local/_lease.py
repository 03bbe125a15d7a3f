"""The writer lease of a local (or locally mounted) run directory.

The lease is the file ``.ml_playground.lease`` holding the holder's host, pid, process start time,
acquisition time and a random token. It is written by temp file + ``os.replace``, always under an
exclusive ``flock`` of ``.ml_playground.lease.guard``, so two writers that start at once cannot both
win. A lease is *stale*, and the next writer takes it without being asked, when:

- its holder ran on this host and that process is gone (no such pid, a zombie, or the pid now
  belongs to a process with another start time): a SIGKILLed or crashed writer blocks nobody;
- its holder ran on another host (a shared file system) and has not refreshed the file's mtime for
  ``ttl`` seconds; the holder refreshes it every ``ttl / 4`` seconds from a daemon thread.

A live lease is taken over only when the caller says so (``force=True``). The writer that lost it
notices at its next save or rotation (:meth:`WriterLease.check`) and stops with LocationLockedError.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from ml_playground.checkpoint._lease import (
    DEFAULT_TTL,
    LEASE_NAME,
    MAX_LEASE_BYTES,
    Lease,
    LeaseHolder,
    LeaseState,
    MalformedLeaseError,
    process_alive,
)
from ml_playground.checkpoint.stores.local._fileops import NO_FOLLOW, fsync_dir, open_regular_file
from ml_playground.errors import CheckpointError, LocationLockedError, StorageError

__all__ = ["WriterLease", "lease_state"]

logger = logging.getLogger(__name__)

_GUARD_NAME = ".ml_playground.lease.guard"
_GUARD_TIMEOUT = 10.0


class WriterLease(Lease):
    """The writer lease of one local run location; a context manager that releases on exit.

    ``force=True`` takes over a lease even when its holder is alive: an explicit user action (e.g.
    the old job is known to be hung). ``ttl`` bounds how long a dead holder on *another* host blocks.
    """

    def __init__(self, location: Path, *, force: bool = False, ttl: float = DEFAULT_TTL) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        self.location = Path(location)
        self.ttl = ttl
        self.holder = LeaseHolder.for_this_process()
        self._path = self.location / LEASE_NAME
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._acquire(force)

    # ------------------------------------------------------------ public

    def check(self) -> None:
        """Raise LocationLockedError unless this writer still holds the lease."""
        try:
            current = self._read()
        except MalformedLeaseError:  # not ours any more, whoever wrote it
            current = None
        if current is None or current.token != self.holder.token:
            raise self._taken_over(self.location, current.describe() if current is not None else None)

    def release(self) -> None:
        """Give the lease up (idempotent); a lease taken over by another writer is left to it."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        with self._guard(), contextlib.suppress(MalformedLeaseError):  # not ours: left to whoever wrote it
            current = self._read()
            if current is not None and current.token == self.holder.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)

    # ------------------------------------------------------------ acquiring

    def _acquire(self, force: bool) -> None:
        with self._guard():
            try:
                current = self._read()
            except MalformedLeaseError as exc:
                if not force:
                    raise
                logger.warning("replacing %s (taken over by force): %s", self._path, exc)
                current = None
            if current is not None:
                alive, why = self._holder_state(current)
                if alive and not force:
                    raise LocationLockedError(
                        f"{self.location} is being written by another job ({current.describe()}; {why}). "
                        "Stop that job, or, if you are sure it no longer writes, take the lease over "
                        "explicitly (ml-playground train --take-over; in Python acquire_writer(force=True))."
                    )
                logger.warning(
                    "taking over the writer lease on %s from %s (%s)",
                    self.location,
                    current.describe(),
                    "forced" if alive else why,
                )
            self._write()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.location}", daemon=True)
        self._heartbeat.start()

    def _holder_state(self, holder: LeaseHolder) -> tuple[bool, str]:
        """Whether ``holder`` may still be writing, and why we think so."""
        return _holder_state(self._path, holder, self.holder.host, self.ttl)

    def _write(self) -> None:
        temp = self.location / f"{LEASE_NAME}.{self.holder.pid}.{secrets.token_hex(8)}.tmp"  # unpredictable
        data = json.dumps(asdict(self.holder), sort_keys=True).encode()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self._path)
            fsync_dir(self.location)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StorageError(f"cannot write the writer lease {self._path}: {exc.strerror or exc}") from None

    def _read(self) -> LeaseHolder | None:
        return _read(self._path)

    # ------------------------------------------------------------ heartbeat and guard

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self._read()
                if current is None or current.token != self.holder.token:
                    return  # taken over: the next check() reports it
                os.utime(self._path, follow_symlinks=False)
            except (OSError, CheckpointError) as exc:  # the next beat retries before the lease expires
                logger.warning("writer lease heartbeat on %s failed: %s", self.location, exc)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """An exclusive flock held while the lease is inspected and replaced; the kernel frees it on death."""
        try:
            # never through a symlink planted under its name, never blocking on a FIFO there
            fd = os.open(self.location / _GUARD_NAME, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | NO_FOLLOW, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, f"{_GUARD_NAME} is not a regular file; remove it")
        except OSError as exc:
            raise StorageError(f"cannot use {self.location} for a writer lease: {exc.strerror or exc}") from None
        try:
            deadline = time.monotonic() + _GUARD_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                        raise LocationLockedError(
                            f"{self.location}: another process keeps the writer-lease guard busy ({exc.strerror})"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the flock


def lease_state(location: Path, *, ttl: float = DEFAULT_TTL) -> LeaseState:
    """The writer lease of ``location`` as a reader sees it; reads the lease file only (no guard, no write).

    The file is replaced atomically (``os.replace``), so an unguarded read sees a whole lease or none.
    """
    path = Path(location) / LEASE_NAME
    holder = _read(path)
    if holder is None:
        return "released"
    alive, _ = _holder_state(path, holder, socket.gethostname(), ttl)
    return "held" if alive else "expired"


def _holder_state(path: Path, holder: LeaseHolder, this_host: str, ttl: float) -> tuple[bool, str]:
    """Whether ``holder`` of the lease file ``path`` may still be writing, and why we think so."""
    if holder.host == this_host:
        if not process_alive(holder.pid, holder.process_start):
            return False, "its process is gone"
        return True, "its process is alive"
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return False, "its lease vanished"
    if age > ttl:
        return False, f"it has not refreshed its lease for {age:.0f} s (ttl {ttl:.0f} s)"
    return True, f"it refreshed its lease {age:.0f} s ago"


def _read(path: Path) -> LeaseHolder | None:
    """The lease's holder; None if there is no lease, MalformedLeaseError if the file is not one of ours
    (also a symlink, a FIFO or a directory under its name: read without following or blocking)."""
    try:
        fd = open_regular_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EINVAL):
            raise MalformedLeaseError(
                str(path), "a symbolic link" if exc.errno == errno.ELOOP else str(exc.strerror)
            ) from None
        raise StorageError(f"cannot read the writer lease {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_LEASE_BYTES + 1)
    if len(raw) > MAX_LEASE_BYTES:
        raise MalformedLeaseError(str(path), f"longer than {MAX_LEASE_BYTES} bytes")
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise MalformedLeaseError(str(path), f"not JSON: {exc}") from None
    return LeaseHolder.from_record(record, str(path))
