"""The one place a stream's first failure is kept.

``torch.save`` turns an exception raised by its stream's ``write`` (a full disk, a failed upload, even
``KeyboardInterrupt``) into ``RuntimeError("unexpected pos ...")``, or may carry on; a reader's caller
may call a failed read "corrupt". The stream's own error, which names the path or URL and the cause, is
what the user must see. Every stream the codec writes to and every stream a store hands out is wrapped
in :class:`FailureKeeping`, which keeps that error, raises it again on every later call, and lets the
code that owns the stream raise it instead of what the caller made of it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["FailureKeeping"]

_T = TypeVar("_T")


def _same(exc: BaseException) -> BaseException:
    return exc


class FailureKeeping(io.RawIOBase):
    """A raw stream over ``inner`` that keeps the first exception any call raised (``failure``).

    ``translate`` turns a backend exception into the package's error before it is kept and raised
    (a ``KeyboardInterrupt`` is kept as it is).
    """

    def __init__(self, inner: IO[bytes] | Any, translate: Callable[[BaseException], BaseException] = _same) -> None:
        super().__init__()
        self._inner = inner
        self._translate = translate
        self.failure: BaseException | None = None
        self._closed = False

    def raise_own_failure(self, raised: BaseException) -> None:
        """Raise the kept failure instead of ``raised``, what a caller made of it; an interrupt passes."""
        if self.failure is not None and raised is not self.failure and isinstance(raised, Exception):
            raise self.failure from raised

    def raise_failure(self) -> None:
        """Raise the kept failure, if any (a caller may have swallowed it and carried on)."""
        if self.failure is not None:
            raise self.failure

    def _call(self, method: Callable[..., _T], *args: Any) -> _T:
        if self._closed:  # e.g. a buffer flushed while the owner cleans up: never the kept failure again
            raise ValueError("I/O operation on a closed checkpoint stream")
        if self.failure is not None:
            raise self.failure
        try:
            return method(*args)
        except Exception as exc:
            self.failure = self._translate(exc)
        except BaseException as exc:
            self.failure = exc
        raise self.failure

    def readable(self) -> bool:
        return bool(self._inner.readable())

    def writable(self) -> bool:
        return bool(self._inner.writable())

    def seekable(self) -> bool:
        return bool(self._inner.seekable())

    def write(self, data: Buffer) -> int:
        written = self._call(self._inner.write, data)
        return memoryview(data).nbytes if written is None else int(written)

    def flush(self) -> None:
        self._call(self._inner.flush)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Mark this wrapper closed, without a flush: the inner stream's owner flushes and closes it."""
        self._closed = True

    def read(self, size: int | None = -1) -> bytes:
        data: bytes = self._call(self._inner.read, -1 if size is None else size)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position: int = self._call(self._inner.seek, offset, whence)
        return position

    def tell(self) -> int:
        # not kept: buffered writers ask an unseekable raw stream for its position and expect a refusal
        position: int = self._inner.tell()
        return position
