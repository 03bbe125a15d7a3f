"""The synthetic training state: the same GPT-2-shaped model + AdamW state as shared/bench/baseline.py."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ml_playground.checkpoint import Checkpoint, ModelWeights

MIB = 2**20


def gpt_config(size_mb: int) -> dict[str, Any]:
    """GPT-2-like shapes whose fp32 params total ~``size_mb`` MiB (~75% in blocks, the rest in untied wte/lm_head)."""
    target = size_mb * MIB // 4
    d = 512 if size_mb <= 128 else 1024 if size_mb <= 768 else 1536
    block = 1024
    per_layer = 12 * d * d + 13 * d
    n_layer = max(1, round(0.75 * target / per_layer))
    vocab = max(64, round((target - block * d - 2 * d - n_layer * per_layer) / (2 * d) / 64) * 64)
    return {"n_layer": n_layer, "n_head": d // 64, "n_embd": d, "vocab_size": vocab, "block_size": block, "bias": True}


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})


class GPT(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        d = c["n_embd"]
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(c["vocab_size"], d),
                "wpe": nn.Embedding(c["block_size"], d),
                "h": nn.ModuleList([_Block(d) for _ in range(c["n_layer"])]),
                "ln_f": nn.LayerNorm(d),
            }
        )
        self.lm_head = nn.Linear(d, c["vocab_size"], bias=False)  # untied on purpose


def build_state(size_mb: int) -> tuple[dict[str, Any], nn.Module, torch.optim.Optimizer]:
    """Random fp32 model + AdamW after one real step (exp_avg and exp_avg_sq: 2x the params)."""
    cfg = gpt_config(size_mb)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    for param in model.parameters():
        param.grad = torch.empty_like(param).uniform_(-1e-3, 1e-3, generator=generator)
    optimizer.step()
    for param in model.parameters():
        param.grad = None
    gc.collect()
    return cfg, model, optimizer


def build_checkpoint(size_mb: int, iter_num: int = 12345) -> Checkpoint:
    cfg, model, optimizer = build_state(size_mb)
    return Checkpoint(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        model_args=cfg,
        iter_num=iter_num,
        best_val_loss=2.8765,
        config={f"key_{i}": [i, f"value_{i}", i * 0.5] for i in range(50)},
    )


def as_plain_dict(checkpoint: Checkpoint) -> dict[str, Any]:
    """What a user would torch.save instead: the same tensors in a dict."""
    return {
        "model": dict(checkpoint.model),
        "optimizer": dict(checkpoint.optimizer),
        "model_args": dict(checkpoint.model_args),
        "iter_num": checkpoint.iter_num,
        "best_val_loss": checkpoint.best_val_loss,
        "config": dict(checkpoint.config),
    }


def iter_tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Checkpoint):
        yield from iter_tensors([tree.model, tree.optimizer, tree.ema, tree.rng_state])
    elif isinstance(tree, ModelWeights):
        yield from iter_tensors([tree.model, tree.ema])
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from iter_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from iter_tensors(value)


def tensor_bytes(tree: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in iter_tensors(tree):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def touch(tree: Any) -> float:
    """Read one element per 4 KiB page of every tensor, so lazy (mmap) loads pay their I/O."""
    acc = 0.0
    for tensor in iter_tensors(tree):
        flat = tensor.reshape(-1)
        if flat.numel():
            acc += float(flat[:: max(1, 4096 // flat.element_size())].float().sum())
    return acc
