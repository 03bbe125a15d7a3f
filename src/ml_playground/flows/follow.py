"""Following a live run (``eval --follow``): every checkpoint that appears is evaluated once, in order.

One listing per poll. The checkpoints it holds that were not seen before are taken in iteration order
(a last before a best of the same iteration), read (weights only), evaluated by the caller's
``evaluate`` and reported as :class:`~ml_playground.flows.events.CheckpointReport` events. A last and a
best of one iteration hold one state: it is evaluated once and reported for both. A checkpoint listed
but gone when it is read was rotated away: reported, not an error. A corrupt one is reported, then its
error is raised. A location that does not exist yet is waited for.

The follow ends (DESIGN.md, "eval --follow") after the checkpoint at the run's ``max_iters`` (read from
the config saved in the checkpoints; the last one there, or the best one for a run that keeps no last
ones); at ``until`` (inclusive: once a checkpoint past it is listed, or the one that ends it is reported);
when the writer lease (stores that have one) was released or expired before a listing whose checkpoints
are then all reported, and the run was seen (a checkpoint, or the lease held); or after ``idle_timeout``
seconds without a new checkpoint (0: never).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ml_playground.checkpoint import CheckpointInfo, CheckpointKind, CheckpointManager, ModelWeights, open_store
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointSchemaError,
    CheckpointVersionError,
    UnsafeCheckpointError,
)
from ml_playground.flows.events import CheckpointReport, EventSink, Note, log_events
from ml_playground.locations import Location

__all__ = ["Evaluator", "FollowResult", "FollowSettings", "follow"]

logger = logging.getLogger(__name__)

Evaluator = Callable[[ModelWeights, str], Mapping[str, float]]
"""Evaluates a checkpoint's weights (read from the URL given second): losses by name, ``val_loss`` at least."""
Ending = Literal["max_iters", "until", "lease", "idle"]
_DAMAGED = (CheckpointCorruptError, CheckpointSchemaError, CheckpointVersionError, UnsafeCheckpointError)


@dataclass(frozen=True)
class FollowSettings:
    """``poll``: seconds between listings; ``until``: the last iteration to evaluate (inclusive);
    ``idle_timeout``: seconds without a new checkpoint before the follow ends (0: never)."""

    poll: float = 10.0
    until: int | None = None
    idle_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not self.poll > 0:
            raise ValueError(f"poll must be > 0 seconds, got {self.poll!r}")
        if self.until is not None and self.until < 0:
            raise ValueError(f"until must be an iteration >= 0, got {self.until!r}")
        if not self.idle_timeout >= 0:
            raise ValueError(f"idle_timeout must be >= 0 seconds (0: never), got {self.idle_timeout!r}")


@dataclass(frozen=True)
class FollowResult:
    """Why the follow ended and what it reported, in order."""

    url: str
    ending: Ending
    reports: list[CheckpointReport] = field(default_factory=list)


@dataclass(frozen=True)
class _State:
    """One evaluated state: the report of the checkpoint that was read, and its saved run settings."""

    report: CheckpointReport
    max_iters: int | None
    keeps_last: bool


class _Follower:
    def __init__(self, location: Location, evaluate: Evaluator, settings: FollowSettings, emit: EventSink) -> None:
        self.location = location
        self.evaluate = evaluate
        self.settings = settings
        self.emit = emit
        self.seen: set[str] = set()
        self.states: dict[int, _State] = {}
        self.reports: list[CheckpointReport] = []
        self.run_seen = False

    def poll(self, manager: CheckpointManager) -> tuple[Ending | None, bool]:
        """One listing and its new checkpoints: why to stop (or None), and whether any were new."""
        lease_state = manager.store.capabilities.lease_state
        lease = lease_state() if lease_state is not None else None  # before the listing: see the docstring
        listed = manager.checkpoints()
        new = sorted(
            (info for info in listed if info.filename not in self.seen),
            key=lambda info: (info.iter_num, info.kind is CheckpointKind.BEST),  # a last before a best
        )
        self.run_seen = self.run_seen or bool(listed) or lease == "held"
        for iteration in sorted({info.iter_num for info in new}):
            if self.settings.until is not None and iteration > self.settings.until:
                return "until", True
            ending = self._take(manager, [info for info in new if info.iter_num == iteration])
            if ending is not None:
                return ending, True
        if lease in ("released", "expired") and self.run_seen:
            self.emit(Note(f"the writer lease of {manager.store.url} is {lease} and every checkpoint is reported"))
            return "lease", bool(new)
        return None, bool(new)

    def _take(self, manager: CheckpointManager, infos: list[CheckpointInfo]) -> Ending | None:
        """Report the new checkpoints of one iteration (last first); whether the follow ends with them."""
        ends: Ending | None = None
        for info in infos:
            self.seen.add(info.filename)
            state = self.states.get(info.iter_num)
            if state is not None:  # the other kind of an iteration already evaluated: the same state
                first = state.report
                self._report(info, first.metric, first.eval_loss, first.train_loss, "evaluated", same_as=first.name)
            else:
                state = self._evaluate(manager, info)
                if state is None:
                    continue
            final = info.kind is CheckpointKind.LAST or not state.keeps_last  # nothing else comes at this iteration
            if final and state.max_iters is not None and info.iter_num >= state.max_iters:
                self.emit(Note(f"{info.filename} is at the run's max_iters ({state.max_iters}): the run is complete"))
                ends = "max_iters"
            elif final and info.iter_num == self.settings.until:
                ends = ends or "until"
        return ends

    def _evaluate(self, manager: CheckpointManager, info: CheckpointInfo) -> _State | None:
        source = f"{manager.store.url}/{info.filename}"
        try:
            weights = manager.load_weights(info.filename)
            losses = self.evaluate(weights, source)
        except CheckpointNotFoundError:
            self._report(info, info.name.metric, None, None, "rotated_away")
            return None
        except _DAMAGED as exc:
            self._report(info, info.name.metric, None, None, "corrupt", error=str(exc))
            raise
        report = self._report(info, weights.best_val_loss, losses["val_loss"], losses.get("train_loss"), "evaluated")
        max_iters = _setting(weights.config, ("train", "runtime", "max_iters"))
        keep_last = _setting(weights.config, ("train", "runtime", "checkpointing", "keep", "last"))
        state = _State(report, max_iters, keep_last != 0)
        self.states[info.iter_num] = state
        return state

    def _report(
        self,
        info: CheckpointInfo,
        metric: float | None,
        eval_loss: float | None,
        train_loss: float | None,
        status: Literal["evaluated", "rotated_away", "corrupt"],
        *,
        same_as: str | None = None,
        error: str | None = None,
    ) -> CheckpointReport:
        report = CheckpointReport(
            info.filename, info.kind.value, info.iter_num, metric, eval_loss, train_loss, status, same_as, error
        )
        self.reports.append(report)
        self.emit(report)
        return report


def follow(
    location: Location,
    evaluate: Evaluator,
    *,
    settings: FollowSettings | None = None,
    mode: Literal["min", "max"] = "min",
    on_event: EventSink | None = None,
) -> FollowResult:
    """Evaluate every checkpoint of the run in ``location`` as it appears, until the run ends (module docstring).

    Reports go to ``on_event`` (default: this module's logger). ``mode`` ranks best checkpoints as the
    run does. Ctrl-C (KeyboardInterrupt) stops it at once; the caller decides what that means.
    """
    settings = settings or FollowSettings()
    emit = on_event or log_events(logger)
    follower = _Follower(location, evaluate, settings, emit)
    manager: CheckpointManager | None = None
    last_news = time.monotonic()
    told_waiting = False
    while True:
        if manager is None:
            manager = _opened(location, mode)
            if manager is None and not told_waiting:
                emit(Note(f"waiting for {location} to appear"))
                told_waiting = True
        if manager is not None:
            ending, news = follower.poll(manager)
            if news:
                last_news = time.monotonic()
            if ending is not None:
                return FollowResult(manager.store.url, ending, follower.reports)
        idle = time.monotonic() - last_news
        if settings.idle_timeout and idle >= settings.idle_timeout:
            emit(Note(f"no new checkpoint in {location} for {idle:.0f} s (idle timeout): stopping"))
            return FollowResult(str(location), "idle", follower.reports)
        time.sleep(settings.poll)


def _opened(location: Location, mode: Literal["min", "max"]) -> CheckpointManager | None:
    """The location's manager; None while the location does not exist yet (waited for)."""
    try:
        return CheckpointManager(open_store(location), mode=mode)
    except CheckpointNotFoundError:
        return None


def _setting(config: Mapping[str, object], keys: tuple[str, ...]) -> int | None:
    """An integer setting of the run, from the config saved in its checkpoint (None if absent)."""
    value: object = config
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
