"""Our torch.distributed.checkpoint StorageWriter over any CheckpointStore: parts first, the manifest last.

Every rank writes its items into two flat objects beside the checkpoint's name, each with the store's atomic
write: ``<name>.part-<rank>-of-<world>.model`` (model and EMA) and ``.optim`` (optimizer state). A tensor item
is its raw contiguous bytes (no per-item archive), a bytes item the planner's ``torch.save`` of plain data; each
item's range gets an xxh3 digest of exactly the bytes written. DCP gathers every rank's results on the
coordinator, whose ``finish`` writes the manifest (our typed format: the iteration, metric, config, every rank's
generator states, the DCP metadata as JSON text with those digests) with the same atomic, never-replacing
write. The checkpoint exists if and only if its manifest does.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ml_playground.checkpoint._checkpoint import Checkpoint
from ml_playground.checkpoint._parts import PART_KINDS, PartKind, part_filename
from ml_playground.checkpoint._stop_seam import reached
from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint.format import encode
from ml_playground.checkpoint.sharded._index import STRATEGY
from ml_playground.checkpoint.sharded._metadata import to_json

__all__ = ["ManifestFactory", "StoreWriter"]

ManifestFactory = Callable[[dict[str, Any]], Checkpoint]
"""Given the shards record (strategy, byte order, parts, DCP metadata), the manifest to commit."""


class StoreWriter(StorageWriter):
    """One sharded save of checkpoint ``name`` into ``store``; ``manifest`` is the coordinator's (rank 0's)."""

    def __init__(self, store: CheckpointStore, name: str, manifest: ManifestFactory | None) -> None:
        super().__init__()
        self.store = store
        self.name = name
        self._manifest = manifest
        self.written: list[str] = []
        """The parts this rank committed (a failed save deletes them)."""
        self.committed: tuple[str, ...] = ()
        """On the coordinator, once the manifest is committed: every part of the checkpoint."""

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.written, self.committed = [], ()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise ValueError("sharded saves need DCP's collectives (use_collectives=True)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        world = len(plans)
        return [
            dataclasses.replace(plan, storage_data={"rank": rank, "world": world}) for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank, world = plan.storage_data["rank"], plan.storage_data["world"]
        by_kind: dict[PartKind, list[WriteItem]] = {kind: [] for kind in PART_KINDS}
        for item in plan.items:
            by_kind["optim" if item.index.fqn.startswith("optim.") else "model"].append(item)
        results: list[WriteResult] = []
        for kind in PART_KINDS:  # both parts on every rank, even empty: the set of parts is always complete
            part = part_filename(self.name, rank, world, kind)
            with self.store.write(part) as stream:
                offset = 0
                for item in by_kind[kind]:
                    data = _item_bytes(item, planner.resolve_data(item))
                    stream.write(data)
                    info = {
                        "part": part,
                        "offset": offset,
                        "length": data.nbytes,
                        "xxh3": xxhash.xxh3_64_hexdigest(data),
                    }
                    results.append(WriteResult(index=item.index, size_in_bytes=data.nbytes, storage_data=info))
                    offset += data.nbytes
                if kind == "optim":
                    reached("parts")  # a test seam (a no-op unless a fault test asks): the .model part committed
            self.written.append(part)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self._manifest is not None, "finish runs on the coordinator, which has the manifest"
        infos = [result.storage_data for rank_results in results for result in rank_results]
        metadata.storage_data = {
            result.index: result.storage_data for rank_results in results for result in rank_results
        }
        world = len(results)
        parts = {part_filename(self.name, rank, world, kind): 0 for rank in range(world) for kind in PART_KINDS}
        for info in infos:
            parts[info["part"]] = max(parts[info["part"]], info["offset"] + info["length"])
        paths = metadata.planner_data
        assert isinstance(paths, dict)
        record = {
            "strategy": STRATEGY,
            "byteorder": sys.byteorder,
            "sections": sorted({str(path[0]) for path in paths.values()}),
            "parts": parts,
            "dcp": to_json(metadata),
        }
        manifest = self._manifest(record)
        destination = f"{self.store.url}/{self.name}"
        reached("gathered")  # test seams: every rank's parts committed, then the manifest written, not committed
        with self.store.write(self.name) as stream:
            encode(manifest, stream, destination=destination)
            reached("manifest")
        self.committed = tuple(sorted(parts))

    def storage_meta(self) -> StorageMeta | None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen by DCP itself: callers pass it


def _item_bytes(item: WriteItem, data: Any) -> memoryview:
    """What is written for an item: a tensor's raw contiguous bytes (a shard's, for a DTensor), or the
    planner's bytes of a plain object."""
    if item.type == WriteItemType.BYTE_IO:
        return memoryview(data.getbuffer()).cast("B")
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    # numpy's view keeps the (possibly copied) contiguous tensor alive as long as the memoryview is
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
