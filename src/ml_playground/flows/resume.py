"""What a run derives from its config and restores on resume, besides its tensors.

The model arguments and the seeds of every rank (DESIGN.md, distributed runs: the model is initialised from
``seed`` on every rank; rank 0's dropout and batches continue from ``seed``, as a single process's do, rank
r's come from :func:`derived_seed` ``(seed, r)``), where each rank's generator states live in
``Checkpoint.rng_state``, and the checks and restores of a resume: the same setup, then every rank's
generators (ranks the checkpoint has continue theirs, new ranks start from ``(seed, r, iteration)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

from ml_playground.checkpoint import Checkpoint
from ml_playground.config import TrainConfig
from ml_playground.errors import CheckpointSchemaError, ConfigError
from ml_playground.workload.data import BatchSampler, Splits
from ml_playground.workload.model import GPTArgs

__all__ = ["check_resumable", "derived_seed", "fitting", "model_args_for", "restored_randomness", "rng_keys"]


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


def check_resumable(tc: TrainConfig, splits: Splits, ckpt: Checkpoint, source: str) -> GPTArgs:
    """The model arguments of this run, once ``ckpt`` is known to come from the same setup (ConfigError if not)."""
    args = model_args_for(tc, splits)
    saved = GPTArgs.from_plain(ckpt.model_args, source=source)
    _require_same(saved.to_plain(), args.to_plain(), "train.model", source)
    described = splits.describe()
    stored = {k: ckpt.data_state.get(k) for k in described}
    _require_same(stored, dict(described), "train.data", source)
    decay = _saved_ema_decay(ckpt, source)
    _require_same({"ema_decay": decay}, {"ema_decay": tc.runtime.ema_decay}, "train.runtime", source)
    return args


def restored_randomness(tc: TrainConfig, splits: Splits, ckpt: Checkpoint, source: str, rank: int) -> BatchSampler:
    """Rank ``rank``'s batch sampler as ``ckpt`` left it, with the global torch RNG restored too; a rank the
    checkpoint's run did not have starts from ``(seed, rank, iteration)``."""
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
        fitting(source, "data sampler's RNG state", lambda: sampler.restore(ckpt.rng_state[data_key], drawn))
        fitting(source, "torch RNG state", lambda: torch.set_rng_state(ckpt.rng_state[torch_key]))
    else:  # a rank the checkpoint's run did not have
        own = derived_seed(tc.runtime.seed, rank, ckpt.iter_num)
        sampler = BatchSampler(splits.train, tc.model.block_size, tc.data.batch_size, own)
        sampler.batches_drawn = drawn
        torch.manual_seed(own)
    return sampler


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


def fitting(source: str, what: str, action: Callable[[], object]) -> None:
    """Run ``action`` (torch restoring a state); whatever torch raises about the state is a clear error."""
    try:
        action()
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointSchemaError(
            f"{source}: its {what} does not fit this run ({reason}); it is damaged or was not written by this trainer"
        ) from None
