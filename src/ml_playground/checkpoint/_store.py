"""The storage protocol every checkpoint store implements: a few verbs on named objects in one location,
and the optional abilities a store declares (never sniffed from its type or URL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ml_playground.checkpoint._lease import Lease, LeaseState

__all__ = [
    "TEMP_PREFIX",
    "Capabilities",
    "CheckpointStore",
    "LeaseFactory",
    "PartialCopy",
    "StoredObject",
]

TEMP_PREFIX = ".ckpt-partial."
"""Prefix of an in-flight save's temporary object; no checkpoint name can start with it."""


@dataclass(frozen=True)
class StoredObject:
    """A committed object in a store."""

    name: str
    size: int
    modified: datetime | None


class PartialCopy(Protocol):
    """A local file of an object's full size that holds only the byte ranges fetched into it so far.

    The rest are holes (a sparse file), which read as zeros. ``fetch`` writes the object's bytes
    ``[start, end)`` of every range into the same offsets of the file.
    """

    @property
    def path(self) -> Path: ...

    @property
    def size(self) -> int: ...

    def fetch(self, ranges: Sequence[tuple[int, int]]) -> None: ...


class LeaseFactory(Protocol):
    def __call__(self, *, force: bool, ttl: float) -> Lease: ...


@dataclass(frozen=True)
class Capabilities:
    """What a store can do beyond the protocol's verbs; None where it cannot.

    - ``writer_lease(force=, ttl=)``: take the location's writer lease (one live writer per location).
    - ``local_path(name)``: the local file of a committed object (``torch.load`` by path, mmap); a
      missing one raises CheckpointNotFoundError.
    - ``local_copy(name)``: a temporary local copy of a remote object, deleted when the block ends;
      None where the store prefers to be read as a stream (e.g. no room in ``TMPDIR``).
    - ``partial_copy(name)``: an empty sparse local copy that fetches chosen byte ranges
      (:class:`PartialCopy`), deleted when the block ends; None when ``TMPDIR`` cannot hold one.
    - ``max_name_bytes``: the longest object name (UTF-8 bytes) the store holds; None: no limit of its own.
    - ``lease_state()``: the writer lease's state as a reader sees it (``"held"``, ``"released"``,
      ``"expired"``), read without taking the lease or writing anything; where there is a ``writer_lease``.
    """

    writer_lease: LeaseFactory | None = None
    lease_state: Callable[[], LeaseState] | None = None
    local_path: Callable[[str], Path] | None = None
    local_copy: Callable[[str], AbstractContextManager[Path | None]] | None = None
    partial_copy: Callable[[str], AbstractContextManager[PartialCopy | None]] | None = None
    max_name_bytes: int | None = None


@runtime_checkable
class CheckpointStore(Protocol):
    """Named objects in one location, with atomic writes.

    - ``write(name)`` yields a binary stream; the object becomes visible under ``name`` only when the
      ``with`` block ends without an exception, complete and durable. On any exception (including
      ``KeyboardInterrupt``) nothing appears under ``name`` and the exception propagates. A name that is
      already committed raises :class:`~ml_playground.errors.CheckpointExistsError`: never overwritten.
    - ``open(name)`` yields a readable, seekable binary stream of a committed object.
    - ``list()`` returns the committed objects, read fresh from the store (never a stale cache), and
      never an in-flight temporary.
    - ``delete(name)`` removes a committed object; failure raises.
    - ``capabilities`` declares what else the store can do.

    Every failure is raised as a :class:`~ml_playground.errors.CheckpointError` naming the path or URL.
    """

    @property
    def url(self) -> str:
        """The location, as a path or URL a user recognises."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    def write(self, name: str) -> AbstractContextManager[IO[bytes]]: ...

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]: ...

    def list(self) -> list[StoredObject]: ...

    def delete(self, name: str) -> None: ...
