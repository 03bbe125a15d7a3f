"""Rotation failures: a failed delete raises after the new checkpoint is committed, the next save
retries the rotation, and nothing the keep policy keeps is ever deleted."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore
from ml_playground.errors import StorageError
from tests.conftest import make_checkpoint
from tests.faults._faulty_ops import FaultyOps


def _files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def _fill(run: Path, iters: range) -> None:
    manager = CheckpointManager(LocalStore(run, create=True), KeepPolicy(last=len(iters), best=len(iters)))
    for i in iters:
        checkpoint = make_checkpoint(i, best_val_loss=10.0 - i)
        manager.save_best(checkpoint)
        manager.save_last(checkpoint)


def test_a_failed_delete_raises_after_the_new_checkpoint_is_committed(run_dir: Path) -> None:
    _fill(run_dir, range(1))
    ops = FaultyOps("unlink", 1, errno.EIO)
    manager = CheckpointManager(LocalStore(run_dir, file_ops=ops), KeepPolicy(last=1, best=1))

    with pytest.raises(StorageError) as caught:
        manager.save_last(make_checkpoint(1, best_val_loss=9.0))
    message = str(caught.value)
    assert f"{run_dir}/ckpt_last_00000001.pt was saved, but rotation failed" in message
    assert str(run_dir / "ckpt_last_00000000.pt") in message
    assert "retries" in message
    assert manager.load("ckpt_last_00000001.pt").iter_num == 1
    assert "ckpt_last_00000000.pt" in _files(run_dir)


def test_the_next_save_retries_the_rotation(run_dir: Path) -> None:
    _fill(run_dir, range(1))
    keep = KeepPolicy(last=1, best=1)
    failing = CheckpointManager(LocalStore(run_dir, file_ops=FaultyOps("unlink", 1, errno.EIO)), keep)
    with pytest.raises(StorageError):
        failing.save_last(make_checkpoint(1, best_val_loss=9.0))

    CheckpointManager(LocalStore(run_dir), keep).save_last(make_checkpoint(2, best_val_loss=8.0))
    assert _files(run_dir) == ["ckpt_best_00000000_10.000000.pt", "ckpt_last_00000002.pt"]


def test_rotate_alone_retries_a_failed_rotation(run_dir: Path) -> None:
    _fill(run_dir, range(3))
    keep = KeepPolicy(last=1, best=1)
    failing = CheckpointManager(LocalStore(run_dir, file_ops=FaultyOps("unlink", 1, errno.EIO)), keep)
    with pytest.raises(StorageError):
        failing.rotate()
    assert len(_files(run_dir)) == 6
    CheckpointManager(LocalStore(run_dir), keep).rotate()
    assert _files(run_dir) == ["ckpt_best_00000002_8.000000.pt", "ckpt_last_00000002.pt"]


def test_the_sweep_below_has_seven_deletes_due(run_dir: Path) -> None:
    _fill(run_dir, range(4))
    ops = FaultyOps()  # counts only
    CheckpointManager(LocalStore(run_dir, file_ops=ops), KeepPolicy(last=1, best=1)).save_best(
        make_checkpoint(4, best_val_loss=1.0)
    )
    assert ops.counts["unlink"] == 7


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.EROFS])
@pytest.mark.parametrize("nth", range(1, 8))
def test_a_delete_failing_at_any_point_never_deletes_what_the_policy_keeps(run_dir: Path, nth: int, code: int) -> None:
    # Four of each kind under keep 4, then a best save under keep 1: seven deletes are due after it commits
    # (last 0-2 and best 0-3); the 1st..7th of them fails.
    _fill(run_dir, range(4))
    before = set(_files(run_dir))
    kept = {"ckpt_best_00000004_1.000000.pt", "ckpt_last_00000003.pt"}
    ops = FaultyOps("unlink", nth, code)
    manager = CheckpointManager(LocalStore(run_dir, file_ops=ops), KeepPolicy(last=1, best=1))

    with pytest.raises(StorageError, match="rotation failed"):
        manager.save_best(make_checkpoint(4, best_val_loss=1.0))
    assert ops.fired
    assert ops.counts["unlink"] == nth, "rotation went on deleting after a failed delete"
    after = set(_files(run_dir))
    assert kept <= after, "a checkpoint the policy keeps was deleted"
    assert len(before - after) == nth - 1
    for info in manager.checkpoints():
        assert manager.load(info.filename).iter_num == info.iter_num

    CheckpointManager(LocalStore(run_dir), KeepPolicy(last=1, best=1)).save_last(make_checkpoint(5, best_val_loss=2.0))
    assert _files(run_dir) == ["ckpt_best_00000004_1.000000.pt", "ckpt_last_00000005.pt"]
