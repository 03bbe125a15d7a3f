"""``eval --follow``'s flow (issue 15, item 2): each checkpoint once, in order; the ways it ends; rotated-away,
corrupt and missing locations; the reader's view of the writer lease (``lease_state``).

The flow runs here with a small evaluator of its own (the mean of the weights) so that the end conditions
are quick to check; ``tests/test_follow_cli.py`` follows a real training run through the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, LocalStore, ModelWeights, StoredObject
from ml_playground.checkpoint.stores.local import lease_state
from ml_playground.errors import CheckpointCorruptError
from ml_playground.flows.events import CheckpointReport, Event, Note
from ml_playground.flows.follow import FollowResult, FollowSettings, follow
from ml_playground.locations import LocalLocation, Location
from tests.conftest import make_checkpoint

FAST = FollowSettings(poll=0.02, idle_timeout=20)


def run_checkpoint(iteration: int, *, max_iters: int = 100, keep_last: int = 1) -> Checkpoint:
    """A checkpoint of a run whose saved config says ``max_iters`` and ``keep.last``; metric 100 - iteration."""
    config = {"train": {"runtime": {"max_iters": max_iters, "checkpointing": {"keep": {"last": keep_last}}}}}
    return dataclasses.replace(make_checkpoint(iteration, 100.0 - iteration, seed=iteration), config=config)


class Evaluations:
    """The evaluator the flow is given: records what it read; the "loss" is the mean of the weights."""

    def __init__(self, side_effect: Callable[[ModelWeights], None] | None = None) -> None:
        self.sources: list[str] = []
        self._side_effect = side_effect

    def __call__(self, weights: ModelWeights, source: str) -> Mapping[str, float]:
        self.sources.append(source)
        if self._side_effect is not None:
            self._side_effect(weights)
        mean = float(sum(t.float().mean() for t in weights.model.values()))
        return {"val_loss": mean, "train_loss": mean + 1}


def _follow(
    location: Location, evaluate: Evaluations, settings: FollowSettings = FAST
) -> tuple[FollowResult, list[Event]]:
    events: list[Event] = []
    result = follow(location, evaluate, settings=settings, on_event=events.append)
    return result, events


def _reports(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.name, e.status) for e in events if isinstance(e, CheckpointReport)]


def _writer(path: Path, last: int = 1, best: int = 1) -> CheckpointManager:
    return CheckpointManager(LocalStore(path, create=True), KeepPolicy(last=last, best=best))


def _save(manager: CheckpointManager, iteration: int, *, best: bool = True, **run: int) -> None:
    checkpoint = run_checkpoint(iteration, **run)
    if best:
        manager.save_best(checkpoint)  # the trainer's order at one iteration: best, then last
    manager.save_last(checkpoint)


@contextlib.contextmanager
def in_background(work: Callable[[], None]) -> Iterator[None]:
    """Run ``work`` (another process's writes) in a thread while the block follows; its failure fails the test."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(30)
    assert not failures, failures


def test_each_checkpoint_once_in_order_a_last_and_a_best_of_one_iteration_evaluated_once(run_dir: Path) -> None:
    writer = _writer(run_dir, last=10, best=10)
    for iteration in (0, 10, 20):
        _save(writer, iteration, max_iters=20)
    evaluations = Evaluations()
    result, events = _follow(LocalLocation(path=run_dir), evaluations)
    assert result.ending == "max_iters"
    assert _reports(events) == [
        ("ckpt_last_00000000.pt", "evaluated"),
        ("ckpt_best_00000000_100.000000.pt", "evaluated"),
        ("ckpt_last_00000010.pt", "evaluated"),
        ("ckpt_best_00000010_90.000000.pt", "evaluated"),
        ("ckpt_last_00000020.pt", "evaluated"),
        ("ckpt_best_00000020_80.000000.pt", "evaluated"),
    ]
    assert len(evaluations.sources) == 3  # one state per iteration
    reports = [e for e in events if isinstance(e, CheckpointReport)]
    assert reports[1].same_state_as == "ckpt_last_00000000.pt"
    assert reports[1].eval_loss == reports[0].eval_loss
    assert [r.metric for r in reports] == [100.0, 100.0, 90.0, 90.0, 80.0, 80.0]
    assert reports[0].eval_loss != reports[2].eval_loss


def test_a_best_at_max_iters_listed_before_its_last_waits_for_the_last(run_dir: Path) -> None:
    """The trainer writes a best before the last of the same iteration: the follow ends with the last."""
    writer = _writer(run_dir)
    lease = writer.acquire_writer()
    writer.save_best(run_checkpoint(20, max_iters=20))

    def then_the_last() -> None:
        time.sleep(0.3)
        writer.save_last(run_checkpoint(20, max_iters=20))
        lease.release()

    with in_background(then_the_last):
        result, events = _follow(LocalLocation(path=run_dir), Evaluations())
    assert result.ending == "max_iters"
    assert _reports(events) == [
        ("ckpt_best_00000020_80.000000.pt", "evaluated"),
        ("ckpt_last_00000020.pt", "evaluated"),
    ]


def test_a_run_that_keeps_no_last_checkpoints_ends_with_its_best_at_max_iters(run_dir: Path) -> None:
    writer = _writer(run_dir, last=0)
    writer.save_best(run_checkpoint(20, max_iters=20, keep_last=0))
    result, events = _follow(LocalLocation(path=run_dir), Evaluations())
    assert result.ending == "max_iters"
    assert _reports(events) == [("ckpt_best_00000020_80.000000.pt", "evaluated")]


def test_until_is_inclusive_and_nothing_after_it_is_read(run_dir: Path) -> None:
    writer = _writer(run_dir, last=10, best=10)
    for iteration in (0, 10, 20, 30):
        _save(writer, iteration, best=iteration != 10)
    evaluations = Evaluations()
    result, events = _follow(LocalLocation(path=run_dir), evaluations, dataclasses.replace(FAST, until=10))
    assert result.ending == "until"
    assert [name for name, _ in _reports(events)] == [
        "ckpt_last_00000000.pt",
        "ckpt_best_00000000_100.000000.pt",
        "ckpt_last_00000010.pt",
    ]
    assert len(evaluations.sources) == 2


def test_until_between_checkpoints_ends_at_the_first_one_past_it(run_dir: Path) -> None:
    writer = _writer(run_dir, last=10, best=0)
    lease = writer.acquire_writer()
    for iteration in (0, 10):
        _save(writer, iteration, best=False)

    def later() -> None:
        time.sleep(0.2)
        _save(writer, 20, best=False)
        lease.release()

    with in_background(later):
        result, events = _follow(LocalLocation(path=run_dir), Evaluations(), dataclasses.replace(FAST, until=15))
    assert result.ending == "until"
    assert [name for name, _ in _reports(events)] == ["ckpt_last_00000000.pt", "ckpt_last_00000010.pt"]


def test_a_released_lease_ends_the_follow_once_every_checkpoint_is_reported(run_dir: Path) -> None:
    writer = _writer(run_dir)
    lease = writer.acquire_writer()
    _save(writer, 0)

    def train_then_stop() -> None:
        time.sleep(0.2)
        _save(writer, 10)
        _save(writer, 20)  # max_iters is 100: the run stops early (preempted, say) and releases its lease
        lease.release()

    with in_background(train_then_stop):
        result, events = _follow(LocalLocation(path=run_dir), Evaluations())
    assert result.ending == "lease"
    names = [name for name, _ in _reports(events)]
    assert names[0] == "ckpt_last_00000000.pt"
    assert set(names[-2:]) == {"ckpt_last_00000020.pt", "ckpt_best_00000020_80.000000.pt"}  # the run's newest
    assert len(names) == len(set(names))
    assert any(isinstance(e, Note) and "lease" in e.text and "released" in e.text for e in events)


def test_an_expired_lease_ends_the_follow_too(run_dir: Path) -> None:
    writer = _writer(run_dir)
    _save(writer, 0)
    _dead_writers_lease(run_dir)
    assert lease_state(run_dir) == "expired"
    result, events = _follow(LocalLocation(path=run_dir), Evaluations())
    assert result.ending == "lease"
    assert len(_reports(events)) == 2


def test_a_held_lease_keeps_the_follow_going_until_the_idle_timeout(run_dir: Path) -> None:
    writer = _writer(run_dir)
    with writer.acquire_writer():
        _save(writer, 0)
        started = time.monotonic()
        result, events = _follow(
            LocalLocation(path=run_dir), Evaluations(), dataclasses.replace(FAST, idle_timeout=0.5)
        )
        waited = time.monotonic() - started
    assert result.ending == "idle"
    assert 0.5 <= waited < 5
    assert len(_reports(events)) == 2


def test_an_idle_timeout_of_zero_never_ends_the_follow(run_dir: Path) -> None:
    writer = _writer(run_dir)
    with writer.acquire_writer() as lease:
        _save(writer, 0)

        def finish_later() -> None:
            time.sleep(1.0)  # far past any idle timeout the follow could be using
            _save(writer, 100)  # max_iters

        with in_background(finish_later):
            result, events = _follow(
                LocalLocation(path=run_dir), Evaluations(), dataclasses.replace(FAST, idle_timeout=0)
            )
        assert lease.holder.pid == os.getpid()
    assert result.ending == "max_iters"
    assert len(_reports(events)) == 4


def test_a_missing_location_is_waited_for(tmp_path: Path) -> None:
    run = tmp_path / "not-yet"

    def train_later() -> None:
        time.sleep(0.3)
        writer = _writer(run)
        with writer.acquire_writer():
            _save(writer, 0, max_iters=10)
            time.sleep(0.1)
            _save(writer, 10, max_iters=10)

    with in_background(train_later):
        result, events = _follow(LocalLocation(path=run), Evaluations())
    assert result.ending == "max_iters"
    assert isinstance(events[0], Note)
    assert events[0].text == f"waiting for {run} to appear"
    assert len(_reports(events)) == 4


def test_a_missing_location_that_never_appears_ends_at_the_idle_timeout(tmp_path: Path) -> None:
    result, events = _follow(
        LocalLocation(path=tmp_path / "never"), Evaluations(), dataclasses.replace(FAST, idle_timeout=0.3)
    )
    assert result.ending == "idle"
    assert _reports(events) == []


def test_a_checkpoint_rotated_away_before_it_is_read_is_reported_not_an_error(run_dir: Path) -> None:
    writer = _writer(run_dir, last=2, best=0)
    lease = writer.acquire_writer()
    _save(writer, 0, best=False)
    _save(writer, 10, best=False)  # the first listing holds 0 and 10
    rotated: list[bool] = []

    def while_evaluating(weights: ModelWeights) -> None:
        if not rotated:  # the writer saves twice while 0 is evaluated: keep.last = 2 rotates 0 and 10 away
            rotated.append(True)
            _save(writer, 20, best=False)
            _save(writer, 30, best=False)
            lease.release()

    evaluations = Evaluations(while_evaluating)
    result, events = _follow(LocalLocation(path=run_dir), evaluations)
    assert _reports(events) == [
        ("ckpt_last_00000000.pt", "evaluated"),
        ("ckpt_last_00000010.pt", "rotated_away"),
        ("ckpt_last_00000020.pt", "evaluated"),
        ("ckpt_last_00000030.pt", "evaluated"),
    ]
    rotated_report = [e for e in events if isinstance(e, CheckpointReport)][1]
    assert (rotated_report.eval_loss, rotated_report.metric) == (None, None)
    assert result.ending == "lease"
    assert len(evaluations.sources) == 3


def test_a_corrupt_checkpoint_is_reported_then_fails_the_follow(run_dir: Path) -> None:
    writer = _writer(run_dir, last=10, best=0)
    _save(writer, 0, best=False)
    _save(writer, 10, best=False)
    _flip_a_weight(run_dir / "ckpt_last_00000010.pt", run_checkpoint(10))
    events: list[Event] = []
    with pytest.raises(CheckpointCorruptError, match=r"ckpt_last_00000010\.pt"):
        follow(LocalLocation(path=run_dir), Evaluations(), settings=FAST, on_event=events.append)
    assert _reports(events) == [("ckpt_last_00000000.pt", "evaluated"), ("ckpt_last_00000010.pt", "corrupt")]
    corrupt = [e for e in events if isinstance(e, CheckpointReport)][-1]
    assert corrupt.error is not None
    assert "ckpt_last_00000010.pt" in corrupt.error


@pytest.mark.parametrize(
    ("settings", "problem"),
    [({"poll": 0}, "poll"), ({"until": -1}, "until"), ({"idle_timeout": -1.0}, "idle_timeout")],
)
def test_settings_are_checked(settings: dict[str, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FollowSettings(**settings)  # type: ignore[arg-type]


def test_lease_state_as_a_reader_sees_it(run_dir: Path) -> None:
    writer = _writer(run_dir)
    assert lease_state(run_dir) == "released"
    with writer.acquire_writer():
        assert lease_state(run_dir) == "held"
    assert lease_state(run_dir) == "released"
    holder = {"host": "other-host", "pid": 1, "process_start": 1, "acquired_at": "2026-01-01T00:00:00+00:00"}
    (run_dir / LEASE_FILE).write_text(json.dumps({**holder, "token": "0123"}))
    assert lease_state(run_dir, ttl=30) == "held"  # refreshed just now by its (remote) holder
    old = time.time() - 31
    os.utime(run_dir / LEASE_FILE, (old, old))
    assert lease_state(run_dir, ttl=30) == "expired"
    before = sorted(p.name for p in run_dir.iterdir())
    lease_state(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # a reader writes nothing


LEASE_FILE = ".ml_playground.lease"


def _finished_process() -> int:
    """The pid of a process that has exited (pids stay below pid_max: a lease record never names a larger one)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def _dead_writers_lease(run_dir: Path) -> None:
    """The lease of a writer on this host whose process is gone (killed without releasing)."""
    holder = {
        "host": os.uname().nodename,
        "pid": _finished_process(),
        "process_start": 1,  # and a start time no live process there has
        "acquired_at": "2026-01-01T00:00:00+00:00",
        "token": "dead",
    }
    (run_dir / LEASE_FILE).write_text(json.dumps(holder))


def _flip_a_weight(path: Path, checkpoint: Checkpoint) -> None:
    """Flip one bit inside the stored bytes of a model tensor: damage only the checksums see."""
    tensor = next(iter(checkpoint.model.values()))
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0
    data[at + 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_listing_per_poll(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll lists the location once, however many checkpoints it then reads."""
    writer = _writer(run_dir, last=10, best=10)
    lease = writer.acquire_writer()
    for iteration in (0, 10, 20):
        _save(writer, iteration)
    listings: list[float] = []
    real_list = LocalStore.list

    def counted(self: LocalStore) -> list[StoredObject]:
        listings.append(time.monotonic())
        return real_list(self)

    monkeypatch.setattr(LocalStore, "list", counted)

    def finish() -> None:
        while len(listings) < 3:  # two polls found nothing new
            time.sleep(0.01)
        _save(writer, 100)
        lease.release()

    polls = dataclasses.replace(FAST, poll=0.1)
    with in_background(finish):
        result, events = _follow(LocalLocation(path=run_dir), Evaluations(), polls)
    assert result.ending == "max_iters"
    assert len(_reports(events)) == 8
    gaps = [later - earlier for earlier, later in itertools.pairwise(listings)]
    assert len(listings) >= 4
    assert all(gap >= 0.09 for gap in gaps), gaps  # each listing is a poll of its own, --poll apart


def test_the_idle_timeout_counts_from_the_last_new_checkpoint(run_dir: Path) -> None:
    writer = _writer(run_dir, last=10, best=0)
    with writer.acquire_writer():
        _save(writer, 0, best=False)

        def slowly() -> None:
            for iteration in (10, 20, 30, 40):
                time.sleep(0.3)  # each within the idle timeout of the one before; all four take longer
                _save(writer, iteration, best=False)

        settings = dataclasses.replace(FAST, idle_timeout=0.8)
        started = time.monotonic()
        with in_background(slowly):
            result, events = _follow(LocalLocation(path=run_dir), Evaluations(), settings)
        took = time.monotonic() - started
    assert result.ending == "idle"
    assert [name for name, _ in _reports(events)][-1] == "ckpt_last_00000040.pt"
    assert took >= 1.2 + 0.8
