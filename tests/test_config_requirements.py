"""The requirements text's configuration details ("Checkpointing System Requirements"), one test each.

- "Checkpoints are managed through ``RuntimeConfig.checkpointing``"; keep.last and keep.best default to 1.
- The loader "injects required runtime context (e.g., logger) prior to strict Pydantic validation".
- "Invalid or missing paths must surface as early errors during load/validation".
- "Strict failure modes, no silent failures" (a resume with another EMA decay).
- ``get_default_config_path(config_path)`` for a user's file outside the package.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointManager, LocalStore
from ml_playground.config import METRICS, ExperimentConfig, KeepConfig, RuntimeConfig, TrainRuntimeConfig
from ml_playground.config_loader import RUN_LOGGER, get_default_config_path, load, load_experiment
from ml_playground.errors import ConfigError
from ml_playground.flows.training import train
from ml_playground.locations import LocalLocation, RemoteLocation

MINIMAL = '[train.runtime]\nout_dir = "runs/a"\n'


def _write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_runtime_config_is_the_training_runtime_and_keep_defaults_to_one_of_each(tmp_path: Path) -> None:
    assert RuntimeConfig is TrainRuntimeConfig
    assert (KeepConfig().last, KeepConfig().best) == (1, 1)
    config = load(_write(tmp_path, MINIMAL))  # a user's file that sets no keep at all
    keep = config.train.runtime.checkpointing.keep
    assert (keep.last, keep.best) == (1, 1)
    assert isinstance(config.train.runtime, RuntimeConfig)


def test_a_users_file_outside_the_package_gets_the_package_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    defaults = get_default_config_path(path)
    assert defaults.name == "default_config.toml"
    assert defaults.parent.name == "experiments"
    assert tmp_path not in defaults.parents
    config = load(path)
    assert config.train.runtime.eval_interval == 50  # set only in the package's default_config.toml
    assert config.sample.sample.max_new_tokens == 200


def test_the_loader_injects_the_runs_context(tmp_path: Path) -> None:
    user = load(_write(tmp_path, MINIMAL))
    assert isinstance(user.context.logger, logging.Logger)
    assert user.context.logger.name == RUN_LOGGER
    assert user.context.config_file == tmp_path / "exp.toml"
    assert user.context.experiment is None
    bundled = load_experiment("tiny_chars", cwd=tmp_path)
    assert bundled.context.experiment == "tiny_chars"
    assert bundled.context.config_file.name == "config.toml"


@pytest.mark.parametrize(
    ("text", "overrides"),
    [
        (MINIMAL + '[context]\nexperiment = "x"\n', {}),
        (MINIMAL, {"context.experiment": "x"}),
        (MINIMAL, {"context": "x"}),
    ],
    ids=["toml-table", "set-key", "set-value"],
)
def test_the_context_cannot_be_set_from_a_file_or_set(tmp_path: Path, text: str, overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="context"):
        load(_write(tmp_path, text), overrides=overrides)


def test_the_context_is_never_dumped_nor_saved_in_a_checkpoint(tmp_path: Path) -> None:
    config = load_experiment(
        "tiny_chars",
        overrides={"train.runtime.max_iters": 0, "train.model.n_layer": 1, "train.data.corpus_chars": 20000},
        cwd=tmp_path,
    )
    assert "context" not in config.model_dump()
    assert "context" not in config.model_dump(mode="json")
    train(config)
    saved = CheckpointManager(LocalStore(tmp_path / "out" / "tiny_chars")).load_latest().config
    assert "context" not in saved
    assert str(config.context.config_file) not in str(saved)
    assert RUN_LOGGER not in str(saved)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            '[train.runtime]\nout_dir = "gs://bucket-a/run"\n[train.runtime.storage_options]\nregion = "eu"\n',
            "train.runtime.storage_options.region",
            "does not apply to gs://bucket-a/run",
        ),
        (
            '[train.runtime]\nout_dir = "s3://bucket-a/run"\n[train.runtime.storage_options]\n'
            'server_side_encryption = "AES256"\nsse_kms_key_id = "key"\n',
            "train.runtime.storage_options",
            "sse_kms_key_id needs server_side_encryption = 'aws:kms'",
        ),
        (
            MINIMAL + '[train.runtime.storage_options]\nendpoint_url = "http://127.0.0.1:9000"\n',
            "train.runtime.storage_options.endpoint_url",
            "file:// takes none",
        ),
        (
            MINIMAL + "[sample.runtime.storage_options]\nanon = true\n",
            "sample.runtime.storage_options.anon",
            "file:// takes none",
        ),
        (
            MINIMAL + '[train.runtime.checkpointing]\nmetric = "accuracy"\n',
            "train.runtime.checkpointing.metric",
            "'val_loss' or 'train_loss'",
        ),
    ],
    ids=["region-on-gs", "kms-key-without-kms", "options-on-a-local-path", "sample-options-local", "unknown-metric"],
)
def test_settings_that_cannot_work_fail_when_the_config_is_loaded(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(_write(tmp_path, text))
    assert f"{key}: " in str(raised.value)
    assert reason in str(raised.value)
    assert str(tmp_path / "exp.toml") in str(raised.value)


def test_the_metrics_are_the_configurations_list() -> None:
    assert METRICS == ("val_loss", "train_loss")


def test_sample_options_are_checked_against_the_location_actually_read(tmp_path: Path) -> None:
    # docs/cli.md: sample --from s3://... --set sample.runtime.storage_options... with a bundled experiment
    options = {"sample.runtime.storage_options.endpoint_url": "http://127.0.0.1:9000"}
    config = load_experiment("tiny_chars", overrides=options, cwd=tmp_path, sample_from="s3://bucket-a/run")
    location = config.sample.runtime.out_dir
    assert isinstance(location, RemoteLocation)
    assert location.url == "s3://bucket-a/run"
    assert location.storage_options.endpoint_url == "http://127.0.0.1:9000"
    by_file = load_experiment(
        "tiny_chars", overrides=options, cwd=tmp_path, sample_checkpoint="s3://bucket-a/run/ckpt_last_00000001.pt"
    )
    assert by_file.sample.runtime.checkpoint == "ckpt_last_00000001.pt"
    assert isinstance(by_file.sample.runtime.out_dir, RemoteLocation)
    with pytest.raises(ConfigError, match=r"sample\.runtime\.storage_options\.endpoint_url"):
        load_experiment("tiny_chars", overrides=options, cwd=tmp_path)  # the bundled out_dir is local
    local = load_experiment("tiny_chars", cwd=tmp_path, sample_from="other/run")
    assert local.sample.runtime.out_dir == LocalLocation(path=tmp_path.resolve() / "other" / "run")
    assert local.sample.runtime.checkpoint is None


@pytest.mark.parametrize(("first", "second"), [(0.0, 0.99), (0.99, 0.0), (0.9, 0.99)])
def test_resuming_with_another_ema_decay_is_a_config_error_naming_both(
    tmp_path: Path, first: float, second: float
) -> None:
    tiny = {
        "train.model.n_layer": 1,
        "train.model.n_embd": 16,
        "train.model.block_size": 16,
        "train.data.batch_size": 4,
        "train.data.corpus_chars": 20000,
        "train.runtime.eval_iters": 1,
        "train.runtime.max_iters": 2,
    }

    def run(decay: float, max_iters: int) -> ExperimentConfig:
        overrides = {**tiny, "train.runtime.ema_decay": decay, "train.runtime.max_iters": max_iters}
        return load_experiment("tiny_chars", overrides=overrides, cwd=tmp_path)

    train(run(first, 2))
    with pytest.raises(ConfigError) as raised:
        train(run(second, 4))
    assert f"train.runtime.ema_decay: checkpoint {first!r}, config {second!r}" in str(raised.value)
    train(run(first, 4))  # the run's own setting resumes
