"""Writer leases: at most one live writer per run location. What every store's lease shares.

A restarted job whose predecessor still runs would otherwise interleave saves and rotations in the
same location. The writer takes a lease before its first save (``CheckpointManager.acquire_writer``,
through the store's ``writer_lease`` capability); a second writer is refused with
:class:`~ml_playground.errors.LocationLockedError` naming the location and the holder. Each store keeps
its lease its own way: a local file under ``flock`` (``stores.local``), a conditional-PUT object on S3
(``stores.s3``).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from ml_playground.errors import LocationLockedError

__all__ = ["DEFAULT_TTL", "LEASE_NAME", "Lease", "LeaseHolder", "LeaseState", "process_alive"]

logger = logging.getLogger(__name__)

LEASE_NAME = ".ml_playground.lease"
DEFAULT_TTL = 120.0

LeaseState = Literal["held", "released", "expired"]
"""A writer lease as a reader sees it (the ``lease_state`` capability), without taking it: ``held`` by a
live writer; ``released`` (no lease: never taken, or given up at the end of a run); ``expired`` (its
holder's process is gone, or it was not renewed within its ttl: the writer died or was cut off)."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease: enough to tell whether that process still lives, and to tell a user."""

    host: str
    pid: int
    process_start: int | None
    acquired_at: str
    token: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.acquired_at}"

    @classmethod
    def for_this_process(cls) -> LeaseHolder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            process_start=_process_start(os.getpid()),
            acquired_at=datetime.now(UTC).isoformat(timespec="seconds"),
            token=secrets.token_hex(8),
        )


class Lease:
    """What every writer lease offers the manager: ``check()`` before writing, ``release()`` at the end.

    A lease is a context manager that releases on exit.
    """

    holder: LeaseHolder

    def check(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _taken_over(self, location: object, by: str | None) -> LocationLockedError:
        """The error a writer gets once another writer (described by ``by``) has taken its lease on ``location``."""
        return LocationLockedError(
            f"the writer lease on {location} was taken over{f' by {by}' if by else ''}; this writer "
            f"({self.holder.describe()}) must stop so the two do not interleave saves"
        )


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def process_alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` (started at ``start`` ticks, when known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): the pid exists, assume it is the holder
    if state in ("Z", "X"):  # a zombie writes nothing
        return False
    return start is None or _process_start(pid) == start
