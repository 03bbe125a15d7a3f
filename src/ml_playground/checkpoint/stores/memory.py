"""MemoryStore: ``memory://`` locations, for tests in one process (fsspec's in-memory filesystem).

fsspec's memory files appear as soon as they are opened and ignore ``autocommit=False``, so a save
writes a temporary key (never listed) and moves it onto the name when complete. The check that the
name is free and the move are two steps: the store is for one process.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import IO, Any

from ml_playground.checkpoint._streams import FailureKeeping
from ml_playground.checkpoint.stores._backend import check_options
from ml_playground.checkpoint.stores._fsspec import FsspecStore
from ml_playground.checkpoint.stores._translate import translate, translated
from ml_playground.errors import CheckpointExistsError
from ml_playground.locations import RemoteLocation

__all__ = ["MemoryStore"]


class MemoryStore(FsspecStore):
    """Checkpoints under the ``memory://`` location ``location`` (every instance sees the same objects)."""

    def __init__(self, location: RemoteLocation, *, create: bool = False) -> None:
        from fsspec.implementations.memory import MemoryFileSystem

        check_options(location)
        fs: Any = MemoryFileSystem(skip_instance_cache=True)
        super().__init__(location, fs)
        if create:
            fs.makedirs(self.url, exist_ok=True)
            self._prove_writable(fs)

    @classmethod
    def from_location(cls, location: RemoteLocation, *, create: bool = False) -> MemoryStore:
        return cls(location, create=create)

    @contextlib.contextmanager
    def _write(self, url: str, name: str) -> Iterator[IO[bytes]]:
        temp = self._child(f"{secrets.token_hex(4)}.{name}", temporary=True)
        with translated("saving", url):
            handle = self._fs.open(temp, "wb")
        kept = FailureKeeping(handle, lambda exc: translate(exc, "saving", url))
        try:
            yield kept  # type: ignore[misc]
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
            kept.raise_own_failure(exc)
            raise
