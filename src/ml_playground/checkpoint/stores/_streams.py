"""Streams handed to callers of FsspecStore: backend errors become ours, and are remembered.

``torch.save`` replaces an exception raised by the stream's ``write`` with a bare ``RuntimeError``
("unexpected pos ..."), and a reader's caller (the codec) may turn a failed read into "corrupt"; the
store therefore keeps the stream's own error and raises that instead.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any

from ml_playground.checkpoint.stores._translate import translated
from ml_playground.errors import CheckpointError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Reader", "Writer", "raise_own_failure"]


def raise_own_failure(failure: CheckpointError | None, raised: BaseException) -> None:
    """If the stream failed first, raise that instead of what the caller made of it (``torch.save``'s
    bare ``RuntimeError``), so a network fault or a deleted object is reported as what it is.
    ``KeyboardInterrupt`` and the like always pass through."""
    if failure is not None and raised is not failure and isinstance(raised, Exception):
        raise failure from raised


class Writer(io.RawIOBase):
    """A write stream over an fsspec file whose backend errors are ours, and remembered."""

    def __init__(self, handle: Any, url: str) -> None:
        super().__init__()
        self._handle = handle
        self._url = url
        self.failure: CheckpointError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        try:
            with translated("saving", self._url):
                self._handle.write(data)
        except CheckpointError as exc:
            self.failure = exc
            raise
        return memoryview(data).nbytes


class Reader(io.RawIOBase):
    """A seekable read stream whose backend errors (e.g. the object was deleted mid-read) are ours."""

    def __init__(self, handle: Any, url: str) -> None:
        super().__init__()
        self._handle = handle
        self._url = url
        self.failure: CheckpointError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        try:
            with translated("reading", self._url):
                data: bytes = self._handle.read(-1 if size is None else size)
        except CheckpointError as exc:
            self.failure = exc
            raise
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            with translated("reading", self._url):
                position: int = self._handle.seek(offset, whence)
        except CheckpointError as exc:
            self.failure = exc
            raise
        return position

    def tell(self) -> int:
        position: int = self._handle.tell()
        return position

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._handle.close()
        super().close()
