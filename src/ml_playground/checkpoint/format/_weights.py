"""Weights-only loads: a checkpoint's model (and EMA) without its optimizer state, fetching only their bytes.

Sampling and evaluation need the model; the optimizer state is about twice its size. From a remote
store (docs/performance.md, target 7) the load works on a sparse local copy of the object
(:class:`~ml_playground.checkpoint._store.PartialCopy`) and fetches, in this order:

1. the last 64 KiB (the zip's end records and, for a few hundred tensors, its whole directory), and
   the rest of the directory if it starts earlier;
2. the metadata records (the pickle ``data.pkl`` first of all);
3. after ``torch.load`` of that file under ``torch.serialization.skip_data`` (``_torch.load_unread``:
   the tree, with every storage allocated and none read), the records of the storages that ``model``,
   ``ema`` and ``integrity`` hold, coalesced into few ranges.

Our reader (``_reader``) then reads those storages from the file straight into their memory, hashing
them as they arrive, and those digests are checked; the other storages stay unread (their memory is
never touched, so the load's peak is the weights themselves) and are dropped. torch reads no storage
record under ``skip_data``, so the holes of the sparse copy are never read.
A local store's file is used in place (nothing to fetch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ml_playground.checkpoint._checkpoint import ModelWeights
from ml_playground.checkpoint._store import PartialCopy
from ml_playground.checkpoint.format._decode import (
    check_digests,
    check_header,
    checked_meta,
    checked_structure,
    migrated,
    usable_device,
)
from ml_playground.checkpoint.format._reader import opened, plan
from ml_playground.checkpoint.format._tensors import check_loaded
from ml_playground.checkpoint.format._torch import MapLocation, load_unread, on_device
from ml_playground.checkpoint.format._zip_layout import TAIL, Archive, coalesce, directory_start
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
    fetched.ensure((r.header_offset, r.end) for r in archive.records(directory) if r.storage_key is None)

    archive.refuse_other_byte_order("its weights cannot be read without the optimizer state")
    # Opened before torch reads the pickle: both then read the same file even if rotation deletes its name.
    with opened(archive) as data:
        assert data is not None  # a local file
        payload = load_unread(archive, "cpu")  # the pickle and the metadata records; no tensor bytes
        check_loaded(payload, archive)  # bounded by the pickle's size; reads no tensor bytes either
        version = check_header(payload, source)
        tensors = checked_structure(payload, source) if verify else []
        reads = plan(archive, payload, tensors, read=_FETCHED, hashed=_VERIFIED)
        if reads is None:
            raise CheckpointCorruptError(f"{source}: its tensors do not match its zip records")
        fetched.ensure(reads.ranges())
        digests = reads.read(data)  # the model/EMA storages, read into their own memory and hashed
    if verify:
        check_digests(payload, tensors, source, _VERIFIED, digests)
    return _to_weights(migrated(payload, version), source, device)


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
