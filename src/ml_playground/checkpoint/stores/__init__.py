"""Checkpoint stores, and the one place that picks a store for a validated location."""

from __future__ import annotations

from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint.stores._local import FileOps, LocalStore
from ml_playground.locations import LocalLocation, Location

__all__ = ["FileOps", "LocalStore", "open_store"]


def open_store(location: Location, *, create: bool = False) -> CheckpointStore:
    """The store for ``location``. ``create=True`` (a writer) makes the location and proves it writable.

    Unusable locations (missing, read-only, missing bucket, no credentials) fail here, before any
    training starts.
    """
    if isinstance(location, LocalLocation):
        return LocalStore(location.path, create=create)
    raise NotImplementedError
