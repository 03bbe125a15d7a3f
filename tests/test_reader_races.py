"""Readers never trip on rotation (issue 15, item 3): a chosen checkpoint that rotation deletes between the
listing and the read is chosen again, three attempts in all; a named file that is gone stays an error.

The race is made deterministic here: a store wrapper lets "the writer" save a newer checkpoint and rotate
the one about to be read away, right when the reader opens it. The real race between two processes is
``tests/test_reader_stress.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO

import pytest
import torch

from ml_playground.checkpoint import (
    Capabilities,
    CheckpointManager,
    CheckpointStore,
    KeepPolicy,
    LocalStore,
    StoredObject,
)
from ml_playground.errors import CheckpointNotFoundError, CheckpointRotatedAwayError
from ml_playground.flows import sampling
from ml_playground.locations import LocalLocation
from tests.conftest import make_checkpoint


class RacingStore:
    """A store over ``inner`` that calls ``before_read(name)`` each time a checkpoint is about to be read."""

    def __init__(self, inner: LocalStore, before_read: Callable[[str], None]) -> None:
        self._inner = inner
        self._before_read = before_read
        self.reads: list[str] = []

    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(local_path=self._local_path)

    def _local_path(self, name: str) -> Path:
        self._reading(name)
        return self._inner.local_path(name)

    def _reading(self, name: str) -> None:
        self.reads.append(name)
        self._before_read(name)

    @contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        self._reading(name)
        with self._inner.open(name) as stream:
            yield stream

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return self._open(name)

    def write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return self._inner.write(name)

    def list(self) -> list[StoredObject]:
        return self._inner.list()

    def delete(self, name: str) -> None:
        self._inner.delete(name)


class Writer:
    """The other process: saves the next checkpoint (last and best) with keep = 1 of each, on demand."""

    def __init__(self, path: Path) -> None:
        self.manager = CheckpointManager(LocalStore(path, create=True), KeepPolicy(last=1, best=1))
        self.iteration = 0
        self.save()

    def save(self) -> None:
        checkpoint = make_checkpoint(self.iteration, best_val_loss=100.0 - self.iteration, seed=self.iteration)
        self.manager.save_best(checkpoint)
        self.manager.save_last(checkpoint)
        self.iteration += 1


def _reader(path: Path, writer: Writer, races: int) -> tuple[CheckpointManager, RacingStore]:
    """A reader whose first ``races`` reads each lose the race: the writer saves (and rotates) first."""
    left = [races]

    def before_read(name: str) -> None:
        if left[0] > 0:
            left[0] -= 1
            writer.save()

    store = RacingStore(LocalStore(path), before_read)
    checkpoint_store: CheckpointStore = store
    return CheckpointManager(checkpoint_store), store


@pytest.mark.parametrize("races", [1, 2])
@pytest.mark.parametrize("policy", ["latest", "best"])
def test_a_chosen_checkpoint_rotated_away_before_its_read_is_chosen_again(
    run_dir: Path, policy: str, races: int
) -> None:
    writer = Writer(run_dir)
    reader, store = _reader(run_dir, writer, races)
    loaded = reader.load_latest() if policy == "latest" else reader.load_best()
    assert loaded.iter_num == races  # the writer's newest, read on attempt races + 1
    expected = make_checkpoint(races, best_val_loss=100.0 - races, seed=races)
    assert loaded.model.keys() == expected.model.keys()
    assert all(torch.equal(loaded.model[key], tensor) for key, tensor in expected.model.items())
    assert len(store.reads) == races + 1


@pytest.mark.parametrize("policy", ["latest", "best"])
def test_weights_of_a_chosen_checkpoint_are_chosen_again_too(run_dir: Path, policy: str) -> None:
    writer = Writer(run_dir)
    reader, store = _reader(run_dir, writer, 2)
    chosen, weights = reader.load_chosen_weights(policy)  # type: ignore[arg-type]
    assert (chosen.iter_num, weights.iter_num) == (2, 2)
    assert chosen.kind.value == ("last" if policy == "latest" else "best")
    assert len(store.reads) == 3


def test_three_lost_races_give_a_clear_error(run_dir: Path) -> None:
    writer = Writer(run_dir)
    reader, store = _reader(run_dir, writer, 10)
    with pytest.raises(CheckpointRotatedAwayError) as caught:
        reader.load_latest()
    message = str(caught.value)
    assert len(store.reads) == 3
    for name in ("ckpt_last_00000000.pt", "ckpt_last_00000001.pt", "ckpt_last_00000002.pt"):
        assert name in message
    assert "keep.last" in message
    assert "best" in message
    assert str(run_dir) in message


def test_on_choose_is_told_every_choice(run_dir: Path) -> None:
    writer = Writer(run_dir)
    reader, _ = _reader(run_dir, writer, 1)
    told: list[str] = []
    chosen, checkpoint = reader.load_chosen("latest", on_choose=lambda info: told.append(info.filename))
    assert told == ["ckpt_last_00000000.pt", "ckpt_last_00000001.pt"]
    assert chosen.filename == "ckpt_last_00000001.pt"
    assert checkpoint.iter_num == 1


def test_a_named_file_rotated_away_is_never_replaced_by_another(run_dir: Path) -> None:
    writer = Writer(run_dir)
    reader, store = _reader(run_dir, writer, 1)
    with pytest.raises(CheckpointRotatedAwayError, match=r"ckpt_last_00000000\.pt was rotated away"):
        reader.load("ckpt_last_00000000.pt")
    with pytest.raises(CheckpointRotatedAwayError, match=r"ckpt_last_00000000\.pt was rotated away"):
        reader.load_weights("ckpt_last_00000000.pt")
    assert store.reads == ["ckpt_last_00000000.pt"] * 2  # one read per call: no second choice


def test_a_chosen_file_deleted_with_nothing_newer_is_not_found(run_dir: Path) -> None:
    writer = Writer(run_dir)

    def delete_everything(name: str) -> None:
        for obj in writer.manager.store.list():
            writer.manager.store.delete(obj.name)

    reader = CheckpointManager(RacingStore(LocalStore(run_dir), delete_everything))
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in") as caught:
        reader.load_latest()
    assert not isinstance(caught.value, CheckpointRotatedAwayError)


def test_sample_and_eval_choose_again(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sampling.load_checkpoint`` (what ``sample`` and ``eval`` read through) uses the manager's retry."""
    writer = Writer(run_dir)
    reads: list[str] = []

    def racing_open_store(location: object, *, create: bool = False) -> RacingStore:
        left = [2]

        def before_read(name: str) -> None:
            reads.append(name)
            if left[0] > 0:
                left[0] -= 1
                writer.save()

        return RacingStore(LocalStore(run_dir), before_read)

    monkeypatch.setattr(sampling, "open_store", racing_open_store)
    weights, source = sampling.load_checkpoint(LocalLocation(path=run_dir), policy="best")
    assert weights.iter_num == 2
    assert source == f"{run_dir}/ckpt_best_00000002_98.000000.pt"
    assert len(reads) == 3


def test_a_file_deleted_while_the_directory_is_listed_is_not_listed(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotation in another process may delete a file between reading the directory and its stat: the
    listing leaves it out instead of failing ("cannot list ...: No such file or directory"). Found by the
    reader stress test."""
    writer = Writer(run_dir)
    writer.save()
    victim = "ckpt_last_00000001.pt"
    real_scandir = os.scandir

    @contextmanager
    def scandir_losing_a_race(path: Path) -> Iterator[Iterator[os.DirEntry[str]]]:
        with real_scandir(path) as entries:

            def racing() -> Iterator[os.DirEntry[str]]:
                for entry in entries:
                    if entry.name == victim:
                        os.unlink(entry.path)  # read from the directory, gone before its stat
                    yield entry

            yield racing()

    monkeypatch.setattr(os, "scandir", scandir_losing_a_race)
    names = [obj.name for obj in LocalStore(run_dir).list()]
    assert victim not in names
    assert "ckpt_best_00000001_99.000000.pt" in names
