"""Local temporary files for remote reads: staged in ``TMPDIR``, their failures named as such.

A remote load copies bytes into a local file first (a whole object, or the byte ranges a weights-only
load needs), because ``torch.load`` reads a local path much faster than a remote stream.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ml_playground.errors import MLPlaygroundError, StorageError

__all__ = ["local_staging", "sized_temp_file", "split"]


def split(ranges: Sequence[tuple[int, int]], piece: int) -> list[tuple[int, int]]:
    """``ranges`` cut into ranges of at most ``piece`` bytes (empty ones dropped)."""
    return [(start, min(start + piece, end)) for first, end in ranges for start in range(first, end, piece)]


@contextlib.contextmanager
def local_staging(url: str, where: str | Path) -> Iterator[None]:
    """The block's local file errors (staging ``url`` in ``where``) as StorageError naming both."""
    try:
        yield
    except MLPlaygroundError:
        raise
    except OSError as exc:
        raise StorageError(
            f"loading {url}: the local temporary copy in {where} failed ({exc.strerror or exc}); "
            "point TMPDIR at a writable directory with free space"
        ) from None


@contextlib.contextmanager
def sized_temp_file(prefix: str, size: int, url: str) -> Iterator[Path]:
    """A new temporary file of ``size`` bytes (a hole until written) in ``TMPDIR``, deleted on exit."""
    directory = tempfile.gettempdir()
    with local_staging(url, directory):
        fd, name = tempfile.mkstemp(prefix=prefix, dir=directory)
    path = Path(name)
    try:
        with local_staging(url, path):
            try:
                os.truncate(fd, size)
            finally:
                os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)
