"""Reading byte ranges of part objects, each checked against its xxh3 digest from the manifest.

The fastest way the store declares: a local file read in place (``local_path``), a remote object's sparse copy
that fetches only the ranges asked for (``partial_copy``: ranged GETs), else the store's stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import xxhash

from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint.format import coalesce
from ml_playground.checkpoint.sharded._metadata import ItemInfo
from ml_playground.errors import CheckpointCorruptError, CheckpointNotFoundError, StorageError

__all__ = ["PartReader", "read_parts"]


class PartReader:
    """One part object, opened for ranged reads; ``read`` checks each range's digest."""

    def __init__(
        self, source: str, path: Path | None, stream: IO[bytes] | None, ranges: Sequence[tuple[int, int]] = ()
    ) -> None:
        self.source = source
        self._path = path
        self._stream = stream
        self._ranges = ranges
        self._fd: int | None = None

    def read(self, offset: int, length: int, digest: str) -> bytearray:
        """The part's bytes ``[offset, offset + length)``; damaged or missing bytes raise, naming the part."""
        data = bytearray(length)
        self.read_into(offset, memoryview(data), digest)
        return data

    def read_into(self, offset: int, target: memoryview, digest: str) -> None:
        """Fill ``target`` (writable, contiguous bytes) with the part's bytes from ``offset`` on, with no copy of
        ours, and check their digest; damaged or missing bytes raise, naming the part (``target`` then holds
        what was read)."""
        target = target.cast("B")
        length = len(target)
        filled = 0
        if length and self._path is not None:
            try:
                if self._fd is None:
                    self._fd = self._open(self._path)
                while filled < length:
                    got = os.preadv(self._fd, [target[filled:]], offset + filled)
                    if not got:
                        break
                    filled += got
            except FileNotFoundError:  # deleted since the listing: rotated away, or damage (the caller tells)
                raise CheckpointNotFoundError(f"its part {self.source} is missing") from None
            except OSError as exc:
                raise StorageError(f"cannot read {self.source}: {exc.strerror or exc}") from None
        elif length:
            assert self._stream is not None
            self._stream.seek(offset)
            while filled < length:
                got = self._stream.readinto(target[filled:])  # type: ignore[attr-defined]
                if not got:
                    break
                filled += got
        if filled != length:
            raise CheckpointCorruptError(
                f"{self.source} is truncated: bytes {offset}..{offset + length - 1} end after {filled} bytes"
            )
        if xxhash.xxh3_64_hexdigest(target) != digest:
            raise CheckpointCorruptError(
                f"{self.source} is damaged: bytes {offset}..{offset + length - 1} do not match their checksum. "
                "Delete the checkpoint, or restore it from a copy."
            )

    def _open(self, path: Path) -> int:
        """The file, opened; the kernel asked to start reading the ranges to be read (the reads and the digests
        then overlap the disk's work)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        if hasattr(os, "posix_fadvise"):
            for start, end in self._ranges:
                with contextlib.suppress(OSError):  # a hint only
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def read_parts(store: CheckpointStore, items: Iterable[ItemInfo]) -> Iterator[dict[str, PartReader]]:
    """A reader for each part holding one of ``items`` (the saved items that will be read)."""
    wanted: dict[str, list[tuple[int, int]]] = {}
    for info in items:
        wanted.setdefault(info["part"], []).append((info["offset"], info["offset"] + info["length"]))
    capabilities = store.capabilities
    with contextlib.ExitStack() as stack:
        readers: dict[str, PartReader] = {}
        for name, ranges in wanted.items():
            source = f"{store.url}/{name}"
            try:
                if capabilities.local_path is not None:
                    reader = PartReader(source, capabilities.local_path(name), None, coalesce(ranges))
                elif capabilities.partial_copy is not None:
                    copy = stack.enter_context(capabilities.partial_copy(name))
                    if copy is None:
                        reader = PartReader(source, None, stack.enter_context(store.open(name)))
                    else:
                        copy.fetch(coalesce(ranges))
                        reader = PartReader(source, copy.path, None)
                else:
                    reader = PartReader(source, None, stack.enter_context(store.open(name)))
            except CheckpointNotFoundError:
                raise CheckpointNotFoundError(f"its part {source} is missing") from None
            except OSError as exc:
                raise StorageError(f"cannot read {source}: {exc.strerror or exc}") from None
            stack.callback(reader.close)
            readers[name] = reader
        yield readers
