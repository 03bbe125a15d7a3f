"""An FSDP2-sharded GPT-shaped training state for the sharded-checkpoint benchmark (benchmarks/sharded_save.py).

The model is the benchmarks' GPT-2-like module (``_state.GPT``: untied ``wte``/``lm_head``, blocks of
attention + MLP), each block and then the whole ``fully_shard``-ed over a CPU mesh of every rank, with AdamW
after one real step (``exp_avg`` and ``exp_avg_sq``: 2x the params), as ``flows/fsdp.py`` shards a run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from _state import GPT
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def shape(n_layer: int, n_embd: int, vocab: int, block: int = 1024) -> dict[str, Any]:
    return {"n_layer": n_layer, "n_head": n_embd // 64, "n_embd": n_embd, "vocab_size": vocab, "block_size": block}


def build(cfg: dict[str, Any], world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The sharded model and its AdamW after one step, the same values on every rank and world size."""
    model = GPT(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02, generator=generator)
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.transformer["h"]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    with torch.no_grad():
        for param in model.parameters():
            param.grad = param.detach() * 0.01 + 1e-4
    optimizer.step()
    for param in model.parameters():
        param.grad = None
    return model, optimizer


def state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a rank saves (as ``flows.fsdp.checkpoint_state``): its shards of the model and the optimizer."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def local_tensors(tree: Any) -> list[torch.Tensor]:
    """This rank's tensors of ``tree`` (a DTensor's local shard)."""
    if isinstance(tree, DTensor):
        return [tree.to_local()]
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in local_tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in local_tensors(value)]
    return []


def shard_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in local_tensors(tree))


def largest_tensor_bytes(tree: Any) -> int:
    return max(t.numel() * t.element_size() for t in local_tensors(tree))


def fingerprint(tree: Any) -> list[float]:
    """A cheap check that a load filled this rank's tensors with the saved values."""
    return [float(t.double().sum()) if t.numel() else 0.0 for t in local_tensors(tree)]


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=0, abs_tol=0) for x, y in zip(a, b, strict=True))


def zero(tree: Any) -> None:
    with torch.no_grad():
        for tensor in local_tensors(tree):
            tensor.zero_()
