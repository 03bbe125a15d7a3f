"""Bytes -> Checkpoint: a weights-only load, the header and integrity checks, migrations, the typed value.

A verified load reads the tensors' bytes with our reader (``_reader``: each storage straight into its
own memory, hashed as it arrives), from a local path or a seekable stream. Where that reader does not
apply, and for ``verify=False`` loads, ``torch.load``'s own reader reads a local path (or memory-maps it
when the caller asks) or the stream. Verification checks every tensor's xxh3 digest and the structure
digest; ``torch.load`` itself detects no flipped byte in tensor data.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from ml_playground.checkpoint._checkpoint import Checkpoint
from ml_playground.checkpoint._tree import check_plain_tree
from ml_playground.checkpoint.format import _digests
from ml_playground.checkpoint.format._migrations import MIGRATIONS, TENSOR_SECTIONS
from ml_playground.checkpoint.format._reader import opened, plan
from ml_playground.checkpoint.format._tensors import check_loaded
from ml_playground.checkpoint.format._torch import MapLocation, first_line, load, load_unread, on_device
from ml_playground.checkpoint.format._version import FORMAT_MAGIC, FORMAT_VERSION
from ml_playground.checkpoint.format._zip_layout import Archive
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointSchemaError,
    CheckpointVersionError,
    UnsafeCheckpointError,
)

__all__ = [
    "Source",
    "check_digests",
    "check_header",
    "checked_meta",
    "checked_structure",
    "decode",
    "migrated",
    "usable_device",
    "verify",
    "verify_sections",
]

Payload = dict[str, Any]
Source = IO[bytes] | Path
"""What ``decode``/``verify`` read: an open binary stream, or the path of a local file."""

_META_FIELDS = ("iter_num", "best_val_loss", "model_args", "config", "data_state", "world_size")


def decode(
    data: Source,
    *,
    source: str,
    map_location: MapLocation = None,
    verify: bool = True,
    mmap: bool = False,
) -> Checkpoint:
    """Read, check and return the checkpoint in ``data``; ``source`` names it in every error.

    ``verify=False`` skips the checksums (DESIGN.md, Integrity: only when the caller asks; run
    :func:`verify` later). ``mmap=True`` needs a local ``Path``: tensors are then backed by the file's
    pages (copy-on-write), so the call returns before the tensor bytes are read.
    """
    if mmap and not isinstance(data, Path):
        raise CheckpointError(f"mmap loading needs a local file path; {source} is a stream")
    # Verification reads the bytes as loaded: a payload bound for another device (or "meta", which has
    # no bytes) is verified on the CPU first, then moved.
    device = usable_device(map_location, source)
    elsewhere = verify and device is not None and device.type != "cpu"
    archive = Archive(data, source)
    location = "cpu" if elsewhere else map_location
    read = _read_verified(archive, location) if verify and not mmap else None
    if read is not None:
        payload, version = read
    else:
        payload = load(archive, location, mmap)
        # bounded by the pickle's size, before any other walk or any read of a tensor's bytes
        check_loaded(payload, archive, meta_ok=device is not None and device.type == "meta" and not elsewhere)
        version = check_header(payload, source)
        if verify:
            try:
                verify_sections(payload, source)
            except CheckpointCorruptError:
                archive.refuse_other_byte_order("its checksums cannot be checked here")
                raise
    if elsewhere and device is not None:
        payload = on_device(payload, device)
    return _to_checkpoint(migrated(payload, version), source)


def _read_verified(archive: Archive, map_location: MapLocation) -> tuple[Payload, int] | None:
    """The payload and its format version, its tensors read by our reader and verified as they arrive; None
    where that reader does not apply (a file of the other byte order, storages not on the CPU, a layout
    ``torch.save`` does not write, a stream that cannot seek): ``torch.load`` then reads the file."""
    source = archive.source
    with opened(archive) as data:
        if data is None:
            return None
        payload = load_unread(archive, map_location)
        # bounded by the pickle's size, before any other walk; every tensor lies inside its storage, and no
        # storage claims more bytes than the file holds (their memory is allocated, not yet touched)
        check_loaded(payload, archive)
        version = check_header(payload, source)
        if not archive.native_byte_order():
            return None
        tensors = checked_structure(payload, source)
        reads = plan(archive, payload, tensors, read=None, hashed=TENSOR_SECTIONS)
        if reads is None:
            return None
        digests = reads.read(data)
    check_digests(payload, tensors, source, TENSOR_SECTIONS, digests)
    return payload, version


def usable_device(map_location: MapLocation, source: str) -> torch.device | None:
    """``map_location`` as a device this process can allocate on, checked before the file is decoded: an
    unavailable one (``"cuda"`` on a CPU-only build) would otherwise fail mid-load like a damaged file."""
    if map_location is None:
        return None
    try:
        device = torch.device(map_location)
        torch.empty(0, device=device)
    except Exception as exc:  # unknown or unavailable devices fail in many ways (AssertionError on CPU builds)
        raise CheckpointError(
            f"cannot load {source} onto {str(map_location)!r}: {first_line(exc)}; pass a device this machine has"
        ) from None
    return device


def verify(data: Source, *, source: str) -> Mapping[str, Any] | None:
    """Check the checksums of the checkpoint in ``data`` without keeping it; raises if it is damaged.

    A local path is memory-mapped, so verifying costs one read of the file and no copy of it. Returns the
    ``shards`` record of a sharded checkpoint's manifest (whose parts the caller checks), else None.
    """
    archive = Archive(data, source)
    payload = load(archive, None, isinstance(data, Path))
    check_loaded(payload, archive)
    check_header(payload, source)
    verify_sections(payload, source)
    shards = payload.get("shards")
    return shards if isinstance(shards, Mapping) else None


def check_header(payload: Any, source: str) -> int:
    """The payload's format version, after checking its marker, its version and its top-level fields."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_MAGIC:
        raise CheckpointSchemaError(f"{source} is not an ml_playground checkpoint (no format marker)")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointSchemaError(f"{source} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{source} was written in format version {version}; this ml_playground reads up to "
            f"{FORMAT_VERSION}. Upgrade ml_playground to load it."
        )
    missing = {"meta", "integrity", *TENSOR_SECTIONS} - payload.keys()
    if missing:
        raise CheckpointSchemaError(f"{source} lacks the field(s) {', '.join(sorted(missing))}")
    return version


def migrated(payload: Payload, version: int) -> Payload:
    """``payload`` (of format ``version``) carried forward to the current version."""
    while version < FORMAT_VERSION:
        payload = MIGRATIONS[version](payload)
        version += 1
    return payload


def verify_sections(payload: Payload, source: str, sections: Collection[str] = TENSOR_SECTIONS) -> None:
    """Check ``payload``'s structure digest and the digests of the tensors in ``sections``; raise if damaged.

    A payload loaded with ``mmap=True`` is read only where it is hashed, so checking a subset reads only
    that subset's bytes (an evaluation checks the model and EMA weights, never the optimizer's).
    """
    check_digests(payload, checked_structure(payload, source), source, sections)


def checked_structure(payload: Payload, source: str) -> list[tuple[str, str, torch.Tensor]]:
    """The payload body's tensors in walk order (``_digests.tensors``), once the integrity record's algorithm,
    the plain-data check and the structure digest have passed. Reads no tensor bytes."""
    stored = payload["integrity"]
    if not isinstance(stored, dict) or stored.get("algorithm") != _digests.ALGORITHM:
        raise CheckpointCorruptError(f"{source} has no readable integrity record")
    body = {key: value for key, value in payload.items() if key != "integrity"}
    try:
        check_plain_tree("checkpoint", body, tensors_allowed=True)
    except CheckpointSchemaError as exc:
        raise UnsafeCheckpointError(f"{source}: {exc}") from None
    if stored.get("structure") != _digests.structure_record(body)["structure"]:
        raise CheckpointCorruptError(
            f"{source} is damaged: its metadata does not match its checksum. Delete it, or restore it from a copy."
        )
    return list(_digests.tensors(body))


def check_digests(
    payload: Payload,
    tensors: Sequence[tuple[str, str, torch.Tensor]],
    source: str,
    sections: Collection[str] = TENSOR_SECTIONS,
    computed: Sequence[bytes | None] = (),
) -> None:
    """Compare the digests of the ``tensors`` (from :func:`checked_structure`) in ``sections`` with the integrity
    record's; ``computed[i]``, where not None, is tensor ``i``'s digest already computed (by ``_reader``)."""
    expected = _digests.stored_digests(payload["integrity"].get("tensors"), payload["format_version"])
    if expected is None or len(expected) != len(tensors):
        raise CheckpointCorruptError(f"{source} is damaged: its tensor checksums are incomplete")
    for index, ((section, path, tensor), want) in enumerate(zip(tensors, expected, strict=True)):
        if section not in sections:
            continue
        got = computed[index] if index < len(computed) else None
        if (got if got is not None else _digests.tensor_digest(tensor)) != want:
            raise CheckpointCorruptError(
                f"{source} is damaged: the bytes of tensor {path} do not match their checksum. "
                "Delete it, or restore it from a copy."
            )


def checked_meta(payload: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The fields of the payload's ``meta`` table (``Checkpoint``/``ModelWeights`` keyword arguments)."""
    meta = payload["meta"]
    if not isinstance(meta, dict):
        raise CheckpointSchemaError(f"{source}: meta must be a table, got {type(meta).__name__}")
    missing = set(_META_FIELDS) - meta.keys()
    if missing:
        raise CheckpointSchemaError(f"{source} lacks the field(s) {', '.join(sorted('meta.' + m for m in missing))}")
    return {key: meta[key] for key in _META_FIELDS}


def _to_checkpoint(payload: Payload, source: str) -> Checkpoint:
    meta = checked_meta(payload, source)
    try:
        return Checkpoint(
            model=payload["model"],
            optimizer=payload["optimizer"],
            ema=payload["ema"],
            rng_state=payload["rng_state"],
            shards=payload.get("shards"),
            **meta,
        )
    except CheckpointSchemaError as exc:
        raise CheckpointSchemaError(f"{source}: {exc}") from None
