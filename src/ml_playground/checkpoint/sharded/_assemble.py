"""A sharded checkpoint read in one process, without torch.distributed: every byte verified as it is read.

``sample``, ``eval``, ``ckpt show/verify/export/consolidate`` read sharded checkpoints this way: the manifest,
then only the items asked for (ranged reads inside the parts), each checked against its digest, copied into
full tensors, and unflattened along the paths DCP recorded. The optimizer state comes back in torch's own
form (parameters numbered in the order of its groups), as a single process's ``optimizer.state_dict()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ml_playground.checkpoint._checkpoint import Checkpoint, ModelWeights
from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint._tree import map_tensors
from ml_playground.checkpoint.format import MapLocation, usable_device
from ml_playground.checkpoint.sharded._index import ShardIndex
from ml_playground.checkpoint.sharded._parts_io import read_parts
from ml_playground.errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointSchemaError

__all__ = ["assemble", "assembled", "assembled_weights", "verify_parts"]


def assembled(store: CheckpointStore, manifest: Checkpoint, filename: str, map_location: MapLocation) -> Checkpoint:
    """The checkpoint whose ``manifest`` (read from ``filename``) was given, with all of its tensors."""
    source = f"{store.url}/{filename}"
    index = ShardIndex.of(manifest.shards, filename, source)
    with _incomplete(store, filename):
        state = _on(assemble(store, index, index.sections, source), map_location, source)
    return dataclasses.replace(
        manifest,
        model=state["model"],
        ema=state.get("ema"),
        optimizer=torch_optimizer_state(state["optim"], source),
        shards=None,
    )


def assembled_weights(
    store: CheckpointStore, weights: ModelWeights, filename: str, map_location: MapLocation
) -> ModelWeights:
    """The model and EMA weights of a sharded checkpoint: only their items are read."""
    source = f"{store.url}/{filename}"
    index = ShardIndex.of(weights.shards, filename, source)
    wanted = [section for section in index.sections if section != "optim"]
    with _incomplete(store, filename):
        state = _on(assemble(store, index, wanted, source), map_location, source)
    return dataclasses.replace(weights, model=state["model"], ema=state.get("ema"), shards=None)


def verify_parts(store: CheckpointStore, shards: Mapping[str, Any], filename: str) -> None:
    """Every part has its recorded size and every item its recorded digest; damage raises, naming the part."""
    source = f"{store.url}/{filename}"
    index = ShardIndex.of(shards, filename, source)
    listed = {obj.name: obj.size for obj in store.list()}
    for part, size in index.parts.items():
        if part not in listed:
            raise CheckpointCorruptError(f"{source} is incomplete: its part {store.url}/{part} is missing")
        if listed[part] != size:
            raise CheckpointCorruptError(
                f"{store.url}/{part} has {listed[part]} bytes, not the {size} its manifest {source} records"
            )
    entries = index.metadata.state_dict_metadata
    items = sorted(index.items().items(), key=lambda item: (item[1]["part"], item[1]["offset"]))
    with read_parts(store, [info for _, info in items]) as readers:  # one item in memory at a time
        for (fqn, _), info in items:
            data = readers[info["part"]].read(info["offset"], info["length"], info["xxh3"])
            if not isinstance(entries[fqn], TensorStorageMetadata):
                _plain_object(data, f"{store.url}/{info['part']}", fqn)


def assemble(store: CheckpointStore, index: ShardIndex, sections: Collection[str], source: str) -> dict[str, Any]:
    """The full (unsharded) state of ``sections`` as nested plain data, on the CPU."""
    entries = index.metadata.state_dict_metadata
    paths = index.metadata.planner_data
    assert isinstance(paths, dict)
    items = {key: info for key, info in index.items().items() if paths[key[0]][0] in sections}
    values: dict[str, Any] = {
        fqn: torch.empty(value.size, dtype=value.properties.dtype)
        for fqn, value in entries.items()
        if isinstance(value, TensorStorageMetadata) and paths[fqn][0] in sections
    }
    with read_parts(store, items.values()) as readers:
        for (fqn, offsets), info in sorted(items.items(), key=lambda item: (item[1]["part"], item[1]["offset"])):
            data = readers[info["part"]].read(info["offset"], info["length"], info["xxh3"])
            value = entries[fqn]
            if not isinstance(value, TensorStorageMetadata):
                values[fqn] = _plain_object(data, f"{store.url}/{info['part']}", fqn)
                continue
            chunk = next(c for c in value.chunks if tuple(c.offsets) == offsets)
            if not math.prod(chunk.sizes):
                continue
            target = values[fqn]
            for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                target = target.narrow(dim, start, length)
            target.copy_(torch.frombuffer(data, dtype=value.properties.dtype).reshape(target.shape))
    nested: dict[str, Any] = {}
    for fqn, value in values.items():
        _place(nested, paths[fqn], value, len(paths), source)
    return nested


@contextlib.contextmanager
def _incomplete(store: CheckpointStore, filename: str) -> Iterator[None]:
    """A part missing while its manifest is there: the checkpoint is damaged. With the manifest gone too, it
    was rotated away while it was read (CheckpointNotFoundError, which a reader of a chosen one survives)."""
    try:
        yield
    except CheckpointNotFoundError as exc:
        if any(obj.name == filename for obj in store.list()):
            raise CheckpointCorruptError(f"{store.url}/{filename} is incomplete: {exc}") from None
        raise


def torch_optimizer_state(saved: object, source: str) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's form) in torch's own
    form: parameters numbered in the order of their groups, as ``optimizer.state_dict()`` numbers them."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    state = saved.get("state", {}) if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise CheckpointSchemaError(f"{source}: its optimizer state has no param_groups")
    ids: dict[str, int] = {}
    numbered = []
    for group in groups:
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, list) or not all(isinstance(p, str) and p not in ids for p in params):
            raise CheckpointSchemaError(f"{source}: an optimizer group's parameters are not distinct names")
        numbered.append({**group, "params": [ids.setdefault(p, len(ids)) for p in params]})
    unknown = [name for name in state if name not in ids]
    if unknown:
        raise CheckpointSchemaError(f"{source}: the optimizer state of {unknown[0]!r} belongs to no group")
    return {"state": {ids[name]: value for name, value in state.items()}, "param_groups": numbered}


def _on(state: dict[str, Any], map_location: MapLocation, source: str) -> dict[str, Any]:
    device = usable_device(map_location, source)
    if device is None or device.type == "cpu":
        return state
    moved: dict[str, Any] = map_tensors(state, lambda tensor, _: tensor.to(device))
    return moved


def _plain_object(data: bytes | bytearray, where: str, fqn: str) -> Any:
    """An item DCP saved as bytes (``torch.save`` of plain data, e.g. an optimizer's learning rate)."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise CheckpointSchemaError(f"{where}: item {fqn} is not plain data ({type(exc).__name__})") from None


def _place(tree: dict[str, Any], path: tuple[str | int, ...], value: Any, count: int, source: str) -> None:
    """Put ``value`` at ``path`` (str keys: dicts, int keys: lists of at most ``count`` items) under ``tree``."""
    node: Any = tree
    step: Any
    for depth, step in enumerate(path):
        misplaced = not isinstance(node, dict | list) or isinstance(step, int) != isinstance(node, list)
        if misplaced or (isinstance(step, int) and not 0 <= step < count):
            raise CheckpointSchemaError(f"{source}: its saved paths do not form one state ({path!r})")
        if isinstance(node, list):
            node.extend([None] * (step + 1 - len(node)))
        present = node[step] if isinstance(node, list) else node.get(step)
        if depth == len(path) - 1:
            if present is not None:
                raise CheckpointSchemaError(f"{source}: two saved items have the path {path!r}")
            node[step] = value
        else:
            if present is None:
                present = node[step] = [] if isinstance(path[depth + 1], int) else {}
            node = present
