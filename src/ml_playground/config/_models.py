"""Typed configuration: what ``config_loader`` validates the TOML into.

Every model is frozen, forbids unknown keys and is strict (no ``"5"`` for an int, no ``true`` for an int).
Locations (``out_dir``) arrive here already parsed by :mod:`ml_playground.config_loader`, and so does the
:class:`RuntimeContext`, which no file or ``--set`` can set and which is never dumped.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ml_playground.config._context import RuntimeContext
from ml_playground.locations import Location, StorageOptions

__all__ = [
    "CheckpointingConfig",
    "DataConfig",
    "DistributedConfig",
    "ExperimentConfig",
    "METRICS",
    "KeepConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "SampleConfig",
    "SampleRuntimeConfig",
    "SamplingConfig",
    "TrainConfig",
    "TrainRuntimeConfig",
]

_STRICT = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # TOML's integers are signed 64-bit; training uses seed + 1 too
ReadPolicy = Literal["latest", "best"]

Metric = Literal["val_loss", "train_loss"]
METRICS: tuple[str, ...] = get_args(Metric)
"""The metrics the trainer computes at each evaluation; ``checkpointing.metric`` names one of them."""


class KeepConfig(BaseModel):
    """How many checkpoints of each kind survive rotation; 0 means that kind is never written."""

    model_config = _STRICT

    last: NonNegativeInt = 1
    best: NonNegativeInt = 1


class CheckpointingConfig(BaseModel):
    model_config = _STRICT

    interval: PositiveInt = 100
    read_policy: ReadPolicy = "latest"
    metric: Metric = "val_loss"
    mode: Literal["min", "max"] = "min"
    keep: KeepConfig = KeepConfig()
    async_save: bool = False
    save_on_sigterm: bool = True
    """On SIGTERM, stop at the next iteration boundary and save ``last`` there (docs/cli.md, exit 143)."""


class ModelConfig(BaseModel):
    model_config = _STRICT

    n_layer: PositiveInt = 2
    n_head: PositiveInt = 2
    n_embd: PositiveInt = 64
    block_size: PositiveInt = 64
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    bias: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class OptimConfig(BaseModel):
    model_config = _STRICT

    learning_rate: Annotated[float, Field(gt=0.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.1
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0


class DataConfig(BaseModel):
    model_config = _STRICT

    dataset: Literal["bundled_chars"] = "bundled_chars"
    corpus_chars: Annotated[int, Field(ge=10_000, le=10_000_000)] = 200_000
    batch_size: PositiveInt = 16
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1


class DistributedConfig(BaseModel):
    """How a run launched by ``torchrun`` trains across processes (docs/distributed.md); without torchrun,
    ``"ddp"`` is a plain single process and ``"fsdp"`` a one-rank process group writing sharded checkpoints."""

    model_config = _STRICT

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: every rank holds the model, rank 0 writes single-file checkpoints. ``fsdp``: the model, EMA and
    optimizer are sharded across the ranks (FSDP2), every rank writes its part of each checkpoint."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: nccl on CUDA, gloo on the CPU."""
    timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    """Bounds every collective and every wait for a save's outcome."""
    preempt_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """How long the ranks wait to agree on where a SIGTERM stops the run (keep it under torchrun's shutdown
    timeout); a rank gone meanwhile: no save, exit 143."""


class TrainRuntimeConfig(BaseModel):
    model_config = _STRICT

    out_dir: Location
    max_iters: NonNegativeInt = 300
    eval_interval: PositiveInt = 50
    eval_iters: PositiveInt = 10
    log_interval: PositiveInt = 10
    seed: Seed = 1337
    device: Literal["cpu", "cuda", "mps"] = "cpu"
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    storage_options: StorageOptions = StorageOptions()
    checkpointing: CheckpointingConfig = CheckpointingConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _backend_fits_the_device(self) -> TrainRuntimeConfig:
        if self.distributed.backend == "nccl" and self.device != "cuda":
            raise ValueError(
                f"distributed.backend = 'nccl' needs device = 'cuda' (device is {self.device!r}); "
                "use backend = 'gloo' or 'auto'"
            )
        return self


RuntimeConfig = TrainRuntimeConfig
"""The requirements' name for the training runtime settings: ``RuntimeConfig.checkpointing`` holds the policy."""


class TrainConfig(BaseModel):
    model_config = _STRICT

    runtime: TrainRuntimeConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()


class SampleRuntimeConfig(BaseModel):
    model_config = _STRICT

    out_dir: Location
    checkpoint: Annotated[str, Field(pattern=r"^[^./\\\x00][^/\\\x00]*$", max_length=255)] | None = None
    """One file of ``out_dir`` to read (``--checkpoint``) instead of the one ``read_policy`` picks."""
    read_policy: ReadPolicy = "best"
    device: Literal["cpu", "cuda", "mps"] = "cpu"
    use_ema: bool = True
    storage_options: StorageOptions = StorageOptions()


class SamplingConfig(BaseModel):
    model_config = _STRICT

    num_samples: PositiveInt = 1
    max_new_tokens: PositiveInt = 200
    temperature: Annotated[float, Field(gt=0.0)] = 0.8
    top_k: NonNegativeInt = 40  # 0 disables top-k filtering
    start: str = "\n"
    seed: Seed = 1337


class SampleConfig(BaseModel):
    model_config = _STRICT

    runtime: SampleRuntimeConfig
    sample: SamplingConfig = SamplingConfig()


class ExperimentConfig(BaseModel):
    """One experiment: what ``train`` and ``sample``/``eval`` run with."""

    model_config = _STRICT

    train: TrainConfig
    sample: SampleConfig
    context: RuntimeContext = Field(exclude=True)
    """Where the configuration came from and where the run logs; injected by the loader, never dumped."""
