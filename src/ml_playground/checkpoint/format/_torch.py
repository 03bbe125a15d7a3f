"""What the format borrows from torch, in one place: its loader, its two process-global switches, storages.

Each behaviour relied on here has a test of its own that names it when a torch version changes it
(``tests/test_torch_assumptions.py``):

- ``torch.serialization.set_crc32_options``: torch reads the switch once, when it opens its zip
  writer, before its first write (``crc32_off``);
- ``torch.serialization.skip_data`` (thread-local) makes ``torch.load`` allocate every storage at its size
  without reading its record, and ``torch.save`` numbers storages in the order its pickler first meets
  them, the order of ``_tree.walk`` (``load_unread``, ``_reader``);
- ``torch.save`` writes an uncompressed record in one ``write`` call, straight from the tensor's bytes
  (``_encode``'s digest placeholder).
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from ml_playground.checkpoint._tree import map_tensors
from ml_playground.checkpoint.format._zip_layout import Archive, open_regular
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    MLPlaygroundError,
    StorageError,
    UnsafeCheckpointError,
)

__all__ = [
    "MapLocation",
    "crc32_off",
    "first_line",
    "load",
    "load_unread",
    "on_device",
    "with_storages",
]

MapLocation = torch.device | str | None

_ZIP_MAGIC = b"PK\x03\x04"
_CRC32_SWITCH = threading.Lock()


@contextlib.contextmanager
def crc32_off() -> Iterator[None]:
    """torch's zip writer computes no CRC32 while this is entered (its records' CRC fields read 0).

    The switch is process-global: a save of ours holds one lock while it is off (until torch has opened
    its writer) and restores the previous value, so two saves of ours never flip it under each other. A
    plain torch.save another thread starts in that moment writes zero CRC fields; torch.load ignores them.
    """
    with _CRC32_SWITCH:
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(previous)


def load(archive: Archive, map_location: MapLocation, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` of the archive; every failure is the package's error naming it."""
    data, source = archive.data, archive.source
    _check_magic(data, source)
    meta = map_location is not None and torch.device(map_location).type == "meta"
    try:
        archive.check_stored()  # before torch inflates anything: no compressed members (zip bombs)
        if isinstance(data, Path) or meta:  # a stream only when torch would compute offsets from it
            archive.check_storage_alignment()
        with warnings.catch_warnings():
            # a damaged or foreign file makes torch warn about its pickle protocol; the outcome (an
            # error, or a verified load) must not depend on the caller's warning filters
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(data, map_location=map_location, weights_only=True, mmap=mmap)
    except MLPlaygroundError:
        raise
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint {source}") from None
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise UnsafeCheckpointError(
                f"{source} holds objects other than tensors and plain data; it was refused without "
                "running any of its code. Only load checkpoints written by ml_playground."
            ) from None
        raise CheckpointCorruptError(f"{source} is damaged: its metadata cannot be read ({first_line(exc)})") from None
    except Exception as exc:  # a damaged archive fails inside torch in many ways (AttributeError, ...)
        raise CheckpointCorruptError(
            f"{source} is not a readable checkpoint (truncated or damaged: {first_line(exc)})"
        ) from None


def load_unread(archive: Archive, map_location: MapLocation) -> Any:
    """``load`` with every storage allocated at its size and none of its bytes read.

    The tree, each tensor's dtype, shape, strides and storage offset, and which tensors share a storage
    are ``torch.load``'s own; the ``data/<key>`` records are not read (``torch.serialization.skip_data``,
    a thread-local switch). The storages' memory is fresh and untouched: a reader fills it (``_reader``).
    """
    with torch.serialization.skip_data():
        return load(archive, map_location, False)


def _check_magic(data: Path | IO[bytes], source: str) -> None:
    # torch.save writes a zip archive; anything else would take torch.load's legacy pickle path
    if isinstance(data, Path):
        try:
            with open_regular(data, source) as handle:
                magic = handle.read(len(_ZIP_MAGIC))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint {source}") from None
        except OSError as exc:  # not the bytes' fault: permissions, I/O errors
            raise StorageError(f"cannot read {source}: {exc.strerror or first_line(exc)}") from None
    else:
        start = data.tell()
        magic = data.read(len(_ZIP_MAGIC))
        data.seek(start)
    if magic != _ZIP_MAGIC:
        what = "empty" if not magic else "not a torch.save archive"
        raise CheckpointCorruptError(f"{source} is {what}; it is damaged or not a checkpoint")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), never torch's unsafe advice."""
    text = str(exc)
    # torch's weights-only refusal opens with advice to load with weights_only=False, i.e. to run the
    # file's code: never repeat that; its reason follows this marker
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def with_storages(
    tree: Any,
    replace: Callable[[torch.UntypedStorage], torch.UntypedStorage],
    copies: dict[int, torch.UntypedStorage] | None = None,
) -> Any:
    """``tree`` with every tensor's storage swapped for ``replace(storage)``, called once per storage (keyed
    by ``data_ptr()`` in ``copies``), so shared storages stay shared; views keep their offsets and strides."""
    copies = {} if copies is None else copies

    def swapped(tensor: torch.Tensor, keys: tuple[object, ...]) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in copies:
            copies[storage.data_ptr()] = replace(storage)
        new = copies[storage.data_ptr()]
        return torch.empty(0, dtype=tensor.dtype, device=new.device).set_(
            new, tensor.storage_offset(), tensor.size(), tensor.stride()
        )

    return map_tensors(tree, swapped)


def on_device(tree: Any, device: torch.device, copies: dict[int, torch.UntypedStorage] | None = None) -> Any:
    """``tree`` with its tensors copied to ``device``, one copy per storage: shared storages stay shared
    (also across calls that pass the same ``copies``)."""

    def moved(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        as_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
        return as_bytes.to(device=device, copy=True).untyped_storage()

    return with_storages(tree, moved, copies)
