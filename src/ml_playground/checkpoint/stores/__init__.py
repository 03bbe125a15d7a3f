"""Checkpoint stores, one module per backend, and the one place a store is built for a validated location."""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint.stores._fsspec import FsspecStore
from ml_playground.checkpoint.stores.local import FileOps, LocalStore, WriterLease
from ml_playground.errors import ConfigError
from ml_playground.locations import Location
from ml_playground.schemes import SCHEMES

__all__ = ["FileOps", "FsspecStore", "LocalStore", "WriterLease", "open_store"]


class _StoreClass(Protocol):
    def from_location(self, location: Location, *, create: bool) -> CheckpointStore: ...


def open_store(location: Location, *, create: bool = False) -> CheckpointStore:
    """The store for ``location``, built by its scheme's store class (:data:`ml_playground.schemes.SCHEMES`).

    ``create=True`` (a writer) makes the location and proves it writable. Unusable locations (missing,
    read-only, missing bucket, no credentials) fail here, before any training starts. A backend's module
    is imported only when a location of its scheme is opened.
    """
    scheme = SCHEMES.get(location.scheme)
    if scheme is None:
        raise ConfigError(f"{location.url}: no checkpoint store for scheme {location.scheme!r}")
    module_name, _, class_name = scheme.store.partition(":")
    store_class = cast(_StoreClass, getattr(importlib.import_module(module_name), class_name))
    return store_class.from_location(location, create=create)
