"""AsyncCheckpointSaver: one rule per test, with faults and timing gates injected through FileOps."""

from __future__ import annotations

import dataclasses
import errno
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import (
    AsyncCheckpointSaver,
    Checkpoint,
    CheckpointManager,
    FileOps,
    KeepPolicy,
    LocalStore,
    SyncCheckpointSaver,
    open_saver,
)
from ml_playground.errors import CheckpointError, StorageError
from tests.conftest import assert_same_checkpoint, make_checkpoint


class GatedOps(FileOps):
    """Records the order of commits and deletes; can hold a save at fsync, or fail the next fsync."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next_fsync = False
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def open(self, path: Path) -> int:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        return super().open(path)

    def fsync(self, fd: int) -> None:
        assert self.gate.wait(30)
        if self.fail_next_fsync:
            self.fail_next_fsync = False
            raise OSError(errno.EIO, "injected I/O error")
        super().fsync(fd)

    def close(self, fd: int) -> None:
        with self._lock:
            self.active -= 1
        super().close(fd)

    def rename_no_replace(self, src: Path, dst: Path) -> None:
        super().rename_no_replace(src, dst)
        self.events.append(f"commit {dst.name}")

    def unlink(self, path: Path) -> None:
        self.events.append(f"delete {path.name}")
        super().unlink(path)


@pytest.fixture
def ops() -> GatedOps:
    return GatedOps()


@pytest.fixture
def manager(run_dir: Path, ops: GatedOps) -> CheckpointManager:
    return CheckpointManager(LocalStore(run_dir, create=True, file_ops=ops), KeepPolicy(last=1, best=1))


def _names(manager: CheckpointManager) -> list[str]:
    return [info.filename for info in manager.checkpoints()]


@pytest.mark.timeout(60)
def test_save_returns_before_the_write_commits(manager: CheckpointManager, ops: GatedOps) -> None:
    ops.gate.clear()
    with AsyncCheckpointSaver(manager) as saver:
        name = saver.save_last(make_checkpoint(0))
        assert name is not None
        assert _names(manager) == []  # held at fsync: not committed, yet the call returned
        ops.gate.set()
        saver.wait()
        assert _names(manager) == [name.filename]


@pytest.mark.timeout(60)
def test_caller_may_mutate_its_tensors_right_after_save_returns(manager: CheckpointManager, ops: GatedOps) -> None:
    original = make_checkpoint(0)
    model_before = {key: value.clone() for key, value in original.model.items()}
    exp_avg_before = original.optimizer["state"][0]["exp_avg"].clone()
    ops.gate.clear()
    with AsyncCheckpointSaver(manager) as saver:
        saver.save_last(original)
        for tensor in original.model.values():
            tensor.add_(1000.0)  # the training step that follows the save
        original.optimizer["state"][0]["exp_avg"].zero_()
        ops.gate.set()
    saved = manager.load_latest()
    for key, value in model_before.items():
        assert torch.equal(saved.model[key], value), key
    assert torch.equal(saved.optimizer["state"][0]["exp_avg"], exp_avg_before)


@pytest.mark.timeout(60)
def test_a_background_save_keeps_every_field(run_dir: Path) -> None:
    # a snapshot once rebuilt the checkpoint field by field and dropped world_size (a torchrun run's async
    # save recorded world size 1, so its rank 1 resumed as a new rank)
    manager = CheckpointManager(LocalStore(run_dir, create=True))
    state = dataclasses.replace(make_checkpoint(4, ema=True), world_size=2)
    with AsyncCheckpointSaver(manager) as saver:
        saver.save_last(state)
    loaded = manager.load_latest()
    assert_same_checkpoint(loaded, state)
    assert loaded.world_size == 2


@pytest.mark.timeout(60)
def test_reused_snapshot_memory_never_leaks_into_an_earlier_file(run_dir: Path) -> None:
    manager = CheckpointManager(LocalStore(run_dir, create=True), KeepPolicy(last=3, best=0))
    state = make_checkpoint(0)
    weights = []
    with AsyncCheckpointSaver(manager) as saver:
        for i in range(3):
            state = Checkpoint(**{**vars(state), "iter_num": i})
            weights.append(state.model["0.weight"].clone())
            saver.save_last(state)
            state.model["0.weight"].add_(1.0)
    for i in range(3):
        assert torch.equal(manager.load(f"ckpt_last_{i:08d}.pt").model["0.weight"], weights[i])


@pytest.mark.timeout(60)
def test_never_two_saves_in_flight_and_never_rotation_before_commit(manager: CheckpointManager, ops: GatedOps) -> None:
    with AsyncCheckpointSaver(manager) as saver:
        for i in range(4):
            saver.save_last(make_checkpoint(i * 10))
    assert ops.max_active == 1
    assert _names(manager) == ["ckpt_last_00000030.pt"]
    for i in range(1, 4):
        assert ops.events.index(f"commit ckpt_last_{i * 10:08d}.pt") < ops.events.index(
            f"delete ckpt_last_{(i - 1) * 10:08d}.pt"
        )


@pytest.mark.timeout(60)
def test_background_failure_surfaces_at_the_next_call(manager: CheckpointManager, ops: GatedOps) -> None:
    saver = AsyncCheckpointSaver(manager)
    saver.save_last(make_checkpoint(0))
    saver.wait()
    ops.fail_next_fsync = True
    saver.save_last(make_checkpoint(10))  # fails in the background
    with pytest.raises(StorageError, match="injected I/O error"):
        saver.save_last(make_checkpoint(20))
    assert _names(manager) == ["ckpt_last_00000000.pt"]  # the earlier checkpoint is intact
    saver.save_last(make_checkpoint(30))  # the error was reported once; saving works again
    saver.close()
    assert _names(manager) == ["ckpt_last_00000030.pt"]


@pytest.mark.timeout(60)
def test_background_failure_surfaces_at_close(manager: CheckpointManager, ops: GatedOps) -> None:
    saver = AsyncCheckpointSaver(manager)
    ops.fail_next_fsync = True
    saver.save_last(make_checkpoint(0))
    with pytest.raises(StorageError):
        saver.close()
    saver.close()  # idempotent, and the error is not raised twice
    with pytest.raises(CheckpointError, match="closed"):
        saver.save_last(make_checkpoint(1))


def _ctrl_c_after(seconds: float) -> None:
    """Deliver SIGINT to the main thread (where Python raises KeyboardInterrupt) after ``seconds``."""
    threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()


@pytest.mark.timeout(60)
def test_a_save_interrupted_while_waiting_still_waits_next_time(run_dir: Path, ops: GatedOps) -> None:
    # Ctrl-C while the next save waits for the held one; the handler then saves again. That save must
    # still wait, not snapshot into the memory the first save is writing (it once did: a mixed file).
    manager = CheckpointManager(LocalStore(run_dir, create=True, file_ops=ops), KeepPolicy(last=3, best=0))
    first = make_checkpoint(0)
    first_weights = {key: value.clone() for key, value in first.model.items()}
    saver = AsyncCheckpointSaver(manager)
    ops.gate.clear()
    saver.save_last(first)
    _ctrl_c_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        saver.save_last(make_checkpoint(10))
    threading.Timer(0.3, ops.gate.set).start()
    saver.save_last(make_checkpoint(20))
    saver.close()
    assert ops.max_active == 1
    assert sorted(_names(manager)) == ["ckpt_last_00000000.pt", "ckpt_last_00000020.pt"]
    saved = manager.load("ckpt_last_00000000.pt")
    assert all(torch.equal(saved.model[key], value) for key, value in first_weights.items())


@pytest.mark.timeout(60)
def test_a_close_interrupted_while_waiting_leaves_the_saver_open_and_the_error_raised(
    manager: CheckpointManager, ops: GatedOps
) -> None:
    saver = AsyncCheckpointSaver(manager)
    ops.gate.clear()
    ops.fail_next_fsync = True
    saver.save_last(make_checkpoint(0))
    _ctrl_c_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        saver.close()
    ops.gate.set()
    with pytest.raises(StorageError, match="injected I/O error"):
        saver.close()  # waits again: the failure is raised, not dropped
    with pytest.raises(CheckpointError, match="closed"):
        saver.save_last(make_checkpoint(1))


@pytest.mark.timeout(60)
def test_a_save_whose_thread_cannot_start_fails_and_leaves_nothing_to_wait_for(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    saver = AsyncCheckpointSaver(manager)
    with monkeypatch.context() as patch:

        def at_thread_limit(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        patch.setattr(threading.Thread, "start", at_thread_limit)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            saver.save_last(make_checkpoint(0))
    saver.wait()  # returns: the save never ran (it used to wait forever)
    saver.save_last(make_checkpoint(10))
    saver.close()
    assert _names(manager) == ["ckpt_last_00000010.pt"]


@pytest.mark.timeout(60)
def test_background_failure_is_attached_to_the_callers_exception(manager: CheckpointManager, ops: GatedOps) -> None:
    ops.fail_next_fsync = True
    with pytest.raises(KeyError) as caught, AsyncCheckpointSaver(manager) as saver:
        saver.save_last(make_checkpoint(0))
        raise KeyError("training failed")
    assert any("background checkpoint save failed" in note for note in caught.value.__notes__)


def test_synchronous_checks_stay_synchronous(run_dir: Path) -> None:
    manager = CheckpointManager(LocalStore(run_dir, create=True), KeepPolicy(last=0, best=1))
    with AsyncCheckpointSaver(manager) as saver:
        assert saver.save_last(make_checkpoint(0)) is None
        with pytest.raises(CheckpointError, match="finite metric"):
            saver.save_best(make_checkpoint(0, best_val_loss=float("nan")))
        name = saver.save_best(make_checkpoint(0, best_val_loss=0.5))
    assert name is not None
    assert _names(manager) == [name.filename]


def test_open_saver_follows_the_async_switch(run_dir: Path) -> None:
    manager = CheckpointManager(LocalStore(run_dir, create=True))
    assert isinstance(open_saver(manager, async_save=False), SyncCheckpointSaver)
    saver = open_saver(manager, async_save=True)
    assert isinstance(saver, AsyncCheckpointSaver)
    saver.close()


@pytest.mark.timeout(60)
def test_process_exit_waits_for_the_in_flight_save(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from ml_playground.checkpoint import AsyncCheckpointSaver, CheckpointManager, FileOps, LocalStore
        from tests.conftest import assert_same_checkpoint, make_checkpoint

        class SlowOps(FileOps):
            def fsync(self, fd):
                time.sleep(1.5)
                super().fsync(fd)

        manager = CheckpointManager(LocalStore(Path({str(tmp_path)!r}), create=True, file_ops=SlowOps()))
        saver = AsyncCheckpointSaver(manager)
        saver.save_last(make_checkpoint(7))
        print("returned", flush=True)
        # no close(): the interpreter must still finish the save before it exits
        """
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50, cwd=Path(__file__).parent.parent
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned"
    assert time.perf_counter() - started >= 1.5
    manager = CheckpointManager(LocalStore(tmp_path))
    assert manager.load_latest().iter_num == 7
    assert torch.equal(manager.load_latest().model["0.weight"], make_checkpoint(7).model["0.weight"])
