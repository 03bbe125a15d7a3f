"""Evaluation as the trainer and ``eval`` both do it: fixed batches of each split, mean loss in eval mode.

Shared by the training and sampling flows, so ``eval`` of a best checkpoint reproduces the metric in
its name: same batches, same arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ml_playground.workload.data import Splits, fixed_batches
from ml_playground.workload.model import GPT

__all__ = ["Batches", "estimate_loss", "eval_batches", "evaluate"]

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def eval_batches(splits: Splits, block_size: int, batch_size: int, eval_iters: int, seed: int) -> dict[str, Batches]:
    """The fixed evaluation batches of each metric ("train_loss", "val_loss"): the same every evaluation."""
    return {
        name: fixed_batches(split, block_size, batch_size, eval_iters, seed + 1)
        for name, split in (("train_loss", splits.train), ("val_loss", splits.val))
    }


@torch.no_grad()
def estimate_loss(model: GPT, batches: Batches, device: torch.device) -> float:
    """Mean loss over ``batches`` in eval mode (no dropout, no RNG used)."""
    was_training = model.training
    model.eval()
    try:
        losses: list[float] = []
        for x, y in batches:
            _, loss = model(x.to(device), y.to(device))
            assert loss is not None
            losses.append(float(loss.item()))
        return sum(losses) / len(losses)
    finally:
        model.train(was_training)


def evaluate(model: GPT, batches: dict[str, Batches], device: torch.device) -> dict[str, float]:
    """Every metric's loss on its batches."""
    return {name: estimate_loss(model, split_batches, device) for name, split_batches in batches.items()}
