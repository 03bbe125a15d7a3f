"""The manager contract: what every store must give the CheckpointManager, run through the manager itself.

A store's test class subclasses ``ManagerContract`` and provides ``fresh_location`` (a factory of new,
empty locations of that store) and ``lease_expected`` (whether the store declares a writer lease).
Saves, rotation with metrics that do not improve monotonically, loads, weights-only loads, the async
saver, the declared capabilities and the Hypothesis state machine all run on every store.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from ml_playground.checkpoint import (
    AsyncCheckpointSaver,
    CheckpointKind,
    CheckpointManager,
    KeepPolicy,
    open_store,
)
from ml_playground.errors import CheckpointNotFoundError, LocationLockedError
from ml_playground.locations import Location
from tests.conftest import assert_same_checkpoint, make_checkpoint
from tests.manager_machine import ManagerMachine

LocationFactory = Callable[[], Location]

UNSORTED_METRICS = [3.0, 1.0, 2.0, 0.5, 1.5]
"""Best metrics in save order that do not improve monotonically (every one is saved as a best)."""


def _manager(location: Location, last: int = 1, best: int = 1, mode: str = "min") -> CheckpointManager:
    return CheckpointManager(open_store(location, create=True), KeepPolicy(last=last, best=best), mode)  # type: ignore[arg-type]


def _names(manager: CheckpointManager, kind: CheckpointKind) -> list[int]:
    return sorted(info.iter_num for info in manager.checkpoints() if info.kind is kind)


class ManagerContract:
    lease_expected: bool = False
    machine_settings = settings(
        max_examples=6, stateful_step_count=8, deadline=None, suppress_health_check=list(HealthCheck)
    )

    @pytest.fixture
    def fresh_location(self) -> LocationFactory:
        raise NotImplementedError

    def test_last_rotation_keeps_exactly_the_newest(self, fresh_location: LocationFactory) -> None:
        manager = _manager(fresh_location(), last=2, best=0)
        for iteration in range(0, 50, 10):
            manager.save_last(make_checkpoint(iteration))
            assert _names(manager, CheckpointKind.LAST) == list(range(max(0, iteration - 10), iteration + 1, 10))

    @pytest.mark.parametrize("mode", ["min", "max"])
    def test_best_rotation_keeps_the_just_written_and_the_best_of_unsorted_metrics(
        self, fresh_location: LocationFactory, mode: str
    ) -> None:
        manager = _manager(fresh_location(), last=0, best=2, mode=mode)
        sign = 1 if mode == "min" else -1
        saved: list[tuple[float, int]] = []
        for index, metric in enumerate(UNSORTED_METRICS):
            iteration = 10 * (index + 1)
            manager.save_best(make_checkpoint(iteration, best_val_loss=metric))
            saved.append((metric, iteration))
            best_other = sorted(saved[:-1], key=lambda mi: (sign * mi[0], -mi[1]))[:1]
            expected = sorted({iteration, *(it for _, it in best_other)})
            assert _names(manager, CheckpointKind.BEST) == expected, (mode, metric)
        # the best-ranked checkpoint is the best metric, not the newest file
        best = manager.best()
        assert best is not None
        assert best.name.metric == (min if mode == "min" else max)(UNSORTED_METRICS)

    def test_loads_give_back_what_was_saved(self, fresh_location: LocationFactory) -> None:
        location = fresh_location()
        writer = _manager(location, last=2, best=1)
        first, second = make_checkpoint(1, 2.0, ema=True), make_checkpoint(2, 1.0, seed=1, ema=True)
        writer.save_best(first)
        writer.save_last(second)
        reader = CheckpointManager(open_store(location))
        assert_same_checkpoint(reader.load_latest(), second)
        assert_same_checkpoint(reader.load_best(), first)
        weights = reader.load_weights("ckpt_last_00000002.pt")
        assert weights.ema is not None
        assert second.ema is not None
        for key, tensor in second.model.items():
            assert torch.equal(weights.model[key], tensor)
            assert torch.equal(weights.ema[key], second.ema[key])
        reader.verify("ckpt_best_00000001_2.000000.pt")

    @pytest.mark.parametrize(("last", "best"), [(0, 1), (1, 0), (0, 0)])
    def test_keep_zero_writes_nothing_of_that_kind(self, fresh_location: LocationFactory, last: int, best: int) -> None:
        manager = _manager(fresh_location(), last=last, best=best)
        manager.save_last(make_checkpoint(0))
        manager.save_best(make_checkpoint(0, 1.0))
        assert len(_names(manager, CheckpointKind.LAST)) == last
        assert len(_names(manager, CheckpointKind.BEST)) == best

    def test_async_saves_leave_what_synchronous_saves_leave(self, fresh_location: LocationFactory) -> None:
        sync, background = _manager(fresh_location(), last=2), _manager(fresh_location(), last=2)
        checkpoints = [make_checkpoint(i, best_val_loss=m) for i, m in enumerate([2.0, 3.0, 1.0])]
        with AsyncCheckpointSaver(background) as saver:
            for checkpoint in checkpoints:
                sync.save_best(checkpoint)
                sync.save_last(checkpoint)
                saver.save_best(checkpoint)
                saver.save_last(checkpoint)
        assert [i.filename for i in background.checkpoints()] == [i.filename for i in sync.checkpoints()]
        assert_same_checkpoint(background.load_latest(), checkpoints[-1])

    def test_capabilities_do_what_they_declare(self, fresh_location: LocationFactory) -> None:
        location = fresh_location()
        manager = _manager(location)
        manager.save_last(make_checkpoint(3))
        name = "ckpt_last_00000003.pt"
        data = _read(manager, name)
        capabilities = manager.store.capabilities
        assert (capabilities.writer_lease is not None) == self.lease_expected
        assert manager.supports_writer_lease == self.lease_expected
        if capabilities.local_path is not None:
            assert capabilities.local_path(name).read_bytes() == data
            with pytest.raises(CheckpointNotFoundError):
                capabilities.local_path("ckpt_last_00000099.pt")
        if capabilities.local_copy is not None:
            with capabilities.local_copy(name) as copy:
                assert copy is None or copy.read_bytes() == data
        if capabilities.partial_copy is not None:
            with capabilities.partial_copy(name) as partial:
                assert partial is not None
                assert partial.size == len(data)
                partial.fetch([(0, 100), (len(data) - 50, len(data))])
                fetched = partial.path.read_bytes()
                assert fetched[:100] == data[:100]
                assert fetched[-50:] == data[-50:]
                assert fetched[100:-50] == bytes(len(data) - 150)  # never fetched: a hole
        assert (capabilities.lease_state is not None) == self.lease_expected
        if self.lease_expected:
            assert capabilities.lease_state is not None
            assert capabilities.lease_state() == "released"  # never taken
            with manager.acquire_writer():
                with pytest.raises(LocationLockedError):
                    _manager(location).acquire_writer()
                manager.save_last(make_checkpoint(4))  # the holder saves
                assert CheckpointManager(open_store(location)).store.capabilities.lease_state() == "held"  # type: ignore[misc]
            assert capabilities.lease_state() == "released"  # given up
            _manager(location).acquire_writer().release()  # released: the next writer takes it

    def test_the_state_machine_keeps_every_invariant(self, fresh_location: LocationFactory) -> None:
        run_state_machine_as_test(lambda: ManagerMachine(fresh_location), settings=self.machine_settings)


def _read(manager: CheckpointManager, name: str) -> bytes:
    with manager.store.open(name) as stream:
        return stream.read()
