"""HttpStore: one checkpoint file behind an ``http(s)://`` URL, read-only (e.g. a presigned S3 GET URL).

- The object's size and ETag come from a ranged GET of its first byte (presigned GET URLs refuse HEAD:
  the method is part of the signature). A server that answers it with the whole object (it ignores
  Range) is read whole from then on.
- Every later GET of the read carries ``If-Match`` with that ETag (a weak one is compared, not sent) and
  is checked against it and against the size: an object that changes mid-read fails with StorageError,
  never mixes bytes.
- A full load reads a local copy (one GET of the whole object into ``TMPDIR``); a weights-only load a
  sparse partial copy (ranged GETs of the byte ranges it needs: docs/performance.md, target 7); without
  room in ``TMPDIR``, a stream of 16 MiB ranged reads.
- ``write`` and ``delete`` raise StorageUnavailableError; ``open_store(..., create=True)`` refuses.
- The URL's query string is a credential: it is sent, never shown. Messages name ``url`` / the file's URL
  without it, and any text a server sends back is searched for it and masked.

The HTTP client is the standard library's ``urllib.request`` (no extra to install; proxies come from the
usual environment variables). Backend errors map in :mod:`~ml_playground.checkpoint.stores._translate`.
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from ml_playground.checkpoint._store import Capabilities, PartialCopy, StoredObject
from ml_playground.checkpoint.stores._backend import check_options
from ml_playground.checkpoint.stores._partial import partial_copy
from ml_playground.checkpoint.stores._ranges import RangeReader
from ml_playground.checkpoint.stores._staging import local_staging, sized_temp_file
from ml_playground.checkpoint.stores._translate import error_code, is_changed, is_missing, translate
from ml_playground.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    StorageError,
    StorageUnavailableError,
)
from ml_playground.locations import RemoteLocation

__all__ = ["HttpStore"]

_PIECE = 2**20
_STREAM_BLOCK = 16 * 2**20
_SPARE = 64 * 2**20  # free space kept beyond the object's size in TMPDIR
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_S3_ERROR = re.compile(rb"<Code>([^<]{1,64})</Code>\s*<Message>([^<]{0,200})</Message>")


@dataclass(frozen=True)
class _Object:
    """What one probe found: the object's size, ETag (None: the server sends none), Range support."""

    size: int
    etag: str | None
    ranges: bool
    modified: datetime | None


class HttpStore:
    """The one file ``location.object_name`` at an ``http(s)://`` location, read-only."""

    def __init__(self, location: RemoteLocation) -> None:
        check_options(location)
        if location.object_name is None:
            raise ConfigError(f"{location.url}: an http(s):// location names one file; give the file's URL")
        self.location = location
        self._name = location.object_name
        self._shown = location.child(self._name)
        query = location.query.get_secret_value() if location.query is not None else ""
        self._request_url = f"{self._shown}?{query}" if query else self._shown
        self._secret = query
        self._timeout = location.storage_options.read_timeout

    @classmethod
    def from_location(cls, location: RemoteLocation, *, create: bool = False) -> HttpStore:
        if create:
            raise StorageUnavailableError(
                f"{location.url} is a read-only http(s) location: nothing can be written there; "
                "write to a local path, s3:// or gs://"
            )
        return cls(location)

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def capabilities(self) -> Capabilities:
        """Local copies and sparse partial copies, by (ranged) GETs pinned to the object's ETag."""
        return Capabilities(local_copy=self._local_copy, partial_copy=self._partial_copy)

    # ------------------------------------------------------------ the protocol's verbs

    def list(self) -> list[StoredObject]:
        """The one object, when it is there (probed afresh)."""
        try:
            found = self._probe()
        except CheckpointNotFoundError:
            return []
        return [StoredObject(self._name, found.size, found.modified)]

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        self._check_name(name)
        found = self._probe()
        if found.ranges:
            reader = RangeReader(found.size, lambda start, end, sink: self._fetch(found, start, end, sink))
            yield io.BufferedReader(reader, buffer_size=_STREAM_BLOCK)
            return
        with tempfile.TemporaryFile(prefix="ml_playground-http-") as copy:
            self._fetch(found, 0, found.size, lambda offset, piece: _pwrite(copy.fileno(), piece, offset, None, ""))
            copy.seek(0)
            yield copy

    def write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        self._read_only(f"cannot save {self.url}/{name}")

    def delete(self, name: str) -> None:
        self._read_only(f"cannot delete {self.url}/{name}")

    # ------------------------------------------------------------ capabilities

    @contextlib.contextmanager
    def _local_copy(self, name: str) -> Iterator[Path | None]:
        """A temporary local copy (deleted on exit): one GET of the whole object; None without room in TMPDIR."""
        self._check_name(name)
        found = self._probe()
        directory = tempfile.gettempdir()
        with local_staging(self._shown, directory):
            free = shutil.disk_usage(directory).free
        if free < found.size + _SPARE:
            yield None
            return
        with sized_temp_file("ml_playground-load-", found.size, self._shown) as path:
            self._fetch_file(path, found, [(0, found.size)])
            yield path

    def _partial_copy(self, name: str) -> AbstractContextManager[PartialCopy | None]:
        """An empty sparse copy whose ranges come from ranged GETs pinned to one probe's ETag."""
        self._check_name(name)
        found = self._probe()

        def fetch(path: Path, ranges: list[tuple[int, int]]) -> None:
            self._fetch_file(path, found, ranges if found.ranges else [(0, found.size)])

        return partial_copy(self._shown, found.size, fetch)

    # ------------------------------------------------------------ requests

    def _probe(self) -> _Object:
        """Size, ETag and Range support from a GET of the first byte (never HEAD)."""
        with self._get({"Range": "bytes=0-0"}, accept_416=True) as response:
            etag, modified = response.headers.get("ETag"), _date(response.headers)
            status = response.status
            found = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if status == 416:  # no byte 0: an empty object (not a checkpoint; the load says so)
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                return _Object(int(total) if total.isdigit() else 0, etag, True, modified)
            if status == 206:
                if found is None or found.group(3) == "*":
                    self._fail(f"reading {self._shown} failed: its Content-Range gives no size")
                return _Object(int(found.group(3)), etag, True, modified)
            length = response.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._fail(f"reading {self._shown} failed: the server gives neither Range support nor a size")
            return _Object(int(length), etag, False, modified)

    def _get(self, headers: dict[str, str], *, accept_416: bool = False) -> Any:
        request = urllib.request.Request(self._request_url, headers={"User-Agent": "ml_playground", **headers})
        try:
            return urllib.request.urlopen(request, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            if accept_416 and exc.code == 416:
                return exc  # a response too: its headers say the size
            raise self._failure(exc) from None
        except Exception as exc:  # URLError, timeouts, TLS and connection errors
            raise self._failure(exc) from None

    def _fetch_file(self, path: Path, found: _Object, ranges: Sequence[tuple[int, int]]) -> None:
        """GET each range into the same offsets of the file ``path`` (one after another: a weights-only load
        asks for a few coalesced ranges per round)."""
        with local_staging(self._shown, path):
            fd = os.open(path, os.O_WRONLY)
        try:
            for start, end in ranges:
                if start < end:
                    self._fetch(found, start, end, lambda offset, piece: _pwrite(fd, piece, offset, path, self._shown))
        finally:
            os.close(fd)

    def _fetch(self, found: _Object, start: int, end: int, sink: Callable[[int, bytes], None]) -> None:
        """GET bytes ``[start, end)`` of the probed object (all of it, from a server without Range) into ``sink``."""
        headers = {"Range": f"bytes={start}-{end - 1}"} if found.ranges else {}
        if found.etag is not None and not found.etag.startswith("W/"):
            headers["If-Match"] = found.etag  # a weak ETag never matches If-Match: it is compared below
        with self._get(headers) as response:
            self._check_same(response, found, start, end)
            offset = start if found.ranges else 0
            try:
                while piece := response.read(_PIECE):
                    sink(offset, piece)
                    offset += len(piece)
            except CheckpointError:
                raise
            except Exception as exc:  # the connection broke mid-body (IncompleteRead, a reset, a timeout)
                raise self._failure(exc) from None
        if offset != (end if found.ranges else found.size):
            self._fail(f"reading {self._shown} failed: bytes {start}-{end - 1} ended after {offset - start} bytes")

    def _check_same(self, response: Any, found: _Object, start: int, end: int) -> None:
        """The response is of the probed object (ETag, size) and covers ``[start, end)``."""
        etag = response.headers.get("ETag")
        if found.etag is not None and etag is not None and etag != found.etag:
            self._changed()
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or (int(match.group(1)), int(match.group(2)) + 1) != (start, end):
                self._fail(f"reading {self._shown} failed: the server sent other bytes than asked for")
            if match.group(3) != str(found.size):
                self._changed()
        elif found.ranges or response.headers.get("Content-Length", str(found.size)) != str(found.size):
            self._changed()  # a whole object where a range was asked for, or another size

    # ------------------------------------------------------------ failures

    def _failure(self, exc: BaseException) -> CheckpointError:
        """The package's error for a failed request (the backend's, mapped in ``_translate``), query masked."""
        code = error_code(exc)
        what = f"reading {self._shown} failed"
        if is_changed(exc):
            return StorageError(f"{what}: the object changed while it was being read (HTTP 412); read it again")
        detail = _s3_error(exc)
        if is_missing(exc) or code == "410":
            return CheckpointNotFoundError(self._masked(f"no checkpoint {self._shown} (HTTP {code}{detail})"))
        if code in ("401", "403"):
            hint = "a presigned URL works only until it expires"
            return StorageUnavailableError(self._masked(f"{what}: access denied (HTTP {code}{detail}); {hint}"))
        if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
            return StorageUnavailableError(
                self._masked(f"{what}: the server is unreachable ({exc.reason}); check the URL and the network")
            )
        error = translate(exc, "reading", self._shown)
        return type(error)(self._masked(f"{error}{detail}"))

    def _masked(self, message: str) -> str:
        return message.replace(self._secret, "...") if self._secret else message

    def _changed(self) -> NoReturn:
        self._fail(f"{self._shown} changed while it was being read (another ETag or size); read it again")

    def _fail(self, message: str) -> NoReturn:
        raise StorageError(self._masked(message))

    def _read_only(self, what: str) -> NoReturn:
        raise StorageUnavailableError(f"{what}: http(s) locations are read-only")

    def _check_name(self, name: str) -> None:
        if name != self._name:
            raise CheckpointNotFoundError(f"no file {self.url}/{name}: this http(s) URL names only {self._name}")


def _pwrite(fd: int, piece: bytes, offset: int, path: Path | None, url: str) -> None:
    with local_staging(url, path or "a temporary file"):
        os.pwrite(fd, piece, offset)


def _date(headers: Any) -> datetime | None:
    try:
        return email.utils.parsedate_to_datetime(headers.get("Last-Modified"))
    except (TypeError, ValueError):  # none sent, or not a date
        return None


def _s3_error(exc: BaseException) -> str:
    """``: Code: Message`` of an S3 error document in an HTTP error's body (e.g. ``AccessDenied: Request has
    expired``); empty for other bodies. Only these two fields are read: others may echo the request."""
    reader = getattr(exc, "read", None)
    if not callable(reader):
        return ""
    try:
        body = reader(4096)
    except Exception:
        return ""
    found = _S3_ERROR.search(body) if isinstance(body, bytes) else None
    return f": {found.group(1).decode(errors='replace')}: {found.group(2).decode(errors='replace')}" if found else ""
