"""Fetch S3 objects (whole, or chosen byte ranges) into local files: concurrent ranged GETs, bounded memory.

Why: ``torch.load`` over a seekable remote stream fetches one block at a time, so a load took
1.9-2.5x a plain ``cat`` of the object (docs/performance.md). Here ``max_concurrency`` ranged GETs
of ``range_size`` bytes run at once on the filesystem's event loop, and each body is written to
its place in the file in 1 MiB pieces as it arrives: the client holds at most
``max_concurrency`` pieces (a few MiB) whatever the object's size. The caller then loads the file
by path (torch's own reader, from the page cache), so the tensors are the only large allocation.
:func:`fetch_ranges` fetches any set of ranges the same way (a weights-only load fetches the model's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ml_playground.checkpoint.stores._staging import local_staging, sized_temp_file, split
from ml_playground.checkpoint.stores._translate import is_changed, translate, translated
from ml_playground.errors import CheckpointError, StorageError

__all__ = ["ObjectId", "downloaded", "fetch_ranges", "head"]

logger = logging.getLogger(__name__)

_PIECE = 2**20
_SPARE = 64 * 2**20  # free space kept beyond the object's size in the temporary directory

ObjectId = tuple[str, str, str]
"""An object's bucket, key and ETag: ranged GETs carry the ETag as If-Match."""


def head(fs: Any, bucket: str, key: str, url: str) -> tuple[ObjectId, int]:
    """HEAD the object (``url``): its id (with the ETag) and its size; a missing one raises CheckpointNotFoundError."""
    with translated("loading", url):
        response = fs.call_s3("head_object", Bucket=bucket, Key=key)
    return (bucket, key, str(response["ETag"])), int(response["ContentLength"])


@contextlib.contextmanager
def downloaded(
    fs: Any, bucket: str, key: str, url: str, *, range_size: int, max_concurrency: int
) -> Iterator[Path | None]:
    """Yield a temporary local copy of the S3 object ``url``, deleted on exit.

    Yields None (the caller streams instead) when the temporary directory (``TMPDIR``) lacks the
    space for the object. A missing object raises CheckpointNotFoundError; any backend failure the
    package's StorageError.
    """
    object_id, size = head(fs, bucket, key, url)
    directory = tempfile.gettempdir()
    with local_staging(url, directory):
        free = shutil.disk_usage(directory).free
    if free < size + _SPARE:
        logger.info("%s has %d MiB free, too little for %s: streaming it instead", directory, free >> 20, url)
        yield None
        return
    with sized_temp_file("ml_playground-load-", size, url) as path:
        fetch_ranges(fs, url, object_id, path, split([(0, size)], range_size), max_concurrency)
        yield path


def fetch_ranges(
    fs: Any, url: str, object_id: ObjectId, path: Path, ranges: Sequence[tuple[int, int]], concurrency: int
) -> None:
    """GET each range of the object into the same offsets of the existing file ``path``, ``concurrency`` at once.

    An object replaced since the HEAD that gave ``object_id`` fails (If-Match) instead of mixing bytes.
    """
    bucket, key, etag = object_id

    async def fetch(gate: asyncio.Semaphore, start: int, end: int) -> None:
        async with gate:
            try:  # If-Match: an object replaced meanwhile fails instead of mixing two objects' bytes
                response = await fs._call_s3(
                    "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
                )
            except Exception as exc:
                if is_changed(exc):
                    raise _Changed from None
                raise
            offset = start
            # Each range writes through its own descriptor: one left running after the caller gave up
            # (Ctrl-C) then writes only into the already deleted file, never into a reused descriptor.
            with local_staging(url, path):
                fd = os.open(path, os.O_WRONLY)
            try:
                async with response["Body"] as body:
                    while piece := await body.read(_PIECE):
                        with local_staging(url, path):
                            os.pwrite(fd, piece, offset)
                        offset += len(piece)
            finally:
                os.close(fd)
        if offset != end:
            raise StorageError(f"loading {url}: bytes {start}-{end - 1} ended after {offset - start} bytes")

    async def fetch_all() -> None:
        gate = asyncio.Semaphore(max(1, concurrency))
        async with asyncio.TaskGroup() as group:  # one failure cancels the other ranges
            for start, end in ranges:
                group.create_task(fetch(gate, start, end))

    future = asyncio.run_coroutine_threadsafe(fetch_all(), fs.loop)
    try:
        future.result()
    except BaseException as exc:
        future.cancel()  # the ranges still in flight stop at their next await
        if not isinstance(exc, Exception):
            raise
        failure = _first(exc, url)
        if isinstance(failure, _Changed):  # deleted (rotation in another process) or replaced?
            head(fs, bucket, key, url)  # a deleted object raises CheckpointNotFoundError here
            raise StorageError(f"{url} was replaced while being loaded; load it again") from None
        if failure is exc:
            raise
        raise failure from None


class _Changed(StorageError):
    """A ranged GET's If-Match failed: the object was deleted or replaced since its HEAD."""


def _first(exc: Exception, url: str) -> CheckpointError:
    """The first failure of a TaskGroup's ExceptionGroup, translated into the package's tree."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        inner = exc.exceptions[0]
        if not isinstance(inner, Exception):
            break
        exc = inner
    if isinstance(exc, CheckpointError):
        return exc
    return translate(exc, "loading", url)
