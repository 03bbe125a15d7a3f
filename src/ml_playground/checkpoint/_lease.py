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

from ml_playground.errors import CheckpointError, LocationLockedError

__all__ = [
    "DEFAULT_TTL",
    "LEASE_NAME",
    "MAX_LEASE_BYTES",
    "Lease",
    "LeaseHolder",
    "LeaseState",
    "MalformedLeaseError",
    "process_alive",
]

logger = logging.getLogger(__name__)

LEASE_NAME = ".ml_playground.lease"
DEFAULT_TTL = 120.0
MAX_LEASE_BYTES = 4096
"""A lease record is a few hundred bytes; a longer one is not ours and is not read further."""
_MAX_PID = 2**22  # Linux's largest pid_max


class MalformedLeaseError(CheckpointError):
    """A lease record this package did not write (or that was damaged): named, and replaced by a take-over."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(
            f"{where} is not a writer lease this package wrote ({reason}). If no job writes to this location, "
            "take it over (ml-playground train --take-over; in Python acquire_writer(force=True)): that replaces it"
        )


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
    def from_record(cls, record: object, where: str, *, extra: tuple[str, ...] = ()) -> LeaseHolder:
        """The holder a lease record names, each field checked; MalformedLeaseError naming ``where`` otherwise.

        ``extra`` names further fields the record may hold (checked by the caller).
        """
        if not isinstance(record, dict):
            raise MalformedLeaseError(where, f"a {type(record).__name__}, not a table")
        fields = {"host", "pid", "process_start", "acquired_at", "token"}
        if set(record) - fields - set(extra) or fields - set(record):
            raise MalformedLeaseError(where, f"its fields are {sorted(map(str, record))[:8]}")
        for name in ("host", "acquired_at", "token"):
            if not isinstance(record[name], str) or not 0 < len(record[name]) <= 255:
                raise MalformedLeaseError(where, f"{name} is {str(record[name])[:40]!r}, not a short text")
        pid, start = record["pid"], record["process_start"]
        if not _is_int(pid) or not 0 < pid <= _MAX_PID:
            raise MalformedLeaseError(where, f"pid is {str(pid)[:40]!r}, not a process id")
        if start is not None and (not _is_int(start) or not 0 <= start < 2**63):
            raise MalformedLeaseError(where, f"process_start is {str(start)[:40]!r}")
        return cls(record["host"], pid, start, record["acquired_at"], record["token"])

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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
