"""A FileOps that counts every call and fails the N-th call of one operation with a chosen errno."""

from __future__ import annotations

import collections
import errno
import os
from pathlib import Path

from ml_playground.checkpoint import FileOps

OPERATIONS = ("open", "write", "start_writeback", "fsync", "close", "rename_no_replace", "fsync_dir", "unlink")
ERRNOS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO, "EXDEV": errno.EXDEV}


class FaultyOps(FileOps):
    """Fails call number ``nth`` (1-based) of ``operation``; ``nth = 0`` never fails (it only counts).

    ``close`` really closes before failing, as Linux frees the descriptor even when close reports an
    error; every other failing call does nothing before raising.
    """

    def __init__(self, operation: str = "", nth: int = 0, code: int = errno.EIO) -> None:
        assert operation in ("", *OPERATIONS)
        self.operation, self.nth, self.code = operation, nth, code
        self.counts: collections.Counter[str] = collections.Counter()
        self.calls: list[str] = []
        self.fired = False

    def _enter(self, operation: str) -> bool:
        self.counts[operation] += 1
        self.calls.append(operation)
        return operation == self.operation and self.counts[operation] == self.nth

    def _fail(self) -> OSError:
        self.fired = True
        return OSError(self.code, os.strerror(self.code))

    def open(self, path: Path) -> int:
        if self._enter("open"):
            raise self._fail()
        return super().open(path)

    def write(self, fd: int, data: memoryview) -> int:
        if self._enter("write"):
            raise self._fail()
        return super().write(fd, data)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        if self._enter("start_writeback"):
            raise self._fail()
        super().start_writeback(fd, offset, length)

    def fsync(self, fd: int) -> None:
        if self._enter("fsync"):
            raise self._fail()
        super().fsync(fd)

    def close(self, fd: int) -> None:
        fail = self._enter("close")
        super().close(fd)
        if fail:
            raise self._fail()

    def rename_no_replace(self, src: Path, dst: Path) -> None:
        if self._enter("rename_no_replace"):
            raise self._fail()
        super().rename_no_replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        if self._enter("fsync_dir"):
            raise self._fail()
        super().fsync_dir(path)

    def unlink(self, path: Path) -> None:
        if self._enter("unlink"):
            raise self._fail()
        super().unlink(path)
