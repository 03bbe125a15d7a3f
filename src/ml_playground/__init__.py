"""ml_playground: a crash-safe, storage-abstracted checkpoint store for PyTorch, with small train/sample flows."""

from ml_playground.errors import CheckpointError, ConfigError, MLPlaygroundError

__all__ = ["CheckpointError", "ConfigError", "MLPlaygroundError", "__version__"]
__version__ = "0.1.0"
