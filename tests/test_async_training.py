"""train.runtime.checkpointing.async_save: the trainer saves through AsyncCheckpointSaver, with the same results."""

from __future__ import annotations

from pathlib import Path

from ml_playground.checkpoint import CheckpointManager, LocalStore
from ml_playground.flows.training import train
from tests.cli_support import assert_same_state, ckpt_names
from tests.test_training import config, run_dir


def test_async_saves_write_exactly_what_sync_saves_write(tmp_path: Path) -> None:
    settings = {
        "max_iters": 30,
        "eval_interval": 10,
        "checkpointing__interval": 10,
        "checkpointing__keep__last": 2,
        "checkpointing__keep__best": 2,
    }
    sync_result = train(config(tmp_path / "sync", **settings))
    async_result = train(config(tmp_path / "async", checkpointing__async_save=True, **settings))
    names = ckpt_names(run_dir(tmp_path / "sync"))
    assert names == ckpt_names(run_dir(tmp_path / "async"))
    assert async_result.checkpoints == sync_result.checkpoints == names
    sync_manager = CheckpointManager(LocalStore(run_dir(tmp_path / "sync")))
    async_manager = CheckpointManager(LocalStore(run_dir(tmp_path / "async")))
    for name in names:
        assert_same_state(sync_manager.load(name), async_manager.load(name))
