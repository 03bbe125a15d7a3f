"""Sparse local copies of remote objects: only the byte ranges the caller asks for are fetched.

A weights-only load (:mod:`ml_playground.checkpoint.format`) reads an archive's directory, its pickle
and the model's records; the rest of the file stays a hole. How the ranges are fetched is the store's
choice (a :data:`Fetcher`): S3 uses concurrent ranged GETs pinned to one ETag; any fsspec filesystem
can use :func:`cat_fetcher` (``fs.cat_ranges``, ``max_concurrency`` pieces of at most 8 MiB at a time,
so the client holds a few tens of MiB whatever the size).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ml_playground.checkpoint._store import PartialCopy
from ml_playground.checkpoint.stores._staging import local_staging, sized_temp_file, split
from ml_playground.checkpoint.stores._translate import translated
from ml_playground.errors import CheckpointCorruptError, StorageError

__all__ = ["Fetcher", "cat_fetcher", "partial_copy"]

logger = logging.getLogger(__name__)

_SPARE = 64 * 2**20  # free space kept beyond the fetched bytes in the temporary directory
_CAT_PIECE = 8 * 2**20

Fetcher = Callable[[Path, list[tuple[int, int]]], None]
"""Writes the object's bytes of each range into the same offsets of the existing local file."""


class SparseCopy:
    """A temporary file of the object's size; :meth:`fetch` fills chosen ranges, the rest are holes."""

    def __init__(self, path: Path, size: int, url: str, fetcher: Fetcher) -> None:
        self._path = path
        self._size = size
        self._url = url
        self._fetcher = fetcher

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def fetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        wanted = [(start, end) for start, end in ranges if start < end]
        for start, end in wanted:
            if start < 0 or end > self._size:
                raise CheckpointCorruptError(
                    f"{self._url} is damaged: its zip records point at bytes {start}-{end - 1}, "
                    f"outside its {self._size} bytes"
                )
        if not wanted:
            return
        total = sum(end - start for start, end in wanted)
        with local_staging(self._url, self._path.parent):
            free = shutil.disk_usage(self._path.parent).free
        if free < total + _SPARE:
            raise StorageError(
                f"{self._path.parent} has {free >> 20} MiB free, too little for the {total >> 20} MiB of "
                f"{self._url} this load needs; point TMPDIR at a directory with more space"
            )
        self._fetcher(self._path, wanted)


@contextlib.contextmanager
def partial_copy(url: str, size: int, fetcher: Fetcher) -> Iterator[PartialCopy | None]:
    """An empty sparse copy of the object ``url`` of ``size`` bytes (nothing fetched yet), deleted on exit.

    Yields None when the temporary directory (``TMPDIR``) lacks even the spare space.
    """
    directory = tempfile.gettempdir()
    with local_staging(url, directory):
        free = shutil.disk_usage(directory).free
    if free < _SPARE:
        logger.info("%s is nearly full: loading all of %s instead of its weights", directory, url)
        yield None
        return
    with sized_temp_file("ml_playground-weights-", size, url) as path:
        yield SparseCopy(path, size, url, fetcher)


def cat_fetcher(fs: Any, url: str, max_concurrency: int) -> Fetcher:
    """A fetcher over ``fs.cat_ranges``: ``max_concurrency`` pieces of at most 8 MiB per call."""

    def fetch(path: Path, ranges: list[tuple[int, int]]) -> None:
        _cat_into(fs, url, path, split(ranges, _CAT_PIECE), max(1, max_concurrency))

    return fetch


def _cat_into(fs: Any, url: str, path: Path, pieces: list[tuple[int, int]], batch: int) -> None:
    with local_staging(url, path):
        fd = os.open(path, os.O_WRONLY)
    try:
        for first in range(0, len(pieces), batch):
            group = pieces[first : first + batch]
            with translated("loading", url):
                bodies = fs.cat_ranges(
                    [url] * len(group), [start for start, _ in group], [end for _, end in group], on_error="raise"
                )
            for (start, end), body in zip(group, bodies, strict=True):
                if len(body) != end - start:
                    raise StorageError(f"loading {url}: bytes {start}-{end - 1} ended after {len(body)} bytes")
                with local_staging(url, path):
                    os.pwrite(fd, body, start)
    finally:
        os.close(fd)
