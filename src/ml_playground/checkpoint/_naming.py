"""Checkpoint file names: made and parsed exactly, ordered by the numbers they hold, never by text.

ckpt_last_{iter:08d}.pt            e.g. ckpt_last_00001200.pt, ckpt_last_123456789.pt
ckpt_best_{iter:08d}_{metric:.6f}.pt   e.g. ckpt_best_00001200_1.234567.pt
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from ml_playground.errors import CheckpointNameError

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointInfo",
    "CheckpointKind",
    "CheckpointName",
    "format_metric",
    "is_checkpoint_like",
]

CHECKPOINT_PREFIX = "ckpt_"
MAX_NAME_BYTES = 255
_LAST_RE = re.compile(r"^ckpt_last_(\d{8,})\.pt$")
_BEST_RE = re.compile(r"^ckpt_best_(\d{8,})_(-?\d+\.\d{6})\.pt$")


class CheckpointKind(StrEnum):
    LAST = "last"
    BEST = "best"


def format_metric(value: float) -> str:
    """The metric as names print it: 6 decimals, and never ``-0.000000`` (a value that rounds to zero is zero)."""
    text = f"{value:.6f}"
    return "0.000000" if text == "-0.000000" else text


@dataclass(frozen=True, order=False)
class CheckpointName:
    """A parsed checkpoint name. ``metric`` is the value printed in a best name (None for last).

    Two names are equal only when their file names are: ``-0.000000`` (which older versions wrote) and
    ``0.000000`` hold equal values but are two files, each its own checkpoint in discovery and rotation.
    """

    kind: CheckpointKind
    iter_num: int
    metric: float | None = field(default=None, compare=False)
    metric_text: str | None = field(default=None, repr=False)
    """The metric as the file name spells it (None for last); set from ``metric`` when not given."""

    def __post_init__(self) -> None:
        if self.metric_text is None and self.metric is not None:
            object.__setattr__(self, "metric_text", format_metric(self.metric))

    @classmethod
    def last(cls, iter_num: int) -> CheckpointName:
        return cls(CheckpointKind.LAST, _check_iter(iter_num))

    @classmethod
    def best(cls, iter_num: int, metric: float) -> CheckpointName:
        if not math.isfinite(metric):
            raise CheckpointNameError(f"a best checkpoint needs a finite metric, got {metric!r}")
        # the metric as the name prints it, so a name made here equals the same name parsed from a listing
        name = cls(CheckpointKind.BEST, _check_iter(iter_num), float(format_metric(metric)))
        if len(name.filename.encode()) > MAX_NAME_BYTES:
            raise CheckpointNameError(
                f"metric {metric!r} makes a file name longer than {MAX_NAME_BYTES} bytes; "
                "save a metric of a sensible magnitude"
            )
        return name

    @property
    def filename(self) -> str:
        if self.kind is CheckpointKind.LAST:
            return f"ckpt_last_{self.iter_num:08d}.pt"
        assert self.metric_text is not None
        return f"ckpt_best_{self.iter_num:08d}_{self.metric_text}.pt"

    @classmethod
    def parse(cls, filename: str) -> CheckpointName:
        """Parse a name that must be a checkpoint's; anything else raises CheckpointNameError."""
        if (match := _LAST_RE.match(filename)) is not None:
            parsed = cls(CheckpointKind.LAST, int(match.group(1)))
        elif (match := _BEST_RE.match(filename)) is not None:
            parsed = cls(CheckpointKind.BEST, int(match.group(1)), float(match.group(2)), match.group(2))
        else:
            raise CheckpointNameError(
                f"{filename!r} starts with {CHECKPOINT_PREFIX!r} but is not a checkpoint name "
                "(ckpt_last_NNNNNNNN.pt or ckpt_best_NNNNNNNN_METRIC.pt); move it out of the run location"
            )
        if parsed.filename != filename:
            raise CheckpointNameError(
                f"{filename!r} is not in canonical form (expected {parsed.filename!r}); move it out of the run location"
            )
        return parsed


def is_checkpoint_like(filename: str) -> bool:
    """Files of other tools are left alone; anything starting with ``ckpt_`` must parse."""
    return filename.startswith(CHECKPOINT_PREFIX)


def _check_iter(iter_num: int) -> int:
    if isinstance(iter_num, bool) or not isinstance(iter_num, int) or iter_num < 0:
        raise CheckpointNameError(f"iteration must be an int >= 0, got {iter_num!r}")
    return iter_num


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as listed: its parsed name plus what the store knows of it.

    A sharded checkpoint (a manifest and its part objects) lists its parts' names, its world size (read from
    them) and as ``size`` the manifest's and parts' bytes together; a single file has no parts.
    """

    name: CheckpointName
    size: int
    modified: datetime | None
    parts: tuple[str, ...] = ()
    world_size: int | None = None

    @property
    def sharded(self) -> bool:
        return bool(self.parts)

    @property
    def filename(self) -> str:
        return self.name.filename

    @property
    def kind(self) -> CheckpointKind:
        return self.name.kind

    @property
    def iter_num(self) -> int:
        return self.name.iter_num
