"""Our torch.distributed.checkpoint StorageReader over any CheckpointStore, and a load planner that unpickles
nothing but plain data.

The manifest is read and validated before DCP starts (``read_metadata`` returns it and cannot fail: DCP logs a
traceback on the root logger when it does). Each rank reads exactly the items its load plan needs, every one
checked against its digest, possibly from parts other ranks wrote at another world size (resharding).
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint.sharded._index import ShardIndex
from ml_playground.checkpoint.sharded._parts_io import read_parts
from ml_playground.errors import CheckpointSchemaError

__all__ = ["SafeLoadPlanner", "StoreReader"]


class StoreReader(StorageReader):
    """Reads the items of the checkpoint whose manifest gave ``index``, verified, from ``store``."""

    def __init__(self, store: CheckpointStore, index: ShardIndex) -> None:
        super().__init__()
        self.store = store
        self.index = index
        self._items = index.items()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.index.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        requests = [(self._info(request), request) for request in plan.items]
        entries = self.index.metadata.state_dict_metadata
        with read_parts(self.store, [info for info, _ in requests]) as readers:
            cached: tuple[tuple[str, int], torch.Tensor] | None = None
            # one buffer for every chunk that is read whole and copied in pieces (resharding), grown to the
            # largest: fresh buffers of varying sizes, freed in turn, grew a rank's heap by several chunks
            scratch = torch.empty(0, dtype=torch.uint8)
            for info, request in sorted(requests, key=lambda pair: (pair[0]["part"], pair[0]["offset"])):
                reader = readers[info["part"]]
                if request.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(request, io.BytesIO(reader.read(info["offset"], info["length"], info["xxh3"])))
                    continue
                value = entries[request.storage_index.fqn]
                assert isinstance(value, TensorStorageMetadata)
                chunk = next(c for c in value.chunks if list(c.offsets) == list(request.storage_index.offset or []))
                target = planner.resolve_tensor(request).detach()
                if target.size() != torch.Size(request.lengths):
                    raise CheckpointSchemaError(
                        f"{self.store.url}: item {request.storage_index.fqn} does not fit this run's state "
                        f"({tuple(request.lengths)} saved, {tuple(target.size())} here)"
                    )
                if _whole(request, chunk.sizes) and _fillable(target, value.properties.dtype, info["length"]):
                    # the common case (a load at the world size it was saved at): read straight into the state
                    reader.read_into(info["offset"], _bytes_of(target), info["xxh3"])
                else:
                    where = (info["part"], info["offset"])
                    if cached is None or cached[0] != where:  # requests for one saved chunk share one read
                        cached = None
                        if scratch.numel() < info["length"]:
                            scratch = torch.empty(0, dtype=torch.uint8)  # freed before the larger one is allocated
                            scratch = torch.empty(info["length"], dtype=torch.uint8)
                        buffer = scratch[: info["length"]]
                        reader.read_into(info["offset"], _bytes_of(buffer), info["xxh3"])
                        cached = (where, _chunk(buffer, value.properties.dtype, chunk.sizes))
                    target.copy_(narrow_tensor_by_index(cached[1], request.storage_offsets, request.lengths))
                planner.commit_tensor(request, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _info(self, request: ReadItem) -> dict[str, Any]:
        offset = request.storage_index.offset
        info = self._items.get((request.storage_index.fqn, None if offset is None else tuple(offset)))
        if info is None:
            raise CheckpointSchemaError(f"{self.store.url}: no saved item {request.storage_index.fqn}")
        return info

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner unpickles bytes items with ``torch.load(weights_only=False)``: ours reads
    plain data only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as exc:
            raise CheckpointSchemaError(f"saved item {read_item.dest_index.fqn} is not plain data ({exc})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _whole(request: ReadItem, sizes: torch.Size) -> bool:
    """Whether ``request`` asks for the whole saved chunk."""
    return not any(request.storage_offsets) and list(request.lengths) == list(sizes)


def _fillable(target: torch.Tensor, dtype: torch.dtype, length: int) -> bool:
    """Whether the saved bytes can be read straight into ``target``'s memory."""
    return (
        target.device.type == "cpu"
        and target.dtype == dtype
        and target.is_contiguous()
        and target.numel() * target.element_size() == length
    )


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory, writable."""
    if not tensor.numel():
        return memoryview(bytearray())
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def _chunk(buffer: torch.Tensor, dtype: torch.dtype, sizes: torch.Size) -> torch.Tensor:
    if not buffer.numel():
        return torch.empty(sizes, dtype=dtype)
    return buffer.view(dtype).reshape(sizes)
