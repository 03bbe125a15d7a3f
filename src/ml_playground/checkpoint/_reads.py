"""Reads that survive rotation: what a missing file means, and a chosen checkpoint chosen again.

A reader lists, chooses (latest or best) and then opens; a writer in another process may rotate the
chosen file away in between (DESIGN.md, "Readers"). A load of a *chosen* checkpoint that finds it gone
chooses again from a fresh listing, :data:`ATTEMPTS` times in all, then fails with advice. A load of an
explicitly named file that is gone is :class:`~ml_playground.errors.CheckpointRotatedAwayError` (a newer
one of its kind exists) or :class:`~ml_playground.errors.CheckpointNotFoundError`: the caller asked for
that file, so no other is read in its place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

from ml_playground.checkpoint._naming import CheckpointInfo, CheckpointName, is_checkpoint_like
from ml_playground.errors import CheckpointNotFoundError, CheckpointRotatedAwayError

__all__ = ["ATTEMPTS", "load_chosen", "rotated_away_if_missing"]

logger = logging.getLogger(__name__)

ATTEMPTS = 3
"""Choices a load of a chosen checkpoint makes before it gives up on a location that rotates faster than it reads."""

T = TypeVar("T")
Policy = Literal["latest", "best"]


def load_chosen(
    url: str,
    policy: Policy,
    choose: Callable[[Policy], CheckpointInfo],
    load: Callable[[str], T],
    on_choose: Callable[[CheckpointInfo], None] | None = None,
) -> tuple[CheckpointInfo, T]:
    """``load`` the checkpoint ``choose(policy)`` picks; chosen again while rotation deletes each choice first."""
    missed: list[str] = []
    for _ in range(ATTEMPTS):
        info = choose(policy)
        if on_choose is not None:
            on_choose(info)
        try:
            return info, load(info.filename)
        except CheckpointNotFoundError:
            missed.append(info.filename)
            logger.info("%s/%s was rotated away before it was read; choosing again", url, info.filename)
    raise CheckpointRotatedAwayError(
        f"could not read the {policy} checkpoint of {url}: rotation deleted each of {ATTEMPTS} choices "
        f"({', '.join(missed)}) before it was read. Keep more checkpoints there (a larger "
        "train.runtime.checkpointing.keep.last or keep.best), or read a best checkpoint "
        "(read_policy 'best'), which rotation replaces only when the metric improves"
    )


@contextlib.contextmanager
def rotated_away_if_missing(
    url: str, filename: str, checkpoints: Callable[[], list[CheckpointInfo]]
) -> Iterator[CheckpointName | None]:
    """Yields ``filename``'s parsed name (None for a copy such as ``model.pt``); a missing file (in ``url``)
    leaves as "rotated away" when a newer checkpoint of its kind exists, else as plainly not found
    (``checkpoints`` lists the location afresh)."""
    name = CheckpointName.parse(filename) if is_checkpoint_like(filename) else None
    try:
        yield name
    except CheckpointNotFoundError:
        source = f"{url}/{filename}"
        if name is None:
            raise CheckpointNotFoundError(f"no file {source}") from None
        newer = [info for info in checkpoints() if info.kind is name.kind and info.iter_num > name.iter_num]
        if newer:
            raise CheckpointRotatedAwayError(
                f"{source} was rotated away or never written: a newer {name.kind.value} checkpoint, "
                f"{newer[0].filename}, is there; load that one"
            ) from None
        raise CheckpointNotFoundError(f"no checkpoint {source}") from None
