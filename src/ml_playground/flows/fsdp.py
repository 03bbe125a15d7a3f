"""Training with FSDP2 (``train.runtime.distributed.strategy = "fsdp"``): the sharded state and its checkpoints.

Every block and then the whole model is ``fully_shard``-ed over a device mesh of the run's ranks; the optimizer
and the EMA weights are built over the sharded parameters, so each rank holds its shard of all three. A
checkpoint is written by every rank at once through ``ml_playground.checkpoint.sharded`` (torch.distributed.
checkpoint with our store writer): rank 0 decides the name (the manager's checks), every rank writes its parts,
rank 0 commits the manifest and rotates, and every rank learns the outcome (docs/distributed.md, "Sharded
checkpoints"). An asynchronous save runs on a process group of its own; its outcome (and rotation) is settled
at the next save point and at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ml_playground.checkpoint import Checkpoint, CheckpointKind, CheckpointManager, CheckpointName, sharded
from ml_playground.config import TrainConfig
from ml_playground.flows.distributed import Ranks
from ml_playground.flows.resume import fitting
from ml_playground.flows.train_state import TrainState, make_optimizer

__all__ = ["ShardedSaver", "load_sharded", "shard"]


def shard(state: TrainState, tc: TrainConfig, ranks: Ranks) -> None:
    """Shard ``state``'s model (each block, then the whole), and rebuild its optimizer and EMA over the shards.

    Call it before the optimizer has stepped (a fresh state, or one about to be loaded by :func:`load_sharded`).
    """
    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    for block in state.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(state.model, mesh=mesh)
    state.trainable = state.model
    state.optimizer = make_optimizer(state.model, tc)
    if state.ema is not None:
        state.ema = {key: value.detach().clone() for key, value in state.model.state_dict().items()}


def load_sharded(state: TrainState, manager: CheckpointManager, filename: str, manifest: Checkpoint) -> None:
    """Fill the sharded ``state`` from checkpoint ``filename`` (every rank; any world size it was saved at)."""
    source = f"{manager.store.url}/{filename}"
    index = sharded.ShardIndex.of(manifest.shards, filename, source)
    model, optimizer = state.model, state.optimizer
    targets: dict[str, Any] = {"model": get_model_state_dict(model)}
    if state.ema is not None:
        targets["ema"] = state.ema
    stepped = index.holds("optim", "state")  # a checkpoint written before the first step holds no moments
    if stepped:
        targets["optim"] = get_optimizer_state_dict(model, optimizer)
    sharded.load_into(manager.store, filename, index, targets)
    fitting(source, "model state", lambda: set_model_state_dict(model, targets["model"]))
    if stepped:
        fitting(source, "optimizer state", lambda: set_optimizer_state_dict(model, optimizer, targets["optim"]))


def checkpoint_state(state: TrainState) -> dict[str, Any]:
    """What every rank saves: its shards of the model, the optimizer state and the EMA weights."""
    saved: dict[str, Any] = {"model": get_model_state_dict(state.model), "optim": _optimizer_state(state)}
    if state.ema is not None:
        saved["ema"] = dict(state.ema)
    return saved


def _optimizer_state(state: TrainState) -> dict[str, Any]:
    model, optimizer = state.model, state.optimizer
    if optimizer.state:
        return get_optimizer_state_dict(model, optimizer)
    # Never stepped (the checkpoint right after initialisation): get_optimizer_state_dict would take a step
    # with zero gradients to make the moments it returns, and count it. The groups alone are the state.
    names = {id(param): name for name, param in model.named_parameters()}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    return {"state": {}, "param_groups": groups}


class ShardedSaver:
    """The training loop's saves of a sharded run; every rank calls :meth:`save` and :meth:`close` together."""

    def __init__(self, manager: CheckpointManager, ranks: Ranks, *, async_save: bool, timeout_s: float) -> None:
        self.manager = manager  # rank 0's holds the writer lease; the others' only reach the store
        self.ranks = ranks
        self._timeout = timeout_s
        # DCP's background collectives must not interleave with training's: a group of their own
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if async_save else None
        self._pending: sharded.PendingSave | None = None

    def save(self, kind: CheckpointKind, describe: Callable[..., Checkpoint], state: TrainState) -> str | None:
        """Save ``state`` as ``kind``; ``describe(tensors=False)`` gives, on rank 0, what the manifest records
        besides the shards. Returns the checkpoint's file name on every rank (None: that kind's keep is 0)."""
        self._settle()
        meta = describe(tensors=False) if self.ranks.is_main else None

        def prepare() -> CheckpointName | None:
            assert meta is not None
            return self.manager.prepare_save(kind, meta)

        name = self.ranks.on_main(prepare)
        filename = self.ranks.decide(name.filename if name is not None else None)
        if filename is None:
            return None
        factory = None if meta is None else (lambda record: dataclasses.replace(meta, shards=record))
        store, tensors = self.manager.store, checkpoint_state(state)
        if self._group is not None:
            commit = None if name is None else (lambda parts: self.manager.committed(name, parts))
            self._pending = sharded.save_async(
                store, filename, tensors, manifest=factory, process_group=self._group, on_commit=commit
            )
            return filename
        parts = sharded.save(store, filename, tensors, manifest=factory)
        self.ranks.on_main(lambda: self._commit(name, parts))
        return filename

    def close(self, *, failed: bool = False) -> None:
        """Settle the save in flight (its outcome raised on every rank). ``failed``: the run is ending on an
        error (a rank may be gone): only wait for this rank's own part, with no collective of ours."""
        if failed:
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.wait(timeout=self._timeout)
            return
        self._settle()

    def _settle(self) -> None:
        """The save in flight committed, and rank 0's rotation after it ran: or every rank raises why not."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.wait(timeout=self._timeout)  # DCP gives every rank the same outcome
        self.ranks.on_main(lambda: pending.after_commit(timeout=self._timeout))

    def _commit(self, name: CheckpointName | None, parts: tuple[str, ...]) -> None:
        assert name is not None  # rank 0 has the name it prepared
        self.manager.committed(name, parts)
