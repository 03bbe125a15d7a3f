"""A seekable read-only stream over any way of fetching an object's byte ranges.

``torch.load`` seeks around a stream (the zip directory at the end first, then the records); a store
that reads objects by ranged requests hands out this stream: each read is one ranged fetch.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

__all__ = ["RangeFetcher", "RangeReader"]

RangeFetcher = Callable[[int, int, Callable[[int, bytes], None]], None]
"""``fetch(start, end, sink)``: passes bytes ``[start, end)`` of the object to ``sink(offset, piece)``, in order."""


class RangeReader(io.RawIOBase):
    """The ``size`` bytes of an object as a seekable raw stream; wrap it in ``io.BufferedReader``."""

    def __init__(self, size: int, fetch: RangeFetcher) -> None:
        self._size = size
        self._fetch = fetch
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start = self._position
        end = min(self._size, start + len(view))
        if end <= start:
            return 0

        def sink(offset: int, piece: bytes) -> None:
            view[offset - start : offset - start + len(piece)] = piece

        self._fetch(start, end, sink)
        self._position = end
        return end - start
