"""Weights-only loads: a checkpoint's model (and EMA) without its optimizer state, fetching only their bytes.

Sampling and evaluation need the model; the optimizer state is about twice its size. From a remote
store (docs/performance.md, target 7) the load works on a sparse local copy of the object
(:class:`~ml_playground.checkpoint._store.PartialCopy`) and fetches, in this order:

1. the last 64 KiB (the zip's end records and, for a few hundred tensors, its whole directory), and
   the rest of the directory if it starts earlier;
2. the metadata records (the pickle ``data.pkl`` first of all) and ``data/0``'s local header;
3. after a first ``torch.load(mmap=True)`` of that file, which reads no tensor bytes, the records of
   the storages that ``model``, ``ema`` and ``integrity`` hold, coalesced into few ranges.

The file is then loaded again (memory-mapped, so only the pickle is read) for the tensors' layout; the
model/EMA storages are read from the file straight into memory of their own (the mapping's pages are
never touched, so the load's peak is the weights themselves), and those copies' digests are checked.
``torch.load`` finds each storage's offset without reading the other records' local headers (which lie
in holes) because of torch's public switch
``torch.utils.serialization.config.load.calculate_storage_offsets``; without it torch would read zeros
as those headers and compute wrong offsets without an error (measured, torch 2.13). The switch is
process-global: it is on only during our loads, under one lock, and a ``torch.load`` another thread runs
meanwhile computes the same offsets torch's reader would find.
A local store's file is used in place (nothing to fetch).
"""

from __future__ import annotations

import ctypes
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from ml_playground.checkpoint._checkpoint import ModelWeights
from ml_playground.checkpoint._store import PartialCopy
from ml_playground.checkpoint._tree import tensors_in
from ml_playground.checkpoint.format._decode import check_header, checked_meta, migrated, usable_device, verify_sections
from ml_playground.checkpoint.format._tensors import check_loaded
from ml_playground.checkpoint.format._torch import MapLocation, load_mapped, on_device, with_storages
from ml_playground.checkpoint.format._zip_layout import (
    TAIL,
    Archive,
    Record,
    coalesce,
    data_offset,
    directory_start,
    header_range,
    match_storages,
    open_regular,
)
from ml_playground.errors import CheckpointCorruptError, CheckpointSchemaError

__all__ = ["read_weights"]

_VERIFIED = ("model", "ema")
_FETCHED = ("model", "ema", "integrity")  # from format version 2 the digests are a tensor of their own


class _Fetched:
    """The ranges of a partial copy fetched so far; asks the copy only for what it lacks."""

    def __init__(self, copy: PartialCopy) -> None:
        self.copy = copy
        self._have: list[tuple[int, int]] = []

    def ensure(self, ranges: Iterable[tuple[int, int]]) -> None:
        missing: list[tuple[int, int]] = []
        for start, end in coalesce(ranges):
            for have_start, have_end in self._have:
                if have_end <= start or have_start >= end:
                    continue
                if have_start > start:
                    missing.append((start, have_start))
                start = max(start, have_end)
            if start < end:
                missing.append((start, end))
        if missing:
            self.copy.fetch(coalesce(missing))
            self._have = coalesce([*self._have, *missing])


def read_weights(
    copy: PartialCopy, *, source: str, map_location: MapLocation = None, verify: bool = True
) -> ModelWeights:
    """Fetch into ``copy`` what the model and EMA need, check it, and return the weights (module docstring)."""
    device = usable_device(map_location, source) or torch.device("cpu")
    fetched = _Fetched(copy)
    path, size = copy.path, copy.size
    fetched.ensure([(max(0, size - TAIL), size)])
    directory = directory_start(path, size, source)
    fetched.ensure([(directory, size)])
    archive = Archive(path, source)  # its directory is read once, for every step below
    records = archive.records(directory)
    first = next((r for r in records if r.storage_key == "0"), None)
    metadata = [(r.header_offset, r.end) for r in records if r.storage_key is None]
    fetched.ensure([*metadata, *([header_range(first)] if first else [])])
    if first is not None:  # torch reads data/0's whole local header; it may be longer than usual
        fetched.ensure([(first.header_offset, data_offset(path, first, source))])

    archive.refuse_other_byte_order("its weights cannot be read without the optimizer state")
    payload = load_mapped(archive)  # reads the pickle and the headers fetched; no tensor bytes
    check_loaded(payload, archive)  # bounded by the pickle's size; reads no tensor bytes either
    version = check_header(payload, source)
    by_pointer = match_storages(_storages(payload, payload.keys()), records, source)
    needed = {by_pointer[s.data_ptr()] for s in _storages(payload, _FETCHED) if s.nbytes() > 0}
    del payload
    fetched.ensure((record.header_offset, record.end) for record in needed)

    # Opened before the mapping: both then read the same file even if rotation deletes its name meanwhile.
    with open_regular(path, source, buffering=0) as handle:
        payload = load_mapped(archive)  # the same pickle, now over the fetched bytes
        check_loaded(payload, archive)
        offsets = _checked_offsets(payload, records, path, source)
        # The weights are read from the file into memory of their own (never through the mapping, whose
        # pages would count next to the copy), and those copies are what is verified and returned.
        copies: dict[int, torch.UntypedStorage] = {}
        weights = {
            section: with_storages(
                payload[section], lambda s: _read_storage(cast(io.FileIO, handle), offsets, s, source), copies
            )
            for section in _VERIFIED
        }
    payload = {**payload, **weights}
    if verify:
        verify_sections(payload, source, _VERIFIED)
    return _to_weights(migrated(payload, version), source, device)


def _storages(payload: Mapping[str, Any], sections: Iterable[str]) -> list[torch.UntypedStorage]:
    return [tensor.untyped_storage() for section in sections for _, tensor in tensors_in(payload.get(section), section)]


def _checked_offsets(payload: Mapping[str, Any], records: list[Record], path: Path, source: str) -> dict[int, int]:
    """Where the data of every storage we fetched starts in the file, keyed by the mapped storage's
    ``data_ptr()``; each must lie exactly where its record's local header says."""
    by_pointer = match_storages(_storages(payload, payload.keys()), records, source)
    needed = sorted((s.data_ptr(), by_pointer[s.data_ptr()]) for s in _storages(payload, _FETCHED) if s.nbytes() > 0)
    if not needed:
        return {}
    # the mapping's base, from the first storage record: torch read its local header, we fetched it
    first = min(by_pointer)
    base = first - data_offset(path, by_pointer[first], source)
    for pointer, record in needed:
        if pointer - base != data_offset(path, record, source):
            raise CheckpointCorruptError(f"{source}: tensor data of {record.name} is not where its zip record says")
    return {pointer: pointer - base for pointer, _ in needed}


def _read_storage(
    handle: io.FileIO, offsets: Mapping[int, int], mapped: torch.UntypedStorage, source: str
) -> torch.UntypedStorage:
    """A new CPU storage holding the bytes of the memory-mapped storage ``mapped``, read from the file."""
    buffer = torch.empty(mapped.nbytes(), dtype=torch.uint8)
    if mapped.nbytes() == 0:
        return buffer.untyped_storage()
    view, done = memoryview((ctypes.c_char * mapped.nbytes()).from_address(buffer.data_ptr())).cast("B"), 0
    handle.seek(offsets[mapped.data_ptr()])
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            raise CheckpointCorruptError(f"{source} is truncated: a weight's bytes end {len(view) - done} bytes early")
        done += count
    return buffer.untyped_storage()


def _to_weights(payload: Mapping[str, Any], source: str, device: torch.device) -> ModelWeights:
    """The weights (already read off the file, on the CPU) as ``ModelWeights`` on ``device``."""
    meta = checked_meta(payload, source)
    model, ema = payload["model"], payload["ema"]
    if device.type != "cpu":
        copies: dict[int, torch.UntypedStorage] = {}
        model, ema = (on_device(state, device, copies) for state in (model, ema))
    try:
        return ModelWeights(model=model, ema=ema, shards=payload.get("shards"), **meta)
    except CheckpointSchemaError as exc:
        raise CheckpointSchemaError(f"{source}: {exc}") from None
