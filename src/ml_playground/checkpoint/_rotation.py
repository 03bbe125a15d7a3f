"""Rotation as a pure function: which stored checkpoints to delete after a save. No I/O here."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ml_playground.checkpoint._naming import CheckpointKind, CheckpointName

MetricMode = Literal["min", "max"]

__all__ = ["KeepPolicy", "MetricMode", "best_first", "improves", "newest_first", "to_delete"]


@dataclass(frozen=True)
class KeepPolicy:
    """How many of each kind survive; 0 means that kind is never written."""

    last: int = 1
    best: int = 1

    def __post_init__(self) -> None:
        for kind in ("last", "best"):
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"keep.{kind} must be an int >= 0, got {value!r}")

    def of(self, kind: CheckpointKind) -> int:
        return self.last if kind is CheckpointKind.LAST else self.best


def newest_first(names: Iterable[CheckpointName]) -> list[CheckpointName]:
    return sorted(names, key=lambda n: (n.iter_num, n.filename), reverse=True)


def best_first(names: Iterable[CheckpointName], mode: MetricMode) -> list[CheckpointName]:
    """Best metric first; among equal metrics the newer one first."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(names, key=lambda n: (sign * (n.metric or 0.0), -n.iter_num, n.filename))


def to_delete(
    stored: Iterable[CheckpointName],
    keep: KeepPolicy,
    mode: MetricMode,
    protect: CheckpointName | None = None,
) -> list[CheckpointName]:
    """The checkpoints to delete so that ``min(keep, n)`` of each kind remain.

    ``last`` keeps the highest iterations, ``best`` the best metrics. ``protect`` (the checkpoint just
    written) is never deleted and counts towards its kind's quota.
    """
    stored = list(stored)
    doomed: list[CheckpointName] = []
    for kind in CheckpointKind:
        of_kind = [n for n in stored if n.kind is kind]
        ranked = newest_first(of_kind) if kind is CheckpointKind.LAST else best_first(of_kind, mode)
        quota = keep.of(kind)
        if protect is not None and protect in ranked:
            ranked.remove(protect)
            quota = max(quota - 1, 0)
        doomed.extend(ranked[quota:])
    return sorted(doomed, key=lambda n: (n.kind.value, n.iter_num, n.metric or 0.0, n.filename))


def improves(value: float, best: float, mode: MetricMode) -> bool:
    """Whether ``value`` strictly beats ``best``; NaN and infinities never improve."""
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value < best if mode == "min" else value > best
