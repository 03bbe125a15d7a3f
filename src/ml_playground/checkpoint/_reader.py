"""Whole loads of a local checkpoint file at the disk's read speed, hashing each tensor while the rest is read.

``torch.load(path)`` reads every storage record through its own reader: 0.45-0.9x a raw read of the
same file here, and checking the digests was a pass of its own afterwards (docs/performance.md,
target 2). Here instead:

1. the caller memory-maps the file (``torch.load(mmap=True)`` computing storage offsets): that reads
   the pickle and gives every tensor's storage, dtype, shape and place in the file, but no tensor bytes;
2. every storage gets memory of its own, filled by reads straight into it in file order, so the
   kernel's readahead streams the file as a raw read does;
3. the tensors are rebuilt on those storages (same offsets, shapes and strides; shared storages stay
   shared), so the result no longer depends on the file or the mapping;
4. on request a second thread hashes each tensor as soon as its storage is in memory (xxhash releases
   the GIL), so the verification overlaps the read instead of following it.

Every storage's place is checked against its zip record's local header before anything is read.
A file written on a machine of the other byte order is not read here (``None``): torch's own reader
swaps its bytes.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ml_playground.checkpoint import _digests
from ml_playground.checkpoint._zip_layout import data_offset, directory_start, match_storages, read_records
from ml_playground.errors import CheckpointCorruptError

__all__ = ["Materialized", "materialize", "moved"]

Materialized = tuple[Any, list[bytes] | None]
"""The payload with its tensors in memory of their own, and the digests of the tensors asked for."""

_MAX_READ = 1 << 30


def materialize(
    mapped: Any, path: Path, source: str, to_hash: Callable[[Any], Iterable[torch.Tensor]] | None
) -> Materialized | None:
    """Read the storages of ``mapped`` (a memory-mapped load of ``path``) into memory of their own.

    ``to_hash`` picks, from the rebuilt payload, the tensors whose digests to compute (in its order)
    while the file is read. None when the file's byte order is not this machine's.
    """
    size = path.stat().st_size
    records = read_records(path, directory_start(path, size, source), source)
    if _byte_order(path, records, source) not in (None, sys.byteorder):
        return None
    mapped_storages = {
        tensor.untyped_storage().data_ptr(): tensor.untyped_storage()
        for _, tensor in _digests.tensors_in(mapped, "")
        if tensor.untyped_storage().nbytes() > 0
    }
    by_pointer = match_storages(mapped_storages.values(), records, source)
    places = sorted((data_offset(path, record, source), pointer) for pointer, record in by_pointer.items())
    # the mapping is one piece of the whole file: a storage's address and file offset differ by one constant
    if len({pointer - offset for offset, pointer in places}) > 1:
        raise CheckpointCorruptError(f"{source}: its tensors are not where its zip records say")
    fresh = {pointer: _allocated(mapped_storages[pointer].nbytes()) for _, pointer in places}
    payload = _rebuilt(mapped, fresh)
    del mapped, mapped_storages
    order = [(offset, fresh[pointer]) for offset, pointer in places]
    if to_hash is None:
        _read_storages(path, order, source, None)
        return payload, None
    hasher = _Hasher(list(to_hash(payload)), [storage for _, storage in order])
    with hasher:
        _read_storages(path, order, source, hasher.storage_read)
    return payload, hasher.digests()


def moved(tree: Any, device: torch.device) -> Any:
    """``tree`` with its tensors on ``device``: one copy per storage, so shared storages stay shared."""
    copies: dict[int, torch.UntypedStorage] = {}

    def move(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in copies:
            as_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
            copies[key] = as_bytes.to(device=device, copy=True).untyped_storage()
        return _on(copies[key], tensor, device)

    return _mapped(tree, move)


def _byte_order(path: Path, records: list[Any], source: str) -> str | None:
    record = next((r for r in records if r.name.endswith("/byteorder")), None)
    if record is None:
        return None  # torch reads such an archive as little-endian
    with path.open("rb") as handle:
        handle.seek(data_offset(path, record, source))
        return handle.read(record.size).decode("ascii", "replace")


def _rebuilt(tree: Any, fresh: Mapping[int, torch.UntypedStorage]) -> Any:
    def rebuild(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        target = fresh[storage.data_ptr()] if storage.nbytes() > 0 else _allocated(0)
        return _on(target, tensor, torch.device("cpu"))

    return _mapped(tree, rebuild)


def _allocated(nbytes: int) -> torch.UntypedStorage:
    return torch.empty(nbytes, dtype=torch.uint8).untyped_storage()


def _on(storage: torch.UntypedStorage, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.empty(0, dtype=like.dtype, device=device).set_(
        storage, like.storage_offset(), like.size(), like.stride()
    )
    return out.requires_grad_() if like.requires_grad else out


def _mapped(tree: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, dict):
        return type(tree)((key, _mapped(value, function)) for key, value in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_mapped(value, function) for value in tree)
    return tree


def _read_storages(
    path: Path,
    order: list[tuple[int, torch.UntypedStorage]],
    source: str,
    on_read: Callable[[], None] | None,
) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for offset, storage in order:
            nbytes = storage.nbytes()
            view = memoryview((ctypes.c_char * nbytes).from_address(storage.data_ptr())).cast("B")
            done = 0
            os.lseek(fd, offset, os.SEEK_SET)
            while done < nbytes:
                got = os.readv(fd, [view[done : done + _MAX_READ]])
                if got == 0:
                    raise CheckpointCorruptError(f"{source} is truncated: it ends inside its tensor data")
                done += got
            if on_read is not None:
                on_read()
    except OSError as exc:
        raise CheckpointCorruptError(f"{source} cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


class _Hasher:
    """Hashes tensors on a second thread, each once its storage has been read (storages arrive in order)."""

    def __init__(self, tensors: list[torch.Tensor], storages_in_order: list[torch.UntypedStorage]) -> None:
        self._tensors = tensors
        self._position = {storage.data_ptr(): index for index, storage in enumerate(storages_in_order)}
        self._read = 0
        self._stop = False
        self._ready = threading.Condition()
        self._digests: list[bytes] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ml_playground-verify", daemon=True)

    def __enter__(self) -> _Hasher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._ready:
            self._stop = exc_info[0] is not None
            self._ready.notify_all()
        self._thread.join()

    def storage_read(self) -> None:
        with self._ready:
            self._read += 1
            self._ready.notify_all()

    def _run(self) -> None:
        try:
            for tensor in self._tensors:
                needed = self._position.get(tensor.untyped_storage().data_ptr(), -1)
                with self._ready:
                    self._ready.wait_for(lambda: self._stop or self._read > needed)  # noqa: B023
                    if self._stop:
                        return
                self._digests.append(_digests.tensor_digest(tensor))
        except BaseException as exc:  # handed over by digests(); never lost in the thread
            self._error = exc

    def digests(self) -> list[bytes]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digests
