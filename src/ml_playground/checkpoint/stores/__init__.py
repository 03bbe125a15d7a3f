"""Checkpoint stores, and the one place that picks a store for a validated location."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint.stores._local import FileOps, LocalStore
from ml_playground.locations import LocalLocation, Location

if TYPE_CHECKING:
    from ml_playground.checkpoint.stores._fsspec import FsspecStore

__all__ = ["FileOps", "FsspecStore", "LocalStore", "open_store"]


def open_store(location: Location, *, create: bool = False) -> CheckpointStore:
    """The store for ``location``. ``create=True`` (a writer) makes the location and proves it writable.

    Unusable locations (missing, read-only, missing bucket, no credentials) fail here, before any
    training starts.
    """
    if isinstance(location, LocalLocation):
        return LocalStore(location.path, create=create)
    # imported here so that a local run never imports fsspec backends
    from ml_playground.checkpoint.stores._fsspec import FsspecStore

    return FsspecStore.from_location(location, create=create)


def __getattr__(name: str) -> Any:
    if name == "FsspecStore":
        from ml_playground.checkpoint.stores._fsspec import FsspecStore

        return FsspecStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
