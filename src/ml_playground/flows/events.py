"""What the flows report while they run. Flows emit these; the CLI renders them (bars, lines); a library
user passes a callback of their own, or gets them logged to the run's logger.

The flows never print and never draw: every word a run says to its user is an :class:`Event`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CheckpointReport",
    "Event",
    "EventSink",
    "Fetching",
    "Note",
    "Started",
    "Stepped",
    "Transferred",
    "log_events",
]


@dataclass(frozen=True)
class Note:
    """A line for the user: what the run did or decided (a save, an evaluation, a warning)."""

    text: str


@dataclass(frozen=True)
class Started:
    """Training steps begin: ``initial`` of ``total`` iterations are done."""

    total: int
    initial: int


@dataclass(frozen=True)
class Stepped:
    """One training step finished with this batch loss."""

    iteration: int
    loss: float


@dataclass(frozen=True)
class Fetching:
    """A checkpoint is being read from a remote location (``size`` bytes in the store, when known)."""

    url: str
    size: int | None


@dataclass(frozen=True)
class Transferred:
    """``done`` of ``total`` bytes of ``what`` are copied (a ``ckpt cp`` of a large file)."""

    what: str
    done: int
    total: int


@dataclass(frozen=True)
class CheckpointReport:
    """``eval --follow`` reports one checkpoint of the run it follows.

    ``metric`` is the metric saved in the checkpoint (a rotated-away best one: its name's), ``eval_loss``
    and ``train_loss`` what evaluating it gave now (None when it was not read). ``status``: ``evaluated``,
    ``rotated_away`` (gone before it was read: not an error) or ``corrupt`` (``error`` says why; the follow
    then fails). A last and a best checkpoint of one iteration hold one state: it is evaluated once and
    reported for both, the second with ``same_state_as`` naming the first.
    """

    name: str
    kind: str
    iter_num: int
    metric: float | None
    eval_loss: float | None
    train_loss: float | None
    status: Literal["evaluated", "rotated_away", "corrupt"]
    same_state_as: str | None = None
    error: str | None = None


Event = Note | Started | Stepped | Fetching | Transferred | CheckpointReport
EventSink = Callable[[Event], None]


def log_events(logger: logging.Logger) -> EventSink:
    """A sink that logs notes and fetches at INFO and steps at DEBUG (a flow's default sink)."""

    def sink(event: Event) -> None:
        if isinstance(event, Note):
            logger.info("%s", event.text)
        elif isinstance(event, Fetching):
            logger.info("fetching %s", event.url)
        elif isinstance(event, Stepped):
            logger.debug("iteration %d: loss %.4f", event.iteration, event.loss)
        elif isinstance(event, CheckpointReport):
            logger.info("%s: %s, eval loss %s", event.name, event.status, event.eval_loss)

    return sink
