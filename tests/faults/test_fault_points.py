"""Deterministic faults: fail the N-th write / fsync / close / rename / directory fsync of a save.

For every operation a save makes, for every N of it, and for ENOSPC, EIO and EXDEV: the save raises a
StorageError naming the file, nothing appears under the final name, no temporary is left behind, the
earlier checkpoints are intact, and a failed fsync is never retried.
"""

from __future__ import annotations

import errno
import gc
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore
from ml_playground.errors import StorageError
from tests.faults._faulty_ops import ERRNOS, FaultyOps
from tests.faults._support import audit_all_load, big_checkpoint, temporaries

SAVE_OPERATIONS = ("open", "write", "fsync", "close", "rename_no_replace", "fsync_dir")
KEEP = KeepPolicy(last=2, best=1)


@pytest.fixture(scope="module")
def calls_per_save(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """How often one save of the test checkpoint calls each operation (measured, not assumed)."""
    ops = FaultyOps()
    manager = CheckpointManager(LocalStore(tmp_path_factory.mktemp("count") / "run", create=True, file_ops=ops))
    manager.save_last(big_checkpoint(1))
    return dict(ops.counts)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run holding two earlier checkpoints (iterations 0 and 1)."""
    path = tmp_path / "run"
    manager = CheckpointManager(LocalStore(path, create=True), KEEP)
    for iter_num in (0, 1):
        manager.save_last(big_checkpoint(iter_num))
    return path


def test_a_save_makes_every_operation_at_least_once(calls_per_save: dict[str, int]) -> None:
    assert all(calls_per_save.get(op, 0) >= 1 for op in SAVE_OPERATIONS), calls_per_save
    assert calls_per_save["write"] >= 3, "a multi-MB save should take several writes"
    # docs/reliability.md quotes these: 12 fault points x 3 errors = 36 failed saves
    assert {op: calls_per_save.get(op, 0) for op in SAVE_OPERATIONS} == {
        "open": 1,
        "write": 7,
        "fsync": 1,
        "close": 1,
        "rename_no_replace": 1,
        "fsync_dir": 1,
    }
    assert len(ERRNOS) == 3


@pytest.mark.parametrize("code_name", sorted(ERRNOS))
@pytest.mark.parametrize("operation", SAVE_OPERATIONS)
def test_every_failed_operation_fails_the_save_cleanly(
    run: Path, calls_per_save: dict[str, int], operation: str, code_name: str
) -> None:
    before = sorted(p.name for p in run.iterdir())
    points = calls_per_save[operation]
    for nth in range(1, points + 1):
        ops = FaultyOps(operation, nth, ERRNOS[code_name])
        manager = CheckpointManager(LocalStore(run, file_ops=ops), KEEP)
        target = run / "ckpt_last_00000002.pt"
        with pytest.raises(StorageError) as caught:
            manager.save_last(big_checkpoint(2))
        gc.collect()  # a stream left half-flushed would complain here, at collection
        where = f"{operation} #{nth}/{points} {code_name}"
        assert ops.fired, where
        assert str(target) in str(caught.value), where
        if ERRNOS[code_name] == errno.ENOSPC:
            assert "no space left" in str(caught.value), where
        assert not target.exists(), where
        assert temporaries(run) == [], where
        assert "unlink" not in ops.calls, f"{where}: a failed save must not rotate"
        if operation == "fsync":
            assert ops.counts["fsync"] == nth, f"{where}: a failed fsync was retried"
            assert "rename_no_replace" not in ops.calls, f"{where}: renamed after a failed fsync"
        names, problems = audit_all_load(run)
        assert problems == [], where
        assert sorted(p.name for p in run.iterdir()) == before, where
        assert [n.iter_num for n in names] == [1, 0], where


def test_the_save_after_a_failed_one_succeeds(run: Path) -> None:
    failing = CheckpointManager(LocalStore(run, file_ops=FaultyOps("write", 2, errno.EIO)), KEEP)
    with pytest.raises(StorageError):
        failing.save_last(big_checkpoint(2))
    manager = CheckpointManager(LocalStore(run), KEEP)
    manager.save_last(big_checkpoint(2))
    names, problems = audit_all_load(run)
    assert problems == []
    assert [n.filename for n in names] == ["ckpt_last_00000002.pt", "ckpt_last_00000001.pt"]


def test_early_writeback_runs_once_per_16_mib(tmp_path: Path) -> None:
    ops = FaultyOps()
    with LocalStore(tmp_path, file_ops=ops).write("ckpt_last_00000001.pt") as stream:
        for _ in range(40):
            stream.write(bytes(1 << 20))
    assert ops.counts["start_writeback"] == 2  # after 16 and 32 MiB: the two calls failed below


@pytest.mark.parametrize("nth", [1, 2])
def test_a_failed_early_writeback_fails_the_save_cleanly(run: Path, nth: int) -> None:
    # start_writeback (sync_file_range) runs once per 16 MiB written: a 40 MiB object calls it twice.
    ops = FaultyOps("start_writeback", nth, errno.EIO)
    store = LocalStore(run, file_ops=ops)
    with pytest.raises(StorageError, match="ckpt_last_00000002.pt"), store.write("ckpt_last_00000002.pt") as stream:
        for _ in range(40):
            stream.write(bytes(1 << 20))
    assert ops.fired
    assert not (run / "ckpt_last_00000002.pt").exists()
    assert temporaries(run) == []
    _, problems = audit_all_load(run)
    assert problems == []
