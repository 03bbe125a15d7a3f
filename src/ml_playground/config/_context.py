"""What a validated configuration knows about the run it configures, beyond its settings."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict

__all__ = ["RuntimeContext"]


class RuntimeContext(BaseModel):
    """Injected by :mod:`ml_playground.config_loader` before validation; no file or ``--set`` can set it.

    It describes this process's run (where its settings came from, where it logs), not the training,
    so it is never dumped with the configuration and never saved in a checkpoint.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True)

    logger: logging.Logger
    """The logger the run's flows log to."""
    config_file: Path
    """The experiment file the configuration was loaded from."""
    experiment: str | None
    """The bundled experiment's name, or None for a user's experiment file."""
