"""Where a ``torch.save`` archive keeps what: its records, read from the zip's central directory.

A checkpoint is an uncompressed zip::

    [data.pkl][.format_version][.storage_alignment][byteorder][data/0][data/1]...[version, ...][directory][EOCD]

Each storage is one ``data/<key>`` record, written in key order, i.e. in the order the pickle first
meets it. This module reads the directory (the stdlib ``zipfile`` reads only the end of a file for
it, so a sparse file that holds the tail is enough), says where each record and its data lie, and
coalesces ranges. It does no I/O but reading the local file or stream it is given.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ml_playground.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, StorageError

__all__ = [
    "LOCAL_HEADER_SIZE",
    "TAIL",
    "Archive",
    "Record",
    "coalesce",
    "data_start",
    "directory_start",
    "open_regular",
]

TAIL = 64 * 2**10
"""Bytes fetched from the end first: the EOCD, and the whole directory of a checkpoint of ~500 tensors."""

_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_LOCAL_HEADER = b"PK\x03\x04"
LOCAL_HEADER_SIZE = 30
_STORAGE_NAME = re.compile(r"^[^/]+/data/(\d+)$")


@dataclass(frozen=True)
class Record:
    """One zip member: its local header's offset, its data's size, and where the next record starts."""

    name: str
    header_offset: int
    size: int
    end: int

    @property
    def storage_key(self) -> str | None:
        """The storage key of a ``<archive>/data/<key>`` record, else None."""
        match = _STORAGE_NAME.match(self.name)
        return match.group(1) if match else None


def open_regular(path: Path, source: str, *, buffering: int = -1) -> IO[bytes]:
    """``path`` opened for reading, if it is a regular file: a FIFO, a device or a directory is an error, and
    the open itself never blocks (``O_NONBLOCK``: a FIFO with no writer would otherwise hang the reader)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise CheckpointCorruptError(f"{source} is {kind}, not a regular file; it is not a checkpoint")
        os.set_blocking(fd, True)
        handle: IO[bytes] = os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise
    return handle


@contextlib.contextmanager
def _opened(path: Path, source: str) -> Iterator[IO[bytes]]:
    """``open_regular``, a missing file CheckpointNotFoundError (rotation may delete it between two reads of one
    load: a reader of a chosen checkpoint then chooses again) and another failure to open it StorageError."""
    try:
        handle = open_regular(path, source)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint {source}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {source}: {exc.strerror or exc}") from None
    with handle:
        yield handle


def directory_start(path: Path, size: int, source: str) -> int:
    """The central directory's offset, from the EOCD (and zip64) records within the file's last ``TAIL`` bytes."""
    with _opened(path, source) as handle:
        return _directory_start(handle, size, source)


def _directory_start(handle: IO[bytes], size: int, source: str) -> int:
    start = max(0, size - TAIL)
    handle.seek(start)
    tail = handle.read(size - start)
    # torch writes no archive comment, so the EOCD ends the file; search only if it does not
    at = len(tail) - 22 if tail[-22:-18] == _EOCD else tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise CheckpointCorruptError(f"{source} is not a zip archive (no end of central directory)")
    (offset,) = struct.unpack_from("<I", tail, at + 16)
    if offset != 0xFFFFFFFF:
        return _within(int(offset), size, source)
    locator = at - 20
    if locator < 0 or tail[locator : locator + 4] != _ZIP64_LOCATOR:
        raise CheckpointCorruptError(f"{source} has a damaged zip64 end of central directory")
    (record,) = struct.unpack_from("<Q", tail, locator + 8)
    handle.seek(record)
    zip64 = handle.read(56)
    if zip64[:4] != _ZIP64_EOCD:
        raise CheckpointCorruptError(f"{source} has a damaged zip64 end of central directory")
    (offset,) = struct.unpack_from("<Q", zip64, 48)
    return _within(int(offset), size, source)


def _within(directory: int, size: int, source: str) -> int:
    if not 0 <= directory < size:
        raise CheckpointCorruptError(
            f"{source} is damaged: its zip directory is said to start at byte {directory} of {size}"
        )
    return directory


class Archive:
    """A ``torch.save`` archive (a local path or a seekable stream) whose zip directory is read at most once."""

    def __init__(self, data: Path | IO[bytes], source: str) -> None:
        self.data = data
        self.source = source
        self._infos: list[zipfile.ZipInfo] | None = None
        self._size: int | None = None

    def infos(self) -> list[zipfile.ZipInfo]:
        """The directory's members by offset; an unreadable directory is CheckpointCorruptError."""
        if self._infos is None:
            with self._handle() as handle:
                try:
                    with zipfile.ZipFile(handle) as archive:
                        self._infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
                except MemoryError:
                    raise
                except Exception as exc:  # zipfile fails on a damaged directory in many ways (NotImplementedError, ...)
                    raise CheckpointCorruptError(f"{self.source} has an unreadable zip directory ({exc})") from None
        return self._infos

    def check_stored(self) -> None:
        """Every member must be stored uncompressed within the archive's bytes (our writer never compresses).

        A deflated ``data.pkl`` would be inflated by torch's reader before anything else could look at it:
        a zip bomb of a few MB inflates to GBs. Checked on the directory, before ``torch.load`` reads it.
        """
        size = self.size()
        for info in self.infos():
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise CheckpointCorruptError(
                    f"{self.source} is damaged or hostile: its zip member {info.filename[:100]} is compressed "
                    f"(method {info.compress_type}); ml_playground writes and reads only uncompressed archives"
                )
            if info.header_offset + info.file_size > size:
                raise CheckpointCorruptError(
                    f"{self.source} is damaged: its zip member {info.filename[:100]} claims {info.file_size} bytes "
                    f"at byte {info.header_offset}, past the archive's end ({size} bytes)"
                )

    def pickle_size(self) -> int:
        """The size of the archive's pickle (``<archive>/data.pkl``); what a walk of its content may cost."""
        sizes = [info.file_size for info in self.infos() if info.filename.endswith("/data.pkl")]
        if len(sizes) != 1:
            raise CheckpointCorruptError(f"{self.source} is not a torch.save archive (it has {len(sizes)} data.pkl)")
        return sizes[0]

    def size(self) -> int:
        """The archive's size in bytes."""
        if self._size is None:
            with self._handle() as handle:
                self._size = handle.seek(0, 2)
        return self._size

    def records(self, directory: int) -> list[Record]:
        """Every record, by offset, each ending where the next begins (the last where the directory does)."""
        infos = self.infos()
        ends = [info.header_offset for info in infos[1:]] + [directory]
        records = [Record(i.filename, i.header_offset, i.file_size, end) for i, end in zip(infos, ends, strict=True)]
        if any(record.header_offset + record.size > record.end for record in records):
            raise CheckpointCorruptError(f"{self.source} has a zip directory whose records overlap or lie past its end")
        return records

    def directory_start(self) -> int:
        """The central directory's offset (for :meth:`records`), read from the end of the archive."""
        with self._handle() as handle:
            return _directory_start(handle, self.size(), self.source)

    def check_storage_alignment(self) -> None:
        """The ``.storage_alignment`` record must read as a positive integer.

        torch divides by it when it computes storage offsets (memory-mapped loads with
        ``calculate_storage_offsets``, and ``map_location="meta"``): a damaged ``0`` would kill the process
        with SIGFPE instead of raising. The tensor digests do not cover it.
        """
        alignment = self._small_record("/.storage_alignment")
        if alignment is not None and not re.fullmatch(rb"[1-9][0-9]{0,8}", alignment):
            raise CheckpointCorruptError(
                f"{self.source} is damaged: its .storage_alignment record reads {alignment[:16]!r}, "
                "not a positive integer"
            )

    def refuse_other_byte_order(self, what: str) -> None:
        """Raise if the archive was written on a machine of the other byte order (its ``byteorder`` record).

        torch swaps such a file's bytes when it loads it, so the values are right, but the digests (of the
        writer's bytes) cannot be checked, and a reader of the raw bytes would get them unswapped. ``what``
        says what cannot be done, and the message what can.
        """
        order = self._small_record("/byteorder")
        if order is not None and order != sys.byteorder.encode():
            raise CheckpointError(
                f"{self.source} was written on a {order[:16].decode('ascii', 'replace')}-endian machine and this "
                f"one is {sys.byteorder}-endian: {what}. Load it whole with verify=False (torch swaps its bytes)."
            )

    def native_byte_order(self) -> bool:
        """False if the ``byteorder`` record names the other byte order (torch would swap the bytes on loading)."""
        order = self._small_record("/byteorder")
        return order is None or order == sys.byteorder.encode()

    def _small_record(self, suffix: str) -> bytes | None:
        """The first 64 bytes of the member whose name ends with ``suffix``; None if there is none, or if the
        directory is unreadable (the load that follows reports that). Read past zipfile, whose CRC check would
        fail: ``encode`` writes no CRCs."""
        try:
            infos = self.infos()
        except CheckpointCorruptError:
            return None
        info = next((i for i in infos if i.filename.endswith(suffix)), None)
        if info is None:
            return None
        with self._handle() as handle:
            handle.seek(info.header_offset)
            header = handle.read(LOCAL_HEADER_SIZE)
            if len(header) < LOCAL_HEADER_SIZE or header[:4] != _LOCAL_HEADER:
                raise CheckpointCorruptError(
                    f"{self.source} is damaged: the zip record {info.filename} has no local header"
                )
            name_length, extra_length = struct.unpack_from("<HH", header, 26)
            handle.seek(info.header_offset + LOCAL_HEADER_SIZE + name_length + extra_length)
            return handle.read(min(info.file_size, 64))

    @contextlib.contextmanager
    def _handle(self) -> Iterator[IO[bytes]]:
        """The archive's bytes, at whatever position; a stream is put back where it was."""
        if isinstance(self.data, Path):
            with _opened(self.data, self.source) as handle:
                yield handle
            return
        start = self.data.tell()
        try:
            yield self.data
        finally:
            self.data.seek(start)


def data_start(record: Record, header: bytes, source: str) -> int:
    """Where ``record``'s data starts, from ``header``, the first ``LOCAL_HEADER_SIZE`` bytes of its local header."""
    if len(header) < LOCAL_HEADER_SIZE or header[:4] != _LOCAL_HEADER:
        raise CheckpointCorruptError(f"{source} is damaged: the zip record {record.name} has no local header")
    name_length, extra_length = struct.unpack_from("<HH", header, 26)
    offset: int = record.header_offset + LOCAL_HEADER_SIZE + name_length + extra_length
    if offset + record.size > record.end:
        raise CheckpointCorruptError(f"{source} is damaged: the zip record {record.name} overlaps the next one")
    return offset


def coalesce(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty ranges with overlapping or adjacent ones merged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
