"""The typed checkpoint value: what is saved, what is loaded. Never a bare dict at a public boundary."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch

from ml_playground.checkpoint._tree import check_plain_tree
from ml_playground.errors import CheckpointSchemaError

__all__ = ["Checkpoint", "ModelWeights", "PlainData", "StateDict"]

PlainData: TypeAlias = bool | int | float | str | list["PlainData"] | dict[str, "PlainData"] | None
StateDict: TypeAlias = Mapping[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True, eq=False)
class Checkpoint:
    """One training state.

    ``model``/``ema`` are module state dicts; ``optimizer`` is an optimizer state dict (tensors and
    plain data); ``rng_state`` holds generator states as tensors and ``data_state`` the data position,
    which is what a bitwise-identical resume needs (under torchrun, every rank's). ``world_size`` is the
    number of processes the checkpoint was written by (1 for a single process). ``best_val_loss`` is
    the best value so far of the configured metric (for a "best" checkpoint, the value that made it
    best). ``config`` is plain data with no secrets.
    """

    model: StateDict
    optimizer: Mapping[str, Any]
    model_args: Mapping[str, PlainData]
    iter_num: int
    best_val_loss: float
    config: Mapping[str, PlainData] = field(default_factory=dict)
    ema: StateDict | None = None
    rng_state: StateDict = field(default_factory=dict)
    data_state: Mapping[str, PlainData] = field(default_factory=dict)
    world_size: int = 1
    shards: Mapping[str, PlainData] | None = None
    """Set only on a sharded checkpoint's manifest: where its tensors are (``checkpoint.sharded`` reads it);
    the manifest then holds no tensors of its own (``model`` and ``optimizer`` empty, no ``ema``)."""

    def __post_init__(self) -> None:
        _check_weights_and_metadata(self)
        _check_state_dict("rng_state", self.rng_state)
        if self.shards is not None and (self.model or self.optimizer or self.ema is not None):
            raise CheckpointSchemaError("a sharded checkpoint's manifest holds no model, EMA or optimizer tensors")
        check_plain_tree("optimizer", self.optimizer, tensors_allowed=True)

    @property
    def has_ema(self) -> bool:
        return self.ema is not None or _sharded_section(self.shards, "ema")

    @property
    def has_finite_metric(self) -> bool:
        return math.isfinite(self.best_val_loss)


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelWeights:
    """What sampling and evaluation need from a checkpoint: no optimizer state, no RNG state."""

    model: StateDict
    model_args: Mapping[str, PlainData]
    iter_num: int
    best_val_loss: float
    config: Mapping[str, PlainData] = field(default_factory=dict)
    ema: StateDict | None = None
    data_state: Mapping[str, PlainData] = field(default_factory=dict)
    world_size: int = 1
    shards: Mapping[str, PlainData] | None = None
    """As on :class:`Checkpoint`: set only when read from a sharded checkpoint's manifest, before assembly."""

    def __post_init__(self) -> None:
        _check_weights_and_metadata(self)
        if self.shards is not None and (self.model or self.ema is not None):
            raise CheckpointSchemaError("a sharded checkpoint's manifest holds no model or EMA tensors")

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> ModelWeights:
        """The weights of a fully loaded checkpoint (its tensors shared, not copied)."""
        return cls(
            model=checkpoint.model,
            model_args=checkpoint.model_args,
            iter_num=checkpoint.iter_num,
            best_val_loss=checkpoint.best_val_loss,
            config=checkpoint.config,
            ema=checkpoint.ema,
            data_state=checkpoint.data_state,
            world_size=checkpoint.world_size,
            shards=checkpoint.shards,
        )

    @property
    def has_ema(self) -> bool:
        return self.ema is not None or _sharded_section(self.shards, "ema")


def _sharded_section(shards: Mapping[str, PlainData] | None, section: str) -> bool:
    sections = shards.get("sections") if shards is not None else None
    return isinstance(sections, list) and section in sections


def _check_weights_and_metadata(state: Checkpoint | ModelWeights) -> None:
    """The checks a checkpoint and its weights share; ``best_val_loss`` becomes a float."""
    if isinstance(state.iter_num, bool) or not isinstance(state.iter_num, int) or state.iter_num < 0:
        raise CheckpointSchemaError(f"iter_num must be an int >= 0, got {state.iter_num!r}")
    if isinstance(state.best_val_loss, bool) or not isinstance(state.best_val_loss, (int, float)):
        raise CheckpointSchemaError(f"best_val_loss must be a float, got {state.best_val_loss!r}")
    object.__setattr__(state, "best_val_loss", float(state.best_val_loss))
    if isinstance(state.world_size, bool) or not isinstance(state.world_size, int) or state.world_size < 1:
        raise CheckpointSchemaError(f"world_size must be an int >= 1, got {state.world_size!r}")
    _check_state_dict("model", state.model)
    if state.ema is not None:
        _check_state_dict("ema", state.ema)
    for name in ("model_args", "config", "data_state", "shards"):
        check_plain_tree(name, getattr(state, name) or {}, tensors_allowed=False)


def _check_state_dict(name: str, state: object) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointSchemaError(f"{name} must be a mapping of str to tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointSchemaError(f"{name} must map str to tensors; entry {key!r} is {type(value).__name__}")
