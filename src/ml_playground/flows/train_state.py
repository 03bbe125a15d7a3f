"""Everything a training run carries between steps, and its exact round trip through a Checkpoint.

A checkpoint holds the model, the optimizer, the EMA shadow weights, the best metric so far, every
rank's global torch RNG state (dropout) and batch sampler generator state, and the number of batches
drawn. Restoring all of them is what makes a resumed run bitwise identical to an uninterrupted one.

Randomness per rank and the checks of a resume are in :mod:`ml_playground.flows.resume`; a sharded (FSDP2)
state's parts in :mod:`ml_playground.flows.fsdp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ml_playground.checkpoint import Checkpoint
from ml_playground.config import ExperimentConfig, TrainConfig
from ml_playground.errors import CheckpointSchemaError
from ml_playground.flows.resume import (
    check_resumable,
    derived_seed,
    fitting,
    model_args_for,
    restored_randomness,
    rng_keys,
)
from ml_playground.workload.data import BatchSampler, Splits
from ml_playground.workload.model import GPT

__all__ = ["TrainState", "make_optimizer", "plain_config"]

RankRandomness = dict[str, torch.Tensor]
"""One rank's generator states: ``{"torch": global RNG (dropout), "data": the batch sampler's}``."""


def make_optimizer(model: GPT, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on biases or norms (as nanoGPT does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = tc.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.learning_rate, betas=(o.beta1, o.beta2))


def plain_config(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment config as plain data for ``Checkpoint.config``, with storage secrets masked.

    The run's context (logger, config file, experiment name) is not part of it: a checkpoint does not
    depend on the machine it was written on.
    """
    data: dict[str, Any] = config.model_dump(mode="json")
    for section in ("train", "sample"):
        runtime = data[section]["runtime"]
        options = getattr(config, section).runtime.storage_options.redacted()
        runtime["storage_options"] = options
        if isinstance(runtime.get("out_dir"), dict) and "storage_options" in runtime["out_dir"]:
            runtime["out_dir"]["storage_options"] = options
    return data


class TrainState:
    """The model, optimizer, EMA, data sampler, iteration and best metric of a run."""

    def __init__(
        self,
        model: GPT,
        optimizer: torch.optim.AdamW,
        sampler: BatchSampler,
        device: torch.device,
        *,
        iter_num: int,
        best: float,
        ema: dict[str, torch.Tensor] | None,
    ) -> None:
        self.model = model
        self.trainable: torch.nn.Module = model  # what a step runs: the model, or its DDP wrapper
        self.optimizer = optimizer
        self.sampler = sampler
        self.device = device
        self.iter_num = iter_num
        self.start_iter = iter_num
        self.best = best
        self.ema = ema

    @classmethod
    def fresh(cls, tc: TrainConfig, splits: Splits, device: torch.device, rank: int = 0) -> TrainState:
        seed = tc.runtime.seed
        torch.manual_seed(seed)  # the same initial model on every rank
        model = GPT(model_args_for(tc, splits)).to(device)
        model.train()
        own = seed if rank == 0 else derived_seed(seed, rank)
        if rank:
            torch.manual_seed(own)
        sampler = BatchSampler(splits.train, tc.model.block_size, tc.data.batch_size, own)
        ema = _ema_init(model) if tc.runtime.ema_decay > 0 else None
        best = math.inf if tc.runtime.checkpointing.mode == "min" else -math.inf
        return cls(model, make_optimizer(model, tc), sampler, device, iter_num=0, best=best, ema=ema)

    @classmethod
    def restore(
        cls, tc: TrainConfig, splits: Splits, device: torch.device, ckpt: Checkpoint, *, source: str, rank: int = 0
    ) -> TrainState:
        args = check_resumable(tc, splits, ckpt, source)
        model = GPT(args).to(device)
        fitting(source, "model state", lambda: model.load_state_dict(ckpt.model))
        model.train()
        optimizer = make_optimizer(model, tc)
        fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        fitting(source, "optimizer state", lambda: optimizer.load_state_dict(dict(ckpt.optimizer)))
        _check_optimizer(optimizer, fresh_groups, source)
        sampler = restored_randomness(tc, splits, ckpt, source, rank)
        if ckpt.ema is not None and {k: v.shape for k, v in ckpt.ema.items()} != {
            k: v.shape for k, v in model.state_dict().items()
        }:
            raise CheckpointSchemaError(f"{source}: its EMA weights do not fit its model")
        ema = _ema_copy(ckpt.ema) if ckpt.ema is not None else None
        return cls(model, optimizer, sampler, device, iter_num=ckpt.iter_num, best=ckpt.best_val_loss, ema=ema)

    def distribute(self) -> None:
        """Train through DistributedDataParallel (gradients averaged over the ranks; the process group is up).

        The checkpoint keeps the unwrapped module's state dict: no ``module.`` prefix."""
        self.trainable = torch.nn.parallel.DistributedDataParallel(self.model)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, grad_clip: float, ema_decay: float) -> float:
        """One optimizer step on the next training batch; returns its loss."""
        x, y = self.sampler.next()
        _, loss = self.trainable(x.to(self.device), y.to(self.device))
        assert loss is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            _ema_update(self.ema, self.model, ema_decay)
        return float(loss.item())

    def randomness(self) -> RankRandomness:
        """This rank's generator states, as they are now."""
        return {"torch": torch.get_rng_state(), "data": self.sampler.state()}

    def to_checkpoint(
        self,
        config: Mapping[str, Any],
        splits: Splits,
        ranks: Sequence[RankRandomness] | None = None,
        *,
        tensors: bool = True,
    ) -> Checkpoint:
        """The state as a checkpoint; ``ranks`` is every rank's randomness (in rank order), else this process's.
        ``tensors=False``: without model, optimizer and EMA (a sharded checkpoint's manifest, whose shards
        every rank writes)."""
        every = list(ranks) if ranks is not None else [self.randomness()]
        rng: dict[str, torch.Tensor] = {}
        for rank, states in enumerate(every):
            torch_key, data_key = rng_keys(rank)
            rng[torch_key], rng[data_key] = states["torch"], states["data"]
        return Checkpoint(
            model=self.model.state_dict() if tensors else {},
            optimizer=self.optimizer.state_dict() if tensors else {},
            model_args=self.model.args.to_plain(),
            iter_num=self.iter_num,
            best_val_loss=self.best,
            config=config,
            ema=self.ema if tensors else None,
            rng_state=rng,
            data_state={**splits.describe(), "batches_drawn": self.sampler.batches_drawn},
            world_size=len(every),
        )


def _check_optimizer(optimizer: torch.optim.AdamW, fresh: list[dict[str, Any]], source: str) -> None:
    """What torch's ``load_state_dict`` does not check, and the first step would trip over: the groups'
    settings and every moment's shape."""
    for group, wanted in zip(optimizer.param_groups, fresh, strict=True):
        for key, value in group.items():
            if key in ("lr", "eps", "weight_decay", "initial_lr"):
                ok = isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value)
            elif key == "betas":
                ok = isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(b, float) for b in value)
            else:
                ok = key == "params" or (key in wanted and value == wanted[key])
            if not ok:
                raise CheckpointSchemaError(f"{source}: its optimizer setting {key} = {str(value)[:40]} does not fit")
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                shape = torch.Size([]) if key == "step" else param.shape
                if not isinstance(value, torch.Tensor) or value.shape != shape or not value.is_floating_point():
                    raise CheckpointSchemaError(
                        f"{source}: its optimizer state {key} does not fit the parameter of shape {tuple(param.shape)}"
                    )


def _ema_init(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ema_copy(saved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in saved.items()}


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], model: GPT, decay: float) -> None:
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            ema[key].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
        else:
            ema[key].copy_(value)
