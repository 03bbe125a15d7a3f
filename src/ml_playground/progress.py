"""Progress output: a tqdm bar on a terminal, plain log lines otherwise (CI logs, pipes, files)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, TextIO

from tqdm import tqdm

from ml_playground.checkpoint import CheckpointStore, StoredObject
from ml_playground.checkpoint._store import LocalCopyStore, PartialCopy, PartialCopyStore

__all__ = ["DownloadProgress", "Progress"]


class Progress:
    """Training progress over iterations ``initial..total``; ``line`` prints without breaking the bar."""

    def __init__(self, total: int, initial: int, *, out: TextIO | None = None, bar: bool | None = None) -> None:
        self._out = out or sys.stdout
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar: tqdm | None = (
            tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, leave=False, file=sys.stderr)
            if use_bar
            else None
        )

    def line(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self._out)
        else:
            print(message, file=self._out, flush=True)

    def step(self, loss: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class DownloadProgress:
    """A read-only view of a store whose reads of large objects draw a byte-count bar on stderr.

    Used for remote loads (``sample``/``eval`` from a URL): a terminal user sees a multi-MB download move.
    """

    def __init__(self, store: CheckpointStore, *, min_bytes: int = 8 << 20, file: TextIO | None = None) -> None:
        self._store = store
        self._min_bytes = min_bytes
        self._file = file or sys.stderr

    @property
    def url(self) -> str:
        return self._store.url

    def list(self) -> list[StoredObject]:
        return self._store.list()

    def write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        raise TypeError(f"{self.url} is opened read-only here; {name} cannot be written")

    def delete(self, name: str) -> None:
        raise TypeError(f"{self.url} is opened read-only here; {name} cannot be deleted")

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path | None]:
        """The wrapped store's fast local copy (when it has one), announced on a line of its own."""
        if not isinstance(self._store, LocalCopyStore):
            yield None
            return
        size = self._size(name)
        if size >= self._min_bytes:
            print(f"fetching {self.url}/{name} ({size / 2**20:.1f} MiB) ...", file=self._file, flush=True)
        with self._store.local_copy(name) as path:
            yield path

    @contextlib.contextmanager
    def partial_copy(self, name: str) -> Iterator[PartialCopy | None]:
        """The wrapped store's sparse copy for a weights-only load (when it has one), announced on a line."""
        if not isinstance(self._store, PartialCopyStore):
            yield None
            return
        if self._size(name) >= self._min_bytes:
            print(f"fetching the weights of {self.url}/{name} ...", file=self._file, flush=True)
        with self._store.partial_copy(name) as copy:
            yield copy

    def _size(self, name: str) -> int:
        return next((obj.size for obj in self._store.list() if obj.name == name), 0)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        size = self._size(name)
        with self._store.open(name) as stream:
            if size < self._min_bytes:
                yield stream
                return
            with tqdm(
                total=size, unit="B", unit_scale=True, desc=f"reading {name}", leave=False, file=self._file
            ) as bar:
                yield _CountingReader(stream, bar)  # type: ignore[misc]


class _CountingReader:
    """Forwards a seekable binary stream, counting the bytes read onto a bar."""

    def __init__(self, stream: IO[bytes], bar: tqdm) -> None:
        self._stream = stream
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._bar.update(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        count = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        self._bar.update(count or 0)
        return int(count or 0)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True
