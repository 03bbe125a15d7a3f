"""The part objects of a sharded checkpoint, named beside its manifest in the same location.

``<checkpoint name>.part-<rank:05d>-of-<world:05d>.model`` holds rank ``rank``'s shards of the model and EMA
weights, ``.optim`` its optimizer state (docs/distributed.md, "Sharded checkpoints"). A part is never a
checkpoint of its own: discovery knows it as part of its checkpoint, and a part whose manifest is absent is a
leftover of a save that did not complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ml_playground.checkpoint._naming import CheckpointName
from ml_playground.errors import CheckpointNameError

__all__ = ["PART_KINDS", "PartKind", "PartName", "is_part_like"]

PartKind = Literal["model", "optim"]
PART_KINDS: tuple[PartKind, ...] = ("model", "optim")
_PART_RE = re.compile(r"^(ckpt_.+\.pt)\.part-(\d{5,})-of-(\d{5,})\.(model|optim)$")
_PART_MARK = re.compile(r"\.pt\.part-")


@dataclass(frozen=True)
class PartName:
    """A parsed part name: the checkpoint it belongs to, the rank that wrote it, the world size, its kind."""

    checkpoint: CheckpointName
    rank: int
    world_size: int
    kind: PartKind

    @property
    def filename(self) -> str:
        return part_filename(self.checkpoint.filename, self.rank, self.world_size, self.kind)

    @classmethod
    def parse(cls, filename: str) -> PartName:
        match = _PART_RE.match(filename)
        if match is None:
            raise CheckpointNameError(
                f"{filename!r} looks like a part of a sharded checkpoint but is not one "
                "(<checkpoint>.part-RRRRR-of-WWWWW.model|optim); move it out of the run location"
            )
        kind: PartKind = "model" if match.group(4) == "model" else "optim"
        try:
            checkpoint = CheckpointName.parse(match.group(1))
        except CheckpointNameError as exc:
            raise CheckpointNameError(f"{filename!r} looks like a part of a sharded checkpoint, but: {exc}") from None
        parsed = cls(checkpoint, int(match.group(2)), int(match.group(3)), kind)
        if parsed.world_size < 1 or parsed.rank >= parsed.world_size or parsed.filename != filename:
            raise CheckpointNameError(f"{filename!r} is not a valid part name (rank, world size or form)")
        return parsed


def part_filename(checkpoint: str, rank: int, world_size: int, kind: PartKind) -> str:
    return f"{checkpoint}.part-{rank:05d}-of-{world_size:05d}.{kind}"


def is_part_like(filename: str) -> bool:
    """Whether a ``ckpt_`` name is (meant as) a part of a sharded checkpoint rather than a checkpoint."""
    return _PART_MARK.search(filename) is not None
