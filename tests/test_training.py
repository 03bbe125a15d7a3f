"""The training loop in-process: save order, file names, keep = 0, resume rules, what a checkpoint holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import CheckpointManager, LocalStore
from ml_playground.config import ExperimentConfig
from ml_playground.config_loader import load_experiment
from ml_playground.errors import CheckpointCorruptError, CheckpointError, ConfigError, LocationLockedError
from ml_playground.flows.events import Event, Note
from ml_playground.flows.train_state import plain_config
from ml_playground.flows.training import train
from ml_playground.workload.model import GPT, GPTArgs
from tests.cli_support import assert_same_state, ckpt_names, flip_tensor_byte
from tests.conftest import make_checkpoint

TINY = {
    "train.model.n_layer": 1,
    "train.model.n_head": 2,
    "train.model.n_embd": 16,
    "train.model.block_size": 16,
    "train.data.batch_size": 4,
    "train.data.corpus_chars": 20000,
    "train.runtime.eval_iters": 2,
    "train.runtime.log_interval": 1000,
}


def config(tmp_path: Path, **values: object) -> ExperimentConfig:
    """The bundled experiment, tiny, writing to ``tmp_path/out/tiny_chars``; keys as in ``--set``."""
    overrides: dict[str, object] = dict(TINY)
    for key, value in values.items():
        dotted = key.replace("__", ".")
        overrides[dotted if dotted.startswith(("train.", "sample.")) else f"train.runtime.{dotted}"] = value
    return load_experiment("tiny_chars", overrides=overrides, cwd=tmp_path)


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "out" / "tiny_chars"


def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(LocalStore(run_dir(tmp_path)))


def test_interval_and_keep_leave_exactly_the_newest_last_checkpoints(tmp_path: Path) -> None:
    result = train(
        config(tmp_path, max_iters=40, checkpointing__interval=10, checkpointing__keep__last=2, eval_interval=1000)
    )
    # the only evaluation is at iteration 0: one best file, then last files rotated down to two
    assert ckpt_names(run_dir(tmp_path)) == [
        f"ckpt_best_00000000_{result.best_metric:.6f}.pt",
        "ckpt_last_00000030.pt",
        "ckpt_last_00000040.pt",
    ]
    assert result.end_iter == 40


def test_the_first_checkpoint_is_the_initialized_model_before_any_step(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_iters=3, checkpointing__keep__last=10, seed=7)
    train(cfg)
    first = manager(tmp_path).load("ckpt_last_00000000.pt")
    torch.manual_seed(7)
    fresh = GPT(GPTArgs.from_plain(first.model_args, source="test"))
    for key, value in fresh.state_dict().items():
        assert torch.equal(first.model[key], value), key
    assert first.optimizer["state"] == {}
    assert first.data_state["batches_drawn"] == 0
    assert first.config["train"]["runtime"]["max_iters"] == 3  # type: ignore[index]


def test_a_checkpoint_at_i_holds_the_state_after_evaluation_and_before_step_i(tmp_path: Path) -> None:
    train(config(tmp_path, max_iters=10, eval_interval=5, checkpointing__interval=5, checkpointing__keep__last=5))
    m = manager(tmp_path)
    assert [i.filename for i in m.checkpoints() if i.kind.value == "last"] == [
        "ckpt_last_00000010.pt",
        "ckpt_last_00000005.pt",
        "ckpt_last_00000000.pt",
    ]
    for info in m.checkpoints():
        ckpt = m.load(info.filename)
        assert ckpt.data_state["batches_drawn"] == info.iter_num
        assert math.isfinite(ckpt.best_val_loss)  # evaluated before saved, also at 0


def test_best_checkpoints_follow_strict_improvement(tmp_path: Path) -> None:
    result = train(config(tmp_path, max_iters=20, eval_interval=5, checkpointing__keep__best=10))
    bests = [i for i in manager(tmp_path).checkpoints() if i.kind.value == "best"]
    metrics = [i.name.metric for i in sorted(bests, key=lambda i: i.iter_num)]
    assert metrics == sorted(metrics, reverse=True)  # each saved best beats the previous one
    assert len(set(metrics)) == len(metrics)
    assert bests[0].name.metric == pytest.approx(result.best_metric, abs=1e-6)


def test_keep_last_zero_makes_the_best_at_iteration_zero_the_first_checkpoint(tmp_path: Path) -> None:
    train(config(tmp_path, max_iters=10, eval_interval=5, checkpointing__keep__last=0, checkpointing__keep__best=5))
    names = ckpt_names(run_dir(tmp_path))
    assert names
    assert all(n.startswith("ckpt_best_") for n in names)
    assert names[0].startswith("ckpt_best_00000000_")


def test_keep_best_zero_writes_no_best(tmp_path: Path) -> None:
    train(
        config(
            tmp_path, max_iters=10, checkpointing__interval=5, checkpointing__keep__last=1, checkpointing__keep__best=0
        )
    )
    assert ckpt_names(run_dir(tmp_path)) == ["ckpt_last_00000010.pt"]


def _notes(events: list[Event]) -> list[str]:
    return [event.text for event in events if isinstance(event, Note)]


def test_keep_both_zero_writes_nothing_and_says_so(tmp_path: Path) -> None:
    events: list[Event] = []
    cfg = config(tmp_path, max_iters=5, checkpointing__keep__last=0, checkpointing__keep__best=0)
    result = train(cfg, on_event=events.append)
    assert "writes no checkpoints" in _notes(events)[0]
    assert ckpt_names(run_dir(tmp_path)) == []
    assert result.checkpoints == []


def test_max_iters_at_or_below_the_resumed_iteration_is_nothing_to_do(tmp_path: Path) -> None:
    train(config(tmp_path, max_iters=6))
    before = ckpt_names(run_dir(tmp_path))
    for max_iters in (6, 3):
        events: list[Event] = []
        result = train(config(tmp_path, max_iters=max_iters), on_event=events.append)
        assert result.nothing_to_do
        assert any("nothing to do" in note for note in _notes(events))
    assert ckpt_names(run_dir(tmp_path)) == before


def test_resume_continues_and_matches_an_uninterrupted_run_in_process(tmp_path: Path) -> None:
    common = {"eval_interval": 4, "checkpointing__interval": 4, "ema_decay": 0.9, "train__model__dropout": 0.1}
    train(config(tmp_path / "a", max_iters=13, **common))
    train(config(tmp_path / "b", max_iters=7, **common))
    resumed = train(config(tmp_path / "b", max_iters=13, **common))
    assert resumed.start_iter == 7
    assert ckpt_names(run_dir(tmp_path / "a")) == ckpt_names(run_dir(tmp_path / "b"))
    assert_same_state(manager(tmp_path / "a").load_latest(), manager(tmp_path / "b").load_latest())


def test_resuming_from_an_earlier_checkpoint_than_the_latest_is_an_error(tmp_path: Path) -> None:
    train(config(tmp_path, max_iters=15, eval_interval=10, checkpointing__interval=5))
    with pytest.raises(CheckpointError, match="never goes back in time"):
        train(config(tmp_path, max_iters=30, eval_interval=10, checkpointing__read_policy="best"))


def test_a_corrupt_checkpoint_at_resume_is_an_error_naming_it(tmp_path: Path) -> None:
    train(config(tmp_path, max_iters=4))
    latest = run_dir(tmp_path) / "ckpt_last_00000004.pt"
    flip_tensor_byte(latest)
    with pytest.raises(CheckpointCorruptError, match="ckpt_last_00000004.pt"):
        train(config(tmp_path, max_iters=8))


def test_resume_with_a_different_model_is_a_config_error(tmp_path: Path) -> None:
    train(config(tmp_path, max_iters=2))
    with pytest.raises(ConfigError, match="train.model.n_embd"):
        train(config(tmp_path, max_iters=4, train__model__n_embd=32))


def test_an_unknown_metric_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="accuracy"):
        train(config(tmp_path, checkpointing__metric="accuracy"))


def test_the_saved_config_is_plain_data_with_secrets_masked(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_iters=1)
    train(cfg)
    saved = manager(tmp_path).load_latest().config
    assert saved == plain_config(cfg)
    assert saved["train"]["runtime"]["out_dir"]["path"] == str(run_dir(tmp_path))  # type: ignore[index]
    # a location that takes a KMS key (the loader refuses one for a local out_dir)
    secret = config(
        tmp_path,
        out_dir="s3://bucket-a/run",
        storage_options__server_side_encryption="aws:kms",
        storage_options__sse_kms_key_id="very-secret-key",
    )
    masked = plain_config(secret)
    assert "very-secret-key" not in repr(masked)
    assert masked["train"]["runtime"]["storage_options"]["sse_kms_key_id"] == "***"
    assert masked["train"]["runtime"]["out_dir"]["storage_options"]["sse_kms_key_id"] == "***"


def test_async_saves_write_the_same_checkpoints_as_synchronous_ones(tmp_path: Path) -> None:
    common = {"max_iters": 12, "eval_interval": 4, "checkpointing__interval": 4, "ema_decay": 0.9}
    train(config(tmp_path / "sync", **common))
    train(config(tmp_path / "async", checkpointing__async_save=True, **common))
    names = ckpt_names(run_dir(tmp_path / "sync"))
    assert ckpt_names(run_dir(tmp_path / "async")) == names
    for name in names:
        assert_same_state(manager(tmp_path / "sync").load(name), manager(tmp_path / "async").load(name))


def test_a_second_writer_on_the_same_location_is_refused(tmp_path: Path) -> None:
    run_dir(tmp_path).mkdir(parents=True)
    with CheckpointManager(LocalStore(run_dir(tmp_path))).acquire_writer(), pytest.raises(LocationLockedError):
        train(config(tmp_path, max_iters=2))
    assert ckpt_names(run_dir(tmp_path)) == []
    train(config(tmp_path, max_iters=2))  # released: the next run writes
    assert ckpt_names(run_dir(tmp_path)) != []


def test_take_over_is_the_explicit_way_past_a_live_writer(tmp_path: Path) -> None:
    run_dir(tmp_path).mkdir(parents=True)
    old = CheckpointManager(LocalStore(run_dir(tmp_path)))
    with old.acquire_writer():
        train(config(tmp_path, max_iters=2), take_over=True)
        assert ckpt_names(run_dir(tmp_path)) != []
        with pytest.raises(LocationLockedError):  # the writer that lost the lease stops at its next save
            old.save_last(make_checkpoint(iter_num=99))
