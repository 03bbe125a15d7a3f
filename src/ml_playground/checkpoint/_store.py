"""The storage protocol every checkpoint store implements: a few verbs on named objects in one location."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

__all__ = [
    "TEMP_PREFIX",
    "CheckpointStore",
    "LocalCopyStore",
    "LocalPathStore",
    "PartialCopy",
    "PartialCopyStore",
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

    Every failure is raised as a :class:`~ml_playground.errors.CheckpointError` naming the path or URL.
    """

    @property
    def url(self) -> str:
        """The location, as a path or URL a user recognises."""
        ...

    def write(self, name: str) -> AbstractContextManager[IO[bytes]]: ...

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]: ...

    def list(self) -> list[StoredObject]: ...

    def delete(self, name: str) -> None: ...


@runtime_checkable
class LocalPathStore(Protocol):
    """An optional capability: a store whose committed objects are local files (memory-mappable)."""

    def local_path(self, name: str) -> Path:
        """The file of committed object ``name``; a missing one raises CheckpointNotFoundError."""
        ...


@runtime_checkable
class LocalCopyStore(Protocol):
    """An optional capability: a remote store that can fetch an object into a temporary local file."""

    def local_copy(self, name: str) -> AbstractContextManager[Path | None]:
        """A temporary local copy of committed object ``name``, deleted when the block ends; None where
        the store prefers to be read as a stream (:meth:`CheckpointStore.open`)."""
        ...


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


@runtime_checkable
class PartialCopyStore(Protocol):
    """An optional capability: a remote store that fetches chosen byte ranges of an object into a local file."""

    def partial_copy(self, name: str) -> AbstractContextManager[PartialCopy | None]:
        """An empty sparse local copy of committed object ``name``, deleted when the block ends; None when
        the temporary directory cannot hold one. A missing object raises CheckpointNotFoundError."""
        ...
