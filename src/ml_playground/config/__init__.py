"""Typed configuration: the pydantic models :mod:`ml_playground.config_loader` validates into."""

from ml_playground.config._context import RuntimeContext
from ml_playground.config._models import (
    METRICS,
    CheckpointingConfig,
    DataConfig,
    DistributedConfig,
    ExperimentConfig,
    KeepConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    SampleConfig,
    SampleRuntimeConfig,
    SamplingConfig,
    TrainConfig,
    TrainRuntimeConfig,
)

__all__ = [
    "METRICS",
    "CheckpointingConfig",
    "DataConfig",
    "DistributedConfig",
    "ExperimentConfig",
    "KeepConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "RuntimeContext",
    "SampleConfig",
    "SampleRuntimeConfig",
    "SamplingConfig",
    "TrainConfig",
    "TrainRuntimeConfig",
]
