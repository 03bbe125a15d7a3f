"""A sharded checkpoint's manifest, read: its DCP metadata, its parts and their sizes, where each item is."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ml_playground.checkpoint._parts import PART_KINDS, PartName
from ml_playground.checkpoint.sharded._metadata import ItemInfo, from_json
from ml_playground.errors import CheckpointError, CheckpointNameError, CheckpointSchemaError

__all__ = ["STRATEGY", "ShardIndex"]

STRATEGY = "fsdp"


@dataclass(frozen=True)
class ShardIndex:
    """What a manifest says about its shards."""

    metadata: Metadata
    parts: dict[str, int]
    """Every part object's name and size in bytes."""
    sections: tuple[str, ...]
    """The state's top-level sections saved: ``model`` and ``optim``, ``ema`` when the run keeps one."""
    world_size: int

    @classmethod
    def of(cls, shards: Mapping[str, Any] | None, filename: str, source: str) -> ShardIndex:
        """The index of manifest ``filename``'s ``shards`` record (``source`` names it in errors), checked: the
        strategy, the byte order, every part's name and size, every item inside its part, every tensor tiled."""
        if not isinstance(shards, Mapping):
            raise CheckpointSchemaError(f"{source} is a single-file checkpoint, not a sharded one")
        if shards.get("strategy") != STRATEGY:
            raise CheckpointSchemaError(f"{source}: its manifest's strategy is {str(shards.get('strategy'))[:40]!r}")
        if shards.get("byteorder") != sys.byteorder:
            raise CheckpointError(
                f"{source} was written on a {str(shards.get('byteorder'))[:20]}-endian machine and this one is "
                f"{sys.byteorder}-endian: its shards cannot be read here"
            )
        parts = shards.get("parts")
        sections = shards.get("sections")
        if not isinstance(parts, Mapping) or not isinstance(sections, list) or not parts:
            raise CheckpointSchemaError(f"{source}: its manifest lists no parts or sections")
        world = _check_parts(parts, filename, source)
        metadata = from_json(shards.get("dcp"), source)
        paths = metadata.planner_data
        assert isinstance(paths, dict)
        saved = sorted({str(path[0]) for path in paths.values()})
        if sorted(map(str, sections)) != saved or not {"model", "optim"} <= set(saved) <= {"model", "ema", "optim"}:
            raise CheckpointSchemaError(f"{source}: its manifest's sections {sections!r} are not what it holds")
        index = cls(metadata, {str(k): int(v) for k, v in parts.items()}, tuple(saved), world)
        index._check(source)
        return index

    def holds(self, *prefix: str) -> bool:
        """Whether any saved item lies under ``prefix`` (e.g. ``"optim", "state"``: the optimizer had stepped)."""
        paths = self.metadata.planner_data
        assert isinstance(paths, dict)
        return any(tuple(path[: len(prefix)]) == prefix for path in paths.values())

    def items(self) -> dict[tuple[str, tuple[int, ...] | None], ItemInfo]:
        storage = self.metadata.storage_data
        assert isinstance(storage, dict)
        return {
            (index.fqn, None if index.offset is None else tuple(index.offset)): info for index, info in storage.items()
        }

    def _check(self, source: str) -> None:
        """Every item lies inside its part, and every tensor's chunks tile it exactly."""
        items = self.items()
        for (fqn, _), item in items.items():
            size = self.parts.get(item["part"])
            if size is None or item["offset"] + item["length"] > size:
                raise CheckpointSchemaError(f"{source}: item {fqn} lies outside its part {item['part']}")
        for fqn, value in self.metadata.state_dict_metadata.items():
            if not isinstance(value, TensorStorageMetadata):
                if (fqn, None) not in items:
                    raise CheckpointSchemaError(f"{source}: item {fqn} has no saved bytes")
                continue
            _check_tiling(fqn, value, self.world_size, source)
            itemsize = torch.empty((), dtype=value.properties.dtype).element_size()
            for chunk in value.chunks:
                info = items.get((fqn, tuple(chunk.offsets)))
                if info is None or info["length"] != math.prod(chunk.sizes) * itemsize:
                    raise CheckpointSchemaError(f"{source}: a chunk of {fqn} has no saved bytes of its size")


def _check_parts(parts: Mapping[Any, Any], filename: str, source: str) -> int:
    """The world size of a complete set of parts of ``filename`` (every rank's model and optim part)."""
    names = []
    for name, size in parts.items():
        try:
            part = PartName.parse(str(name))
        except CheckpointNameError:
            part = None
        valid_size = isinstance(size, int) and not isinstance(size, bool) and size >= 0
        if part is None or part.checkpoint.filename != filename or not valid_size:
            raise CheckpointSchemaError(f"{source}: its manifest lists {str(name)[:80]!r}, not a part of it")
        names.append(part)
    world = names[0].world_size
    if {(p.rank, p.kind, p.world_size) for p in names} != {(r, k, world) for r in range(world) for k in PART_KINDS}:
        raise CheckpointSchemaError(f"{source}: its manifest's parts are not one set of {world} ranks'")
    return world


def _check_tiling(fqn: str, value: TensorStorageMetadata, world: int, source: str) -> None:
    """The chunks lie inside the tensor and cover it exactly, without overlapping (at most one per rank)."""
    size = tuple(value.size)
    boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in value.chunks]
    inside = all(
        len(offsets) == len(sizes) == len(size)
        and all(o >= 0 and n >= 0 and o + n <= d for o, n, d in zip(offsets, sizes, size, strict=True))
        for offsets, sizes in boxes
    )
    nonempty = [box for box in boxes if math.prod(box[1])]
    overlapping = inside and any(
        all(a0 < b0 + bn and b0 < a0 + an for a0, an, b0, bn in zip(*a, *b, strict=True))
        for i, a in enumerate(nonempty)
        for b in nonempty[i + 1 :]
    )
    covered = sum(math.prod(sizes) for _, sizes in nonempty)
    if len(boxes) > world or not inside or overlapping or covered != math.prod(size):
        raise CheckpointSchemaError(f"{source}: the saved chunks of {fqn} do not cover it exactly")
