"""Our reader of tensor bytes: each storage read from the file straight into its own memory, hashed while hot.

``torch.load`` reads every storage record through its zip reader into new memory, and a verified load
then hashed all of it in a second pass (docs/performance.md, issue 16). Full and weights-only loads read
through this module instead:

1. ``_torch.load_unread`` (``torch.load`` under ``torch.serialization.skip_data``) unpickles the tree and
   allocates every storage at its size without reading it: offsets, strides, dtypes and shared storages
   are torch's own, and the memory is untouched;
2. :func:`plan` pairs every storage with its ``data/<key>`` record: ``torch.save`` numbers storages in the
   order its pickler first meets them, which is the order of the tree's walk (``_tree.walk``); every pair
   must agree on the size, or there is no plan (a full load then lets ``torch.load`` read the file);
3. :meth:`Plan.read` reads each record in pieces of ``PIECE`` bytes straight into its storage's memory
   (each fresh page is touched once, by the read) and hashes each piece into the digests of the tensors
   it holds right after reading it, while it is in the core's cache (a tensor that is not one run of its
   storage, e.g. a transposed view, is hashed once its storage is whole: ``_digests.tensor_digest``).
   From a local file a second thread takes its share of the storages, so both cores copy and hash.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch
import xxhash

from ml_playground.checkpoint._tree import walk
from ml_playground.checkpoint.format import _digests
from ml_playground.checkpoint.format._zip_layout import LOCAL_HEADER_SIZE, Archive, Record, data_start, open_regular
from ml_playground.errors import CheckpointCorruptError, CheckpointNotFoundError, StorageError

__all__ = ["PIECE", "Plan", "opened", "plan"]

PIECE = 1 << 20
"""Bytes read per call, then hashed at once: they still sit in the core's cache (half its L2 here)."""
PARALLEL_BYTES = 32 << 20
"""Below this many bytes to read, a second thread costs more than it saves."""

_EMPTY_DIGEST = xxhash.xxh3_64_digest(b"")
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class Bytes:
    """Where the archive's bytes are read from: a file descriptor (``pread``) or a seekable stream."""

    def __init__(self, fd: int | None = None, stream: IO[bytes] | None = None) -> None:
        self.fd = fd
        self.stream = stream
        self.parallel = fd is not None  # a stream has one position: one thread reads it

    def read_at(self, offset: int, size: int) -> bytes:
        if self.fd is not None:
            return os.pread(self.fd, size, offset)
        assert self.stream is not None
        self.stream.seek(offset)
        return self.stream.read(size)

    def read_into(self, view: memoryview, offset: int) -> int:
        """Read up to ``len(view)`` bytes at ``offset`` into ``view``; 0 at the end of the data."""
        if self.fd is not None:
            return os.preadv(self.fd, [view], offset)
        assert self.stream is not None
        self.stream.seek(offset)
        return cast(io.RawIOBase, self.stream).readinto(view) or 0  # every stream a store hands out has it


@contextlib.contextmanager
def opened(archive: Archive) -> Iterator[Bytes | None]:
    """The archive's bytes for :meth:`Plan.read`, opened now (a file then stays the same file if its name is
    rotated away meanwhile); None for a stream that cannot seek. A stream is put back where it was."""
    data, source = archive.data, archive.source
    if isinstance(data, Path):
        try:  # a regular file only, opened without blocking (a FIFO is refused, never waited on)
            handle = open_regular(data, source, buffering=0)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint {source}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {source}: {exc.strerror or exc}") from None
        with handle:
            if not hasattr(os, "preadv"):
                yield Bytes(stream=handle)
                return
            if hasattr(os, "posix_fadvise"):  # a larger readahead window when the page cache is cold
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            yield Bytes(fd=handle.fileno())
        return
    if not data.seekable():
        yield None
        return
    start = data.tell()
    try:
        yield Bytes(stream=data)
    finally:
        data.seek(start)


@dataclass(eq=False)
class _Run:
    """A run of a storage's bytes, ``[start, end)``, whose xxh3 is the digest of the tensors at ``slots``."""

    start: int
    end: int
    slots: list[int] = field(default_factory=list)
    hasher: Any = field(default_factory=xxhash.xxh3_64)


@dataclass(eq=False)
class _Read:
    """One storage record to read into ``storage``, and the digests computed on the way."""

    storage: torch.UntypedStorage
    record: Record
    runs: list[_Run] = field(default_factory=list)
    whole: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """Tensors hashed once the storage is complete: their bytes are not one run of it."""

    def run(self, start: int, end: int) -> _Run:
        found = next((run for run in self.runs if (run.start, run.end) == (start, end)), None)
        if found is None:
            found = _Run(start, end)
            self.runs.append(found)
        return found


def plan(
    archive: Archive,
    payload: Mapping[str, Any],
    tensors: Sequence[tuple[str, str, torch.Tensor]],
    *,
    read: Collection[str] | None,
    hashed: Collection[str],
) -> Plan | None:
    """What to read for ``payload`` (a ``load_unread`` of ``archive``), or None where this reader does not apply.

    ``read`` names the top-level sections whose storages are read (None: all); ``tensors`` are the payload
    body's tensors in walk order (``_digests.tensors``), and those in the sections ``hashed`` (a subset of
    ``read``) get their digests computed, at the same index. None when a tensor is not a plain dense CPU
    tensor, or when the storages do not pair with the records (``load_unread`` has refused compressed records).
    """
    order: list[torch.UntypedStorage] = []
    seen: set[int] = set()
    wanted: set[int] = set()
    for section, value in payload.items():
        for tensor in (node.value for node in walk(value) if isinstance(node.value, torch.Tensor)):
            if not _plain(tensor):
                return None
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                continue
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                order.append(storage)
            if read is None or section in read:
                wanted.add(storage.data_ptr())
    records = sorted(
        (
            record
            for record in archive.records(archive.directory_start())
            if record.storage_key is not None and record.size > 0
        ),
        key=lambda record: int(record.storage_key or 0),
    )
    if len(records) != len(order) or any(s.nbytes() != r.size for s, r in zip(order, records, strict=False)):
        return None
    reads = {s.data_ptr(): _Read(s, r) for s, r in zip(order, records, strict=True) if s.data_ptr() in wanted}
    digests: list[bytes | None] = [None] * len(tensors)
    for slot, (section, _, tensor) in enumerate(tensors):
        if section not in hashed:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            digests[slot] = _EMPTY_DIGEST
            continue
        item = reads[tensor.untyped_storage().data_ptr()]
        if tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg():
            start = int(tensor.storage_offset()) * tensor.element_size()
            item.run(start, start + nbytes).slots.append(slot)
        else:
            item.whole.append((slot, tensor))
    return Plan(sorted(reads.values(), key=lambda item: item.record.header_offset), digests, archive.source)


def _plain(tensor: torch.Tensor) -> bool:
    strided = tensor.layout == torch.strided and not (tensor.is_quantized or tensor.is_nested)
    return type(tensor) in _PLAIN_TYPES and strided and tensor.device.type == "cpu"


class Plan:
    """The storage records to read, in file order, and the digests they yield (``digests[i]`` for tensor ``i``)."""

    def __init__(self, reads: list[_Read], digests: list[bytes | None], source: str) -> None:
        self._reads = reads
        self.digests = digests
        self._source = source

    def ranges(self) -> list[tuple[int, int]]:
        """The byte ranges of the records read, local headers included (what a partial copy must fetch)."""
        return [(item.record.header_offset, item.record.end) for item in self._reads]

    def read(self, data: Bytes, *, threads: int = 2) -> list[bytes | None]:
        """Fill every planned storage from ``data`` and return the digests; raises on a short or unreadable file."""
        total = sum(item.record.size for item in self._reads)
        workers = threads if data.parallel and total >= PARALLEL_BYTES and _cpus() >= 2 else 1
        try:  # in file order: from a cold page cache the disk then reads ahead for both threads
            _share(self._reads, lambda item, stop: self._read_one(data, item, stop), workers)
        except OSError as exc:
            raise StorageError(f"cannot read {self._source}: {exc.strerror or exc}") from None
        return self.digests

    def _read_one(self, data: Bytes, item: _Read, stop: threading.Event) -> None:
        record, size = item.record, item.record.size
        header = data.read_at(record.header_offset, LOCAL_HEADER_SIZE)
        if len(header) < LOCAL_HEADER_SIZE:
            raise CheckpointCorruptError(f"{self._source} is truncated: it ends before its zip record {record.name}")
        start = data_start(record, header, self._source)
        view = memoryview((ctypes.c_char * size).from_address(item.storage.data_ptr())).cast("B")
        done = 0
        while done < size:
            if stop.is_set():
                return
            count = data.read_into(view[done : done + PIECE], start + done)
            if count <= 0:
                raise CheckpointCorruptError(
                    f"{self._source} is truncated: the data of its zip record {record.name} ends {size - done} "
                    "bytes early"
                )
            for run in item.runs:
                low, high = max(run.start, done), min(run.end, done + count)
                if low < high:
                    run.hasher.update(view[low:high])
            done += count
        for run in item.runs:
            for slot in run.slots:
                self.digests[slot] = run.hasher.digest()
        for slot, tensor in item.whole:
            self.digests[slot] = _digests.tensor_digest(tensor)


def _cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _share(items: list[_Read], work: Callable[[_Read, threading.Event], None], workers: int) -> None:
    """Run ``work`` on every item, taken in order by this thread and up to ``workers - 1`` helpers.

    The first failure (this thread's or a helper's) stops the others at their next piece and is raised; an
    interrupt here stops the helper the same way (it only writes into the storages being read).
    """
    queue = iter(items)
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def take() -> None:
        try:
            while not stop.is_set():
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                work(item, stop)
        except BaseException as exc:  # handed to the caller below; never lost in a thread
            failures.append(exc)
            stop.set()

    helpers = [threading.Thread(target=take, name="ml_playground-read", daemon=True) for _ in range(workers - 1)]
    started = []
    try:
        for helper in helpers:
            with contextlib.suppress(RuntimeError):  # at the process's thread limit: read with fewer threads
                helper.start()
                started.append(helper)
        take()
        for helper in started:
            helper.join()
    finally:
        stop.set()
    if failures:
        raise failures[0]
