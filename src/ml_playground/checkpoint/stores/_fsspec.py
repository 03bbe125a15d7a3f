"""FsspecStore: what the object stores share (listing, reading, deleting, sparse copies); each commits its own way.

A backend subclasses it (``s3.S3Store``, ``gcs.GcsStore``, ``memory.MemoryStore``), builds its fsspec
filesystem from its typed storage options in ``from_location``, and implements ``_write`` with the
atomic primitive its backend offers. Listings bypass fsspec's caches; every backend error leaves
through :mod:`~ml_playground.checkpoint.stores._translate`; every stream handed out keeps its first
failure (:class:`~ml_playground.checkpoint._streams.FailureKeeping`).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from functools import partial
from typing import IO, Any

from ml_playground.checkpoint._store import TEMP_PREFIX, Capabilities, PartialCopy, StoredObject
from ml_playground.checkpoint._streams import FailureKeeping
from ml_playground.checkpoint.stores._partial import cat_fetcher, partial_copy
from ml_playground.checkpoint.stores._translate import error_code, translate, translated
from ml_playground.errors import (
    CheckpointExistsError,
    CheckpointNameError,
    CheckpointNotFoundError,
    StorageUnavailableError,
)
from ml_playground.locations import RemoteLocation

__all__ = ["READ_BLOCK_SIZE", "FsspecStore"]

READ_BLOCK_SIZE = 16 * 2**20
"""Bytes fetched per ranged GET when reading: bounds a reader's memory, amortises request latency."""
_MAX_KEY_BYTES = 1024
_MIB = 2**20


class FsspecStore:
    """Checkpoints as objects under one location of an fsspec filesystem.

    ``create=True`` (a writer) proves the location writable by writing and deleting a probe object, so a
    missing bucket, denied access, missing credentials or an unreachable endpoint fail before training.
    """

    def __init__(
        self,
        location: RemoteLocation,
        filesystem: Any,
        *,
        create: bool = False,
        read_block_size: int = READ_BLOCK_SIZE,
    ) -> None:
        self.location = location
        self._fs = filesystem
        self._url = location.url
        options = location.storage_options
        self._part_size = options.part_size_mib * _MIB
        self._max_concurrency = options.max_concurrency
        self._read_block_size = read_block_size
        if create:
            self._prove_writable(filesystem)

    @property
    def url(self) -> str:
        return self._url

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem underneath (for event hooks and request counting in tests and benchmarks)."""
        return self._fs

    @property
    def capabilities(self) -> Capabilities:
        """Sparse partial copies (``fs.cat_ranges``); a backend adds what it can do better."""
        return Capabilities(partial_copy=self._partial_copy, max_name_bytes=self.max_name_bytes)

    @property
    def max_name_bytes(self) -> int:
        """Object keys have at most 1,024 bytes (S3, GCS), this location's prefix included."""
        return _MAX_KEY_BYTES - len(self.location.key("").encode())

    # ------------------------------------------------------------ reading

    def list(self) -> list[StoredObject]:
        with translated("listing", self._url):
            try:
                entries = self._fs.ls(self._url, detail=True, refresh=True)
            except FileNotFoundError as exc:
                if error_code(exc) is not None:  # e.g. NoSuchBucket: the location itself is gone
                    raise
                return []  # an object store has no empty directories: no object yet under the prefix
        found = [
            StoredObject(_basename(entry["name"]), int(entry.get("size") or 0), _modified(entry))
            for entry in entries
            if entry.get("type") == "file" and not _basename(entry["name"]).startswith(TEMP_PREFIX)
        ]
        return sorted(found, key=lambda obj: obj.name)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        url = self._child(name)
        with translated("opening", url):
            handle = self._fs.open(url, "rb", block_size=self._read_block_size, cache_type="readahead")
        reader = FailureKeeping(handle, partial(translate, operation="reading", url=url))
        try:
            yield reader  # type: ignore[misc]
        except Exception as exc:
            reader.raise_own_failure(exc)
            raise
        finally:
            with contextlib.suppress(Exception):
                handle.close()

    def _partial_copy(self, name: str) -> AbstractContextManager[PartialCopy | None]:
        """An empty sparse local copy of ``name`` that fetches only the byte ranges asked for (deleted on exit).

        A weights-only load fetches the model's records through it (docs/performance.md, target 7), here
        with ``cat_ranges``, ``max_concurrency`` pieces at a time.
        """
        url = self._child(name)
        with translated("loading", url):
            self._fs.invalidate_cache(url)
            size = int(self._fs.info(url)["size"])
        return partial_copy(url, size, cat_fetcher(self._fs, url, self._max_concurrency))

    def delete(self, name: str) -> None:
        url = self._child(name)
        with translated("deleting", url):
            self._fs.invalidate_cache(url)
            self._fs.info(url)  # object stores delete missing keys silently; a missing checkpoint must raise
            self._fs.rm_file(url)

    # ------------------------------------------------------------ writing

    def write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        url = self._child(name)
        if self._exists(url, name):
            raise CheckpointExistsError(f"{url} already exists; checkpoints are never overwritten")
        return self._write(url, name)

    def _write(self, url: str, name: str) -> AbstractContextManager[IO[bytes]]:
        """The backend's atomic write of ``name`` (at ``url``): visible only when the block ends cleanly."""
        raise NotImplementedError

    # ------------------------------------------------------------ helpers

    def _exists(self, url: str, name: str) -> bool:
        with translated("checking before saving", url):
            self._fs.invalidate_cache(url)
            return bool(self._fs.exists(url))

    def _prove_writable(self, fs: Any) -> None:
        probe = self._child(f"probe.{secrets.token_hex(4)}", temporary=True)
        try:
            with translated("checking that the checkpoint location is writable:", self._url):
                fs.pipe_file(probe, b"")
                fs.rm_file(probe)
        except CheckpointNotFoundError as exc:
            raise StorageUnavailableError(f"{exc}; the bucket or location does not exist") from exc

    def _child(self, name: str, *, temporary: bool = False) -> str:
        """The URL of object ``name``; ``temporary`` names an in-flight object (never listed)."""
        if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(TEMP_PREFIX):
            raise CheckpointNameError(f"{name!r} is not a valid object name in {self._url}")
        return self.location.child(f"{TEMP_PREFIX}{name}" if temporary else name)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _modified(entry: dict[str, Any]) -> datetime | None:
    for key in ("LastModified", "mtime", "updated", "created"):
        value = entry.get(key)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None
