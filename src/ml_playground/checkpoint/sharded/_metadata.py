"""torch.distributed.checkpoint's ``Metadata`` as plain data, and back, validated: a manifest never holds pickles.

DCP's own writer pickles its ``Metadata`` into ``.metadata`` (and its reader unpickles it: code could run).
A sharded checkpoint's manifest keeps the same information as plain data (lists, tables, str, int, None:
dtypes, layouts and memory formats by name, from allowlists), held as one JSON text: a manifest describes
every chunk of every tensor, and one string costs the weights-only unpickler and the format's walks nothing,
where tens of thousands of small lists cost a reader (every rank of a load) a tenth of a second. Reading it
back checks every field: a manifest is input like any file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ml_playground.errors import CheckpointSchemaError

__all__ = ["ItemInfo", "from_json", "item_key", "to_json"]

_DTYPES = {
    str(dtype): dtype for dtype in (getattr(torch, name) for name in dir(torch)) if isinstance(dtype, torch.dtype)
}
_LAYOUTS = {"torch.strided": torch.strided}
_MEMORY_FORMATS = {"torch.contiguous_format": torch.contiguous_format, "torch.preserve_format": torch.preserve_format}
_ITEM_FIELDS = {"part": str, "offset": int, "length": int, "xxh3": str}

ItemInfo = dict[str, Any]
"""Where one saved item is: ``{"part": name, "offset": int, "length": int, "xxh3": hex}``."""


def item_key(index: MetadataIndex) -> tuple[str, tuple[int, ...] | None]:
    """What identifies a saved item (DCP compares MetadataIndex by fqn and offset only)."""
    return index.fqn, None if index.offset is None else tuple(index.offset)


def _to_plain(metadata: Metadata) -> dict[str, Any]:
    """``metadata`` (from DCP's default planner and our writer) as plain data."""
    entries: list[dict[str, Any]] = []
    for fqn, value in metadata.state_dict_metadata.items():
        if isinstance(value, BytesStorageMetadata):
            entries.append({"fqn": fqn, "kind": "bytes"})
            continue
        properties = value.properties
        entries.append(
            {
                "fqn": fqn,
                "kind": "tensor",
                "dtype": str(properties.dtype),
                "layout": str(properties.layout),
                "memory_format": str(properties.memory_format),
                "size": list(value.size),
                "chunks": [[list(chunk.offsets), list(chunk.sizes)] for chunk in value.chunks],
            }
        )
    planner = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
    storage = metadata.storage_data if isinstance(metadata.storage_data, Mapping) else {}
    return {
        "items": entries,
        "paths": [[key, list(path)] for key, path in planner.items()],
        "storage": [
            [[index.fqn, None if index.offset is None else list(index.offset)], dict(info)]
            for index, info in storage.items()
        ],
    }


def to_json(metadata: Metadata) -> str:
    """``metadata`` as the JSON text of its plain data (what a manifest keeps)."""
    return json.dumps(_to_plain(metadata), separators=(",", ":"), allow_nan=False)


def from_json(text: object, where: str) -> Metadata:
    """The ``Metadata`` that ``to_json`` gave ``text``; anything malformed is a CheckpointSchemaError naming
    ``where``."""
    _expect(isinstance(text, str), where, f"its DCP metadata is a {type(text).__name__}, not JSON text")
    assert isinstance(text, str)
    try:
        plain = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, an over-long integer, or nesting too deep
        raise CheckpointSchemaError(
            f"{where} is not a sharded checkpoint's valid manifest: its DCP metadata is not JSON ({error})"[:400]
        ) from None
    return _from_plain(plain, where)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a value a manifest holds")


def _from_plain(plain: object, where: str) -> Metadata:
    """The ``Metadata`` that ``_to_plain`` gave ``plain``; anything malformed is a CheckpointSchemaError naming
    ``where``."""
    _expect(isinstance(plain, Mapping) and {"items", "paths", "storage"} <= set(plain), where, "no DCP metadata")
    assert isinstance(plain, Mapping)
    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for entry in _list(plain["items"], where, "items"):
        _expect(isinstance(entry, Mapping), where, "an item is not a table")
        fqn = entry.get("fqn")
        _expect(isinstance(fqn, str) and fqn not in entries, where, f"item {fqn!r} is missing or repeated")
        assert isinstance(fqn, str)
        if entry.get("kind") == "bytes":
            entries[fqn] = BytesStorageMetadata()
            continue
        _expect(entry.get("kind") == "tensor", where, f"item {fqn} is of no known kind")
        names = (entry.get("dtype"), entry.get("layout"), entry.get("memory_format"))
        known = names[0] in _DTYPES and names[1] in _LAYOUTS and names[2] in _MEMORY_FORMATS
        _expect(known, where, f"item {fqn} has an unknown dtype, layout or memory format {names}")
        size = _sizes(entry.get("size"), where, fqn)
        chunks = []
        for chunk in _list(entry.get("chunks"), where, fqn):
            _expect(isinstance(chunk, list) and len(chunk) == 2, where, f"a chunk of {fqn}")
            offsets, sizes = _sizes(chunk[0], where, fqn), _sizes(chunk[1], where, fqn)
            inside = len(offsets) == len(sizes) == len(size) and all(
                o + s <= n for o, s, n in zip(offsets, sizes, size, strict=True)
            )
            _expect(inside, where, f"a chunk of {fqn} lies outside its size {list(size)}")
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
        properties = TensorProperties(
            dtype=_DTYPES[str(names[0])], layout=_LAYOUTS[str(names[1])], memory_format=_MEMORY_FORMATS[str(names[2])]
        )
        entries[fqn] = TensorStorageMetadata(properties=properties, size=size, chunks=chunks)
    paths: dict[str, tuple[str | int, ...]] = {}
    for pair in _list(plain["paths"], where, "paths"):
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], list)
        _expect(ok and all(type(step) in (str, int) for step in pair[1]), where, f"the path of {pair!r}")
        paths[pair[0]] = tuple(pair[1])
    _expect(set(paths) == set(entries), where, "the items and their paths disagree")
    storage: dict[MetadataIndex, ItemInfo] = {}
    for pair in _list(plain["storage"], where, "storage"):
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], list) and len(pair[0]) == 2
        _expect(ok and isinstance(pair[0][0], str) and pair[0][0] in entries, where, f"a storage entry {pair!r}")
        offset = None if pair[0][1] is None else _sizes(pair[0][1], where, pair[0][0])
        storage[MetadataIndex(pair[0][0], offset)] = _item_info(pair[1], where, pair[0][0])
    return Metadata(state_dict_metadata=entries, planner_data=paths, storage_data=storage)


def _item_info(info: object, where: str, fqn: str) -> ItemInfo:
    _expect(isinstance(info, Mapping) and set(info) == set(_ITEM_FIELDS), where, f"where {fqn} is stored")
    assert isinstance(info, Mapping)
    for key, kind in _ITEM_FIELDS.items():
        value = info[key]
        _expect(isinstance(value, kind) and not isinstance(value, bool), where, f"{fqn}: {key} = {value!r}")
    _expect(info["offset"] >= 0 and info["length"] >= 0 and len(info["xxh3"]) == 16, where, f"where {fqn} is stored")
    return dict(info)


def _list(value: object, where: str, what: str) -> list[Any]:
    _expect(isinstance(value, list), where, f"{what} is not a list")
    assert isinstance(value, list)
    return value


def _sizes(value: object, where: str, fqn: str) -> torch.Size:
    ok = isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)
    _expect(ok, where, f"{fqn}: {value!r} is not a list of sizes")
    assert isinstance(value, list)
    return torch.Size(value)


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise CheckpointSchemaError(f"{where} is not a sharded checkpoint's valid manifest: {what}")
