"""Hypothesis state machine: random save_last / save_best / reopen / load / lease sequences keep the invariants.

It runs on every store as part of the manager contract (tests/manager_contract.py).

With the writer lease held the manager works from its own view of the location instead of a fresh
listing; the invariants below always check against a fresh listing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ml_playground.checkpoint import CheckpointKind, CheckpointManager, KeepPolicy, Lease, open_store
from ml_playground.errors import CheckpointError
from ml_playground.locations import LocalLocation, Location
from tests.conftest import make_checkpoint

_METRICS = st.sampled_from([0.5, 1.0, 1.25, 2.0, 3.5])


class ManagerMachine(RuleBasedStateMachine):
    """Runs on the store of a fresh location from ``fresh_location`` (default: a new local directory)."""

    def __init__(self, fresh_location: Callable[[], Location] | None = None) -> None:
        super().__init__()
        self.fresh_location = fresh_location or _fresh_local_directory

    @initialize(last=st.integers(0, 3), best=st.integers(0, 3), mode=st.sampled_from(["min", "max"]))
    def setup(self, last: int, best: int, mode: str) -> None:
        self.location = self.fresh_location()
        self.keep = KeepPolicy(last=last, best=best)
        self.mode = mode
        self.iteration = 0
        self.saved = {CheckpointKind.LAST: 0, CheckpointKind.BEST: 0}
        self.best_metrics: list[tuple[float, int]] = []
        self.newest_saved: int | None = None
        self.lease: Lease | None = None
        self._open()

    def _open(self) -> None:
        self._release()
        self.manager = CheckpointManager(open_store(self.location, create=True), self.keep, self.mode)  # type: ignore[arg-type]

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def teardown(self) -> None:
        self._release()
        if isinstance(getattr(self, "location", None), LocalLocation):
            shutil.rmtree(self.location.path, ignore_errors=True)

    @precondition(lambda self: self.lease is None and self.manager.supports_writer_lease)
    @rule()
    def acquire_lease(self) -> None:
        self.lease = self.manager.acquire_writer()

    @precondition(lambda self: self.newest_saved is not None and self.newest_saved > 0 and self.keep.last > 0)
    @rule()
    def save_back_in_time_is_refused(self) -> None:
        with pytest.raises(CheckpointError, match="never goes back in time"):
            self.manager.save_last(make_checkpoint(iter_num=0))

    @rule(step=st.integers(0, 3))
    def save_last(self, step: int) -> None:
        self.iteration += step
        if self.manager.save_last(make_checkpoint(iter_num=self.iteration)) is not None:
            self.saved[CheckpointKind.LAST] += 1
            self.newest_saved = self.iteration
        self.iteration += 1  # a name is never written twice

    @rule(step=st.integers(0, 3), metric=_METRICS)
    def save_best(self, step: int, metric: float) -> None:
        self.iteration += step
        if self.manager.save_best(make_checkpoint(iter_num=self.iteration, best_val_loss=metric)) is not None:
            self.saved[CheckpointKind.BEST] += 1
            self.best_metrics.append((metric, self.iteration))
            self.newest_saved = self.iteration
        self.iteration += 1

    @rule()
    def reopen(self) -> None:
        self._open()

    @precondition(lambda self: self.newest_saved is not None)
    @rule()
    def load_latest(self) -> None:
        assert self.manager.load_latest().iter_num == self.newest_saved

    @invariant()
    def keep_counts_hold(self) -> None:
        if not hasattr(self, "manager"):
            return
        listed = self.manager.checkpoints()
        for kind in CheckpointKind:
            count = sum(1 for info in listed if info.kind is kind)
            assert count == min(self.keep.of(kind), self.saved[kind]), (kind, count)

    @invariant()
    def best_survivors_include_the_just_written_and_the_best(self) -> None:
        if not hasattr(self, "manager") or not self.best_metrics or self.keep.best == 0:
            return
        survivors = {info.iter_num for info in self.manager.checkpoints() if info.kind is CheckpointKind.BEST}
        assert self.best_metrics[-1][1] in survivors
        sign = 1 if self.mode == "min" else -1
        ranked = sorted(self.best_metrics[:-1], key=lambda mi: (sign * mi[0], -mi[1]))
        assert {it for _, it in ranked[: self.keep.best - 1]} <= survivors


def _fresh_local_directory() -> Location:
    return LocalLocation(path=Path(tempfile.mkdtemp(prefix="mlp-stateful-")))
