"""A small nanoGPT-style GPT: token + position embeddings, pre-norm transformer blocks, a linear head.

The model is built from :class:`GPTArgs` alone, which is plain data stored in every checkpoint's
``model_args``, so a checkpoint can be sampled without the config that trained it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from ml_playground.errors import CheckpointSchemaError, ConfigError

__all__ = ["GREEDY_BELOW", "GPT", "GPTArgs", "runtime_device"]

GREEDY_BELOW = 1e-6
"""Sampling temperatures below this pick the most likely token (greedy decoding) instead of dividing by them."""


@dataclass(frozen=True)
class GPTArgs:
    """Everything needed to rebuild the network; saved as ``Checkpoint.model_args``."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float
    bias: bool

    def to_plain(self) -> dict[str, int | float | bool]:
        return asdict(self)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every entry of :class:`GPT`'s state dict, computed without allocating anything."""
        c, width = self.n_embd, (self.n_embd,)
        linear = {"attn.qkv": (3 * c, c), "attn.proj": (c, c), "mlp.fc": (4 * c, c), "mlp.proj": (c, 4 * c)}
        shapes: dict[str, tuple[int, ...]] = {"wte.weight": (self.vocab_size, c), "wpe.weight": (self.block_size, c)}
        for i in range(self.n_layer):
            block = f"blocks.{i}"
            for name in ("ln_1", "attn.qkv", "attn.proj", "ln_2", "mlp.fc", "mlp.proj"):
                shapes[f"{block}.{name}.weight"] = linear.get(name, width)
                if self.bias:
                    shapes[f"{block}.{name}.bias"] = linear[name][:1] if name in linear else width
        shapes["ln_f.weight"] = width
        if self.bias:
            shapes["ln_f.bias"] = width
        shapes["lm_head.weight"] = (self.vocab_size, c)
        return shapes

    @classmethod
    def from_plain(cls, data: Mapping[str, object], *, source: str) -> GPTArgs:
        """Rebuild from a checkpoint's ``model_args``; a missing or mistyped field names ``source``."""
        values: dict[str, object] = {}
        for spec in fields(cls):
            value = data.get(spec.name)
            expected: type = {"int": int, "float": float, "bool": bool}[str(spec.type)]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise CheckpointSchemaError(
                    f"{source}: model_args.{spec.name} must be {expected.__name__}, got {value!r}; "
                    "this checkpoint was not written by ml_playground's trainer"
                )
            values[spec.name] = value
        return cls(**values)  # type: ignore[arg-type]


class _SelfAttention(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.n_head = args.n_head
        self.qkv = nn.Linear(args.n_embd, 3 * args.n_embd, bias=args.bias)
        self.proj = nn.Linear(args.n_embd, args.n_embd, bias=args.bias)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (batch, time, self.n_head, width // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, time, width)
        out: torch.Tensor = self.resid_dropout(self.proj(y))
        return out


class _MLP(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.fc = nn.Linear(args.n_embd, 4 * args.n_embd, bias=args.bias)
        self.proj = nn.Linear(4 * args.n_embd, args.n_embd, bias=args.bias)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dropout(self.proj(F.gelu(self.fc(x))))
        return out


class _Block(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, bias=args.bias)
        self.attn = _SelfAttention(args)
        self.ln_2 = nn.LayerNorm(args.n_embd, bias=args.bias)
        self.mlp = _MLP(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class GPT(nn.Module):
    """A decoder-only transformer over a character vocabulary."""

    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        if args.n_embd % args.n_head != 0:
            raise ValueError(f"n_embd ({args.n_embd}) must be a multiple of n_head ({args.n_head})")
        self.args = args
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.block_size, args.n_embd)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(_Block(args) for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(args.n_embd, bias=args.bias)
        # untied head: every state-dict entry owns its storage, so exports (safetensors) need no dedup
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):  # scaled residual projections (GPT-2 paper)
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when ``targets`` are given."""
        time = idx.shape[1]
        if time > self.args.block_size:
            raise ValueError(f"sequence of length {time} exceeds block_size {self.args.block_size}")
        pos = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (batch, time) by ``max_new_tokens`` sampled tokens; ``top_k`` None or 0 = no filter."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.args.block_size :]
            logits, _ = self(context)
            if temperature < GREEDY_BELOW:  # the limit of ever lower temperatures; 1/t would overflow float32
                idx = torch.cat([idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
                continue
            logits = logits[:, -1, :] / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx


def runtime_device(setting: str, name: str) -> torch.device:
    """The device the setting ``setting`` (e.g. ``train.runtime.device``) names, if this machine has it."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} = 'cuda' but no CUDA device is available; use 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting} = 'mps' but MPS is not available; use 'cpu'")
    return torch.device(name)
