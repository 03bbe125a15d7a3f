"""Everything a training run carries between steps, and its exact round trip through a Checkpoint.

A checkpoint holds the model, the optimizer, the EMA shadow weights, the best metric so far, every
rank's global torch RNG state (dropout) and batch sampler generator state, and the number of batches
drawn. Restoring all of them is what makes a resumed run bitwise identical to an uninterrupted one.

Randomness per rank (DESIGN.md, distributed runs): the model is initialised from ``seed`` on every rank;
rank 0's dropout and batches then continue from ``seed`` (a single process is rank 0, as before), rank
r's come from :func:`derived_seed` ``(seed, r)``. Resumed at another world size, ranks the checkpoint
has continue their generators and new ranks start from ``(seed, r, iteration)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ml_playground.checkpoint import Checkpoint
from ml_playground.config import ExperimentConfig, TrainConfig
from ml_playground.errors import CheckpointSchemaError, ConfigError
from ml_playground.workload.data import BatchSampler, Splits
from ml_playground.workload.model import GPT, GPTArgs

__all__ = ["TrainState", "derived_seed", "plain_config", "rng_keys"]

RankRandomness = dict[str, torch.Tensor]
"""One rank's generator states: ``{"torch": global RNG (dropout), "data": the batch sampler's}``."""


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for ``(seed, *parts)`` (a rank, an iteration): deterministic, independent of each other."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def rng_keys(rank: int) -> tuple[str, str]:
    """Where rank ``rank``'s states live in ``Checkpoint.rng_state`` (rank 0's keys are a single process's)."""
    return ("torch", "data") if rank == 0 else (f"torch.{rank}", f"data.{rank}")


def model_args_for(tc: TrainConfig, splits: Splits) -> GPTArgs:
    m = tc.model
    return GPTArgs(splits.tokenizer.size, m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias)


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
        args = model_args_for(tc, splits)
        saved = GPTArgs.from_plain(ckpt.model_args, source=source)
        _require_same(saved.to_plain(), args.to_plain(), "train.model", source)
        described = splits.describe()
        stored = {k: ckpt.data_state.get(k) for k in described}
        _require_same(stored, dict(described), "train.data", source)
        _require_same(
            {"ema_decay": _saved_ema_decay(ckpt, source)}, {"ema_decay": tc.runtime.ema_decay}, "train.runtime", source
        )
        model = GPT(args).to(device)
        _fitting(source, "model state", lambda: model.load_state_dict(ckpt.model))
        model.train()
        optimizer = make_optimizer(model, tc)
        fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        _fitting(source, "optimizer state", lambda: optimizer.load_state_dict(dict(ckpt.optimizer)))
        _check_optimizer(optimizer, fresh_groups, source)
        sampler = BatchSampler(splits.train, tc.model.block_size, tc.data.batch_size, tc.runtime.seed)
        drawn = ckpt.data_state.get("batches_drawn")
        torch_key, data_key = rng_keys(rank)
        if not isinstance(drawn, int) or isinstance(drawn, bool) or drawn < 0:
            raise CheckpointSchemaError(f"{source}: the checkpoint lacks the data state a resume needs")
        if rank < ckpt.world_size:  # this rank continues its own generators
            if torch_key not in ckpt.rng_state or data_key not in ckpt.rng_state:
                raise CheckpointSchemaError(
                    f"{source}: the checkpoint lacks the RNG and data state of rank {rank}, which a resume needs"
                )
            _fitting(source, "data sampler's RNG state", lambda: sampler.restore(ckpt.rng_state[data_key], drawn))
            _fitting(source, "torch RNG state", lambda: torch.set_rng_state(ckpt.rng_state[torch_key]))
        else:  # a rank the checkpoint's run did not have
            own = derived_seed(tc.runtime.seed, rank, ckpt.iter_num)
            sampler = BatchSampler(splits.train, tc.model.block_size, tc.data.batch_size, own)
            sampler.batches_drawn = drawn
            torch.manual_seed(own)
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
        self, config: Mapping[str, Any], splits: Splits, ranks: Sequence[RankRandomness] | None = None
    ) -> Checkpoint:
        """The state as a checkpoint; ``ranks`` is every rank's randomness (in rank order), else this process's."""
        every = list(ranks) if ranks is not None else [self.randomness()]
        rng: dict[str, torch.Tensor] = {}
        for rank, states in enumerate(every):
            torch_key, data_key = rng_keys(rank)
            rng[torch_key], rng[data_key] = states["torch"], states["data"]
        return Checkpoint(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            model_args=self.model.args.to_plain(),
            iter_num=self.iter_num,
            best_val_loss=self.best,
            config=config,
            ema=self.ema,
            rng_state=rng,
            data_state={**splits.describe(), "batches_drawn": self.sampler.batches_drawn},
            world_size=len(every),
        )


def _fitting(source: str, what: str, action: Callable[[], object]) -> None:
    """Run ``action`` (torch restoring a state); whatever torch raises about the state is a clear error."""
    try:
        action()
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointSchemaError(
            f"{source}: its {what} does not fit this run ({reason}); it is damaged or was not written by this trainer"
        ) from None


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


def _require_same(saved: Mapping[str, object], wanted: Mapping[str, object], section: str, source: str) -> None:
    differing = [
        f"{section}.{k}: checkpoint {saved[k]!r}, config {wanted[k]!r}" for k in wanted if saved[k] != wanted[k]
    ]
    if differing:
        raise ConfigError(
            f"cannot resume {source}: the run was trained with a different setup ({'; '.join(differing)}). "
            "Use the run's original settings, or a new train.runtime.out_dir for a new run"
        )


def _saved_ema_decay(ckpt: Checkpoint, source: str) -> float:
    """The EMA decay the checkpoint's run trained with, from its saved config."""
    train = ckpt.config.get("train")
    runtime = train.get("runtime") if isinstance(train, Mapping) else None
    decay = runtime.get("ema_decay") if isinstance(runtime, Mapping) else None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise CheckpointSchemaError(f"{source}: its config lacks train.runtime.ema_decay, which a resume must keep")
    if (decay > 0) != ckpt.has_ema:
        raise CheckpointSchemaError(
            f"{source}: its config says train.runtime.ema_decay = {decay}, but it "
            f"{'holds no' if decay > 0 else 'holds'} EMA weights"
        )
    return float(decay)


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
