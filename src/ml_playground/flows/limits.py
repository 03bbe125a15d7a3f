"""Check before you allocate: a model, corpus or batch is checked against the configuration's bounds, the
weights it must hold and this machine's memory before anything is built (docs/reliability.md).

A checkpoint's ``model_args``, ``data_state`` and saved config are a file's content: a value outside
the bounds the configuration enforces, weights that do not fit the model the arguments describe, or
a size this machine cannot hold is a CheckpointSchemaError naming the file and the setting (exit 1).
The same sizes given as settings (``--set train.model.n_embd=...``) are a ConfigError naming the key
(exit 2).
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ml_playground.config import DataConfig, ModelConfig
from ml_playground.errors import CheckpointSchemaError, MLPlaygroundError
from ml_playground.workload.model import GPTArgs

__all__ = [
    "available_memory",
    "check_data_state",
    "check_finite",
    "check_model",
    "require_memory",
    "saved_setting",
    "training_bytes",
    "evaluation_bytes",
]

_FLOAT = 4  # bytes of a float32 parameter, gradient or activation
_LONG = 8


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, or less under an address-space
    limit (``ulimit -v``, ``prlimit --as``); None where neither can be read."""
    available: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            available = None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm", encoding="ascii") as statm:
                used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            used = 0
        room = max(limit - used, 0)
        available = room if available is None else min(available, room)
    return available


def model_bytes(args: GPTArgs) -> int:
    return _FLOAT * sum(math.prod(shape) for shape in args.parameter_shapes().values())


def training_bytes(args: GPTArgs, batch_size: int, *, ema: bool) -> tuple[int, int]:
    """(parameter memory, activation memory) of training: weights, gradients and AdamW's two moments (and
    an EMA copy), and a rough upper estimate of one batch's activations kept for the backward pass."""
    params = model_bytes(args) * (5 if ema else 4)
    return params, _activations(args, batch_size) * 2


def evaluation_bytes(args: GPTArgs, batch_size: int, eval_iters: int) -> int:
    """The model, one batch's activations (no gradients) and the fixed evaluation batches of both splits."""
    batches = 2 * eval_iters * 2 * batch_size * args.block_size * _LONG
    return model_bytes(args) + _activations(args, batch_size) + batches


def _activations(args: GPTArgs, batch_size: int) -> int:
    tokens = batch_size * args.block_size
    per_layer = 16 * args.n_embd + 2 * args.n_head * args.block_size  # projections, MLP, attention weights
    return _FLOAT * tokens * (args.n_layer * per_layer + 3 * args.vocab_size + 4 * args.n_embd)


def require_memory(needed: int, what: str, error: Callable[[str], MLPlaygroundError]) -> None:
    """Raise ``error`` (naming ``what``, the setting that asks for it) if ``needed`` bytes cannot be had."""
    available = available_memory()
    if available is not None and needed > available:
        raise error(
            f"{what} needs about {_size(needed)} of memory ({needed:,} bytes), and this machine has "
            f"{_size(available)} available; lower it"
        )


def check_model(args: GPTArgs, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``args`` within the configuration's bounds, and ``state`` exactly the weights the model they describe
    holds (every name, every shape), and the model within this machine's memory; before it is built."""
    fields = {key: getattr(args, key) for key in ModelConfig.model_fields}
    try:
        ModelConfig.model_validate(fields)
    except ValidationError as exc:
        raise CheckpointSchemaError(f"{source}: its model_args are invalid ({_first(exc, 'model_args')})") from None
    if args.vocab_size < 1:
        raise CheckpointSchemaError(f"{source}: model_args.vocab_size is {args.vocab_size}; it must be > 0")
    wanted = args.parameter_shapes()
    for key in sorted(wanted.keys() ^ state.keys())[:1]:
        side = "lacks" if key in wanted else "holds the unexpected weight"
        raise CheckpointSchemaError(f"{source}: its weights do not fit its model_args: it {side} {key}")
    for key, shape in wanted.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointSchemaError(
                f"{source}: its weights do not fit its model_args: {key} is {tuple(state[key].shape)}, "
                f"model_args make it {shape}"
            )
    require_memory(
        model_bytes(args), f"the model of {source} (model_args.n_embd = {args.n_embd})", CheckpointSchemaError
    )


def check_finite(state: Mapping[str, torch.Tensor], section: str, source: str) -> None:
    """Raise if a floating-point tensor of ``state`` holds NaN or infinite values (a diverged run's weights)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointSchemaError(
                f"{source}: its weight {section}.{key} holds NaN or infinite values: the run that wrote it "
                "diverged. Use an earlier checkpoint (ml-playground ckpt ls), or train again with a lower "
                "learning rate"
            )


def saved_setting(model: type[BaseModel], field: str, value: object, key: str, source: str) -> Any:
    """``value``, the saved setting ``key``, checked against the bounds the configuration puts on it."""
    info = model.model_fields[field]
    annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(annotation, config=ConfigDict(strict=True, allow_inf_nan=False))
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise CheckpointSchemaError(
            f"{source}: its saved {key} = {str(value)[:40]} is invalid ({_first(exc, key)})"
        ) from None


def check_data_state(data_state: Mapping[str, object], source: str) -> None:
    """The dataset a checkpoint describes, within the bounds of ``train.data``."""
    for field in ("dataset", "corpus_chars", "val_fraction"):
        saved_setting(DataConfig, field, data_state.get(field), f"data_state.{field}", source)


def _first(exc: ValidationError, prefix: str) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
    return f"{where}: {error['msg']}"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
