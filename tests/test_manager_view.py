"""With the writer lease held the manager lists once and keeps its own view; without one it lists every time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore
from ml_playground.checkpoint._store import StoredObject
from ml_playground.errors import CheckpointError, StorageError
from tests.conftest import make_checkpoint


class CountingStore(LocalStore):
    """A LocalStore (so it has a writer lease) that counts its listings and can fail its next write."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, create=True)
        self.listings = 0
        self.fail_next_write = False

    @contextlib.contextmanager
    def write(self, name: str) -> Iterator[IO[bytes]]:
        with super().write(name) as stream:
            if self.fail_next_write:
                self.fail_next_write = False
                raise StorageError(f"{self.url}/{name}: injected write failure")
            yield stream

    def list(self) -> list[StoredObject]:
        self.listings += 1
        return super().list()


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("ckpt_"))


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "run")


def test_without_a_lease_every_save_lists_before_writing_and_for_rotation(store: CountingStore) -> None:
    manager = CheckpointManager(store, KeepPolicy(last=1, best=1))
    for step in range(3):
        manager.save_last(make_checkpoint(step))
    assert store.listings == 6


def test_with_the_lease_held_the_manager_lists_once_and_rotates_from_its_view(
    store: CountingStore, tmp_path: Path
) -> None:
    manager = CheckpointManager(store, KeepPolicy(last=2, best=1))
    manager.save_last(make_checkpoint(0))  # written before the lease: the one listing must find it
    with manager.acquire_writer():
        before = store.listings
        for step in (10, 20, 30):
            manager.save_last(make_checkpoint(step))
        manager.save_best(make_checkpoint(40, best_val_loss=1.0))
        manager.save_best(make_checkpoint(50, best_val_loss=0.5))
        assert store.listings - before == 1
    assert _names(tmp_path / "run") == [
        "ckpt_best_00000050_0.500000.pt",
        "ckpt_last_00000020.pt",
        "ckpt_last_00000030.pt",
    ]


def test_the_view_still_refuses_going_back_in_time(store: CountingStore) -> None:
    manager = CheckpointManager(store, KeepPolicy(last=1, best=1))
    with manager.acquire_writer():
        manager.save_last(make_checkpoint(20))
        with pytest.raises(CheckpointError, match="never goes back in time"):
            manager.save_last(make_checkpoint(10))


def test_a_failed_save_makes_the_next_save_list_afresh(store: CountingStore, tmp_path: Path) -> None:
    manager = CheckpointManager(store, KeepPolicy(last=1, best=0))
    with manager.acquire_writer():
        manager.save_last(make_checkpoint(0))
        store.fail_next_write = True
        with pytest.raises(StorageError, match="injected"):
            manager.save_last(make_checkpoint(10))
        before = store.listings
        manager.save_last(make_checkpoint(20))
        assert store.listings - before == 1
        manager.save_last(make_checkpoint(30))
        assert store.listings - before == 1
    assert _names(tmp_path / "run") == ["ckpt_last_00000030.pt"]


def test_a_file_removed_by_hand_under_the_lease_does_not_fail_rotation(store: CountingStore, tmp_path: Path) -> None:
    manager = CheckpointManager(store, KeepPolicy(last=1, best=0))
    with manager.acquire_writer():
        manager.save_last(make_checkpoint(0))
        (tmp_path / "run" / "ckpt_last_00000000.pt").unlink()
        manager.save_last(make_checkpoint(10))  # the view still names iteration 0; rotating it finds it gone
        before = store.listings
        manager.save_last(make_checkpoint(20))
        assert store.listings - before == 1  # the stale view was dropped: listed afresh
    assert _names(tmp_path / "run") == ["ckpt_last_00000020.pt"]


def test_a_new_lease_lists_afresh(store: CountingStore) -> None:
    manager = CheckpointManager(store, KeepPolicy(last=1, best=0))
    with manager.acquire_writer():
        manager.save_last(make_checkpoint(0))
    with manager.acquire_writer():
        before = store.listings
        manager.save_last(make_checkpoint(10))
        assert store.listings - before == 1
