"""FsspecStore: checkpoints as objects under one prefix of an fsspec filesystem (s3://, gs://, memory://).

The commit is each scheme's own strategy, because each backend offers a different atomic primitive:

- ``s3``: our own multipart writer (:class:`S3Upload`): concurrent parts, the object appears only at
  ``CompleteMultipartUpload`` / ``PutObject`` with ``If-None-Match: *``, abort on any failure.
- ``memory``: fsspec's memory files appear as soon as they are opened and ignore ``autocommit=False``,
  so a save writes a temporary key (never listed) and moves it onto the name when complete.
- anything else (``gs``): an uncommitted fsspec file (``autocommit=False``, mode ``"xb"``): ``commit()``
  when the block ends, ``discard()`` on any exception and after a failed commit. Never
  ``fs.transaction``: it is shared by every user of the filesystem instance.

Listings bypass fsspec's caches; every backend error leaves through
:mod:`~ml_playground.checkpoint.stores._translate`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ml_playground.checkpoint._store import TEMP_PREFIX, PartialCopy, StoredObject
from ml_playground.checkpoint.stores._filesystems import READ_BLOCK_SIZE, make_filesystem
from ml_playground.checkpoint.stores._partial import partial_copy
from ml_playground.checkpoint.stores._s3_download import downloaded
from ml_playground.checkpoint.stores._s3_upload import S3Upload, abort_stale_uploads
from ml_playground.checkpoint.stores._streams import Reader, Writer, raise_own_failure
from ml_playground.checkpoint.stores._translate import error_code, translated
from ml_playground.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    StorageUnavailableError,
)
from ml_playground.locations import RemoteLocation

__all__ = ["FsspecStore"]

logger = logging.getLogger(__name__)

_MIB = 2**20


class FsspecStore:
    """Checkpoints as objects under ``url`` on the fsspec filesystem ``fs``.

    Build it with :meth:`from_location` (a validated location and its typed storage options), or
    from your own filesystem instance. ``create=True`` (a writer) proves the location writable now
    by writing and deleting a probe object, so a missing bucket, denied access, missing credentials
    or an unreachable endpoint fail before training starts.
    """

    def __init__(
        self,
        fs: Any,
        url: str,
        *,
        create: bool = False,
        part_size_mib: int = 50,
        max_concurrency: int = 4,
        read_block_size: int = READ_BLOCK_SIZE,
    ) -> None:
        scheme, sep, root = url.partition("://")
        if not sep or not root.strip("/"):
            raise ValueError(f"{url!r} is not a URL with a scheme and a path")
        self._fs = fs
        self._scheme = scheme.lower()
        self._url = f"{self._scheme}://{root.strip('/')}"
        self._part_size = part_size_mib * _MIB
        self._max_concurrency = max_concurrency
        self._read_block_size = read_block_size
        if create:
            self._prove_writable(fs)

    @classmethod
    def from_location(cls, location: RemoteLocation, *, create: bool) -> FsspecStore:
        """The store for a location that :mod:`ml_playground.config_loader` validated."""
        options = location.storage_options
        store = cls(
            make_filesystem(location),
            location.url,
            part_size_mib=options.part_size_mib,
            max_concurrency=options.max_concurrency,
        )
        if create:
            store._prove_writable(_quick_filesystem(location) if location.scheme != "memory" else store._fs)
            if location.scheme == "s3":
                bucket, _, prefix = location.root.partition("/")
                abort_stale_uploads(store._fs, bucket, prefix)
        return store

    @property
    def url(self) -> str:
        return self._url

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem underneath (for event hooks and request counting in tests and benchmarks)."""
        return self._fs

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
        reader = Reader(handle, url)
        try:
            yield reader  # type: ignore[misc]
        except Exception as exc:
            raise_own_failure(reader.failure, exc)
            raise
        finally:
            reader.close()

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path | None]:
        """On S3, a temporary local copy of ``name`` (deleted on exit); None where streaming is the way.

        The copy comes from ``max_concurrency`` ranged GETs of ``part_size_mib`` at once, with a few
        MiB of client memory; loading it by path is faster than ``torch.load`` over :meth:`open`'s
        stream (docs/performance.md, target 4). None too when ``TMPDIR`` lacks the space.
        """
        if self._scheme not in ("s3", "s3a"):
            yield None
            return
        url = self._child(name)
        with downloaded(self._fs, url, range_size=self._part_size, max_concurrency=self._max_concurrency) as path:
            yield path

    def partial_copy(self, name: str) -> contextlib.AbstractContextManager[PartialCopy | None]:
        """An empty sparse local copy of ``name`` that fetches only the byte ranges asked for (deleted on exit).

        A weights-only load fetches the model's records through it (docs/performance.md, target 7): on
        S3 with ``max_concurrency`` ranged GETs of up to ``part_size_mib``, elsewhere with ``cat_ranges``.
        """
        return partial_copy(
            self._fs, self._child(name), self._scheme, range_size=self._part_size, max_concurrency=self._max_concurrency
        )

    def delete(self, name: str) -> None:
        url = self._child(name)
        with translated("deleting", url):
            self._fs.invalidate_cache(url)
            self._fs.info(url)  # object stores delete missing keys silently; a missing checkpoint must raise
            self._fs.rm_file(url)

    # ------------------------------------------------------------ writing

    def write(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        url = self._child(name)
        if self._exists(url):
            raise CheckpointExistsError(f"{url} already exists; checkpoints are never overwritten")
        if self._scheme in ("s3", "s3a"):
            return self._write_s3(url)
        if self._scheme == "memory":
            return self._write_via_temporary(url, name)
        return self._write_uncommitted(url)

    @contextlib.contextmanager
    def _write_s3(self, url: str) -> Iterator[IO[bytes]]:
        bucket, _, key = url.partition("://")[2].partition("/")
        upload = S3Upload(self._fs, bucket, key, part_size=self._part_size, max_concurrency=self._max_concurrency)
        try:
            yield upload  # type: ignore[misc]
            upload.commit()
        except BaseException as exc:
            upload.abort()
            raise_own_failure(upload.failure, exc)
            raise

    @contextlib.contextmanager
    def _write_via_temporary(self, url: str, name: str) -> Iterator[IO[bytes]]:
        temp = f"{self._url}/{TEMP_PREFIX}{secrets.token_hex(4)}.{name}"
        with translated("saving", url):
            handle = self._fs.open(temp, "wb")
        writer = Writer(handle, url)
        try:
            yield writer  # type: ignore[misc]
            with translated("saving", url):
                handle.close()
                if self._fs.exists(url):
                    raise CheckpointExistsError(f"{url} was written by another writer meanwhile; not overwritten")
                self._fs.mv(temp, url)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                handle.close()
            with contextlib.suppress(Exception):
                self._fs.rm_file(temp)
            raise_own_failure(writer.failure, exc)
            raise

    @contextlib.contextmanager
    def _write_uncommitted(self, url: str) -> Iterator[IO[bytes]]:
        with translated("saving", url):
            handle = self._fs.open(url, "xb", autocommit=False, block_size=self._part_size)
        writer = Writer(handle, url)
        try:
            yield writer  # type: ignore[misc]
            with translated("saving", url):
                handle.close()
                handle.commit()
        except BaseException as exc:
            try:
                handle.discard()
            except Exception as discard_exc:
                logger.warning("could not cancel the unfinished upload of %s: %s", url, discard_exc)
            # a handle left open is flushed by its finaliser later (gcsfs defers that to a thread)
            handle.closed = True
            raise_own_failure(writer.failure, exc)
            raise

    # ------------------------------------------------------------ helpers

    def _exists(self, url: str) -> bool:
        with translated("checking before saving", url):
            if self._scheme in ("s3", "s3a"):  # one HEAD; fs.exists would also list a "directory" of that name
                bucket, _, key = url.partition("://")[2].partition("/")
                try:
                    self._fs.call_s3("head_object", Bucket=bucket, Key=key)
                except FileNotFoundError as exc:
                    if error_code(exc) == "NoSuchBucket":
                        raise
                    return False
                return True
            self._fs.invalidate_cache(url)
            return bool(self._fs.exists(url))

    def _prove_writable(self, fs: Any) -> None:
        probe = f"{self._url}/{TEMP_PREFIX}probe.{secrets.token_hex(4)}"
        try:
            with translated("checking that the checkpoint location is writable:", self._url):
                if self._scheme == "memory":
                    fs.makedirs(self._url, exist_ok=True)
                fs.pipe_file(probe, b"")
                fs.rm_file(probe)
        except CheckpointNotFoundError as exc:
            raise StorageUnavailableError(f"{exc}; the bucket or location does not exist") from exc

    def _child(self, name: str) -> str:
        if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(TEMP_PREFIX):
            raise ValueError(f"{name!r} is not a valid object name in {self._url}")
        return f"{self._url}/{name}"


def _quick_filesystem(location: RemoteLocation) -> Any:
    """A filesystem with a short connect timeout (and on S3 at most two attempts), for the probe at open.

    A dead endpoint then fails in seconds; the store's own requests keep the configured retries.
    """
    options = location.storage_options
    update: dict[str, object] = {"connect_timeout": min(options.connect_timeout, 5.0)}
    if location.scheme == "s3":
        update["max_attempts"] = min(options.max_attempts, 2)
    quick = options.model_copy(update=update)
    return make_filesystem(location.model_copy(update={"storage_options": quick}))


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
