"""The user journeys through the real ``ml-playground`` command, each in a fresh process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import CheckpointManager, LocalStore
from tests.cli_support import (
    TINY,
    assert_clean_failure,
    assert_quiet_success,
    assert_same_state,
    ckpt_names,
    cli_env,
    flip_tensor_byte,
    run_cli,
    run_main,
    sets,
)
from tests.conftest import with_default_sigint

pytestmark = pytest.mark.slow


def test_train_without_arguments_trains_the_default_experiment_into_out(tmp_path: Path) -> None:
    result = run_cli(["train", *TINY, *sets(max_iters=40, checkpointing__interval=10, eval_interval=1000)], tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "out" / "tiny_chars"
    names = ckpt_names(run)
    # tiny_chars keeps two last checkpoints and one best (evaluated only at iteration 0 here)
    assert names[1:] == ["ckpt_last_00000030.pt", "ckpt_last_00000040.pt"]
    assert names[0].startswith("ckpt_best_00000000_")
    assert f"checkpoints are in {run}" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.journey
def test_journey_train_sample_eval_and_inspect_each_in_a_fresh_process(tmp_path: Path) -> None:
    """The README's quick start, command by command; `tox -e user` runs it in a user's install."""
    trained = run_cli(["train", *TINY, *sets(max_iters=20, eval_interval=10, checkpointing__interval=10)], tmp_path)
    assert_quiet_success(trained)
    run = tmp_path / "out" / "tiny_chars"
    names = ckpt_names(run)
    best = next(n for n in names if n.startswith("ckpt_best_"))
    assert names == sorted([best, "ckpt_last_00000010.pt", "ckpt_last_00000020.pt"])

    sampled = run_cli(["sample", *sets(sample__sample__max_new_tokens=25)], tmp_path)
    assert_quiet_success(sampled)
    assert f"sampling from {run / best}" in sampled.stderr
    assert len(sampled.stdout.rstrip("\n")) == 1 + 25  # the "\n" prompt and 25 characters

    evaluated = run_cli(["eval", "--raw-weights"], tmp_path)
    assert_quiet_success(evaluated)
    assert f"val loss {best.removesuffix('.pt').rsplit('_', 1)[1]}" in evaluated.stdout

    listed = run_cli(["ckpt", "ls", "out/tiny_chars"], tmp_path)
    assert_quiet_success(listed)
    assert listed.stdout.splitlines()[0] == f"3 checkpoints in {run}"

    shown = run_cli(["ckpt", "show", "out/tiny_chars/ckpt_last_00000020.pt"], tmp_path)
    assert_quiet_success(shown)
    assert "iteration:        20" in shown.stdout

    verified = run_cli(["ckpt", "verify", "out/tiny_chars"], tmp_path)
    assert_quiet_success(verified)
    assert verified.stdout.splitlines()[-1] == f"3 checkpoints in {run}: 3 ok, 0 bad"


def test_resume_in_a_new_process_is_bitwise_identical_to_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [*TINY, *sets(eval_interval=5, checkpointing__interval=10, ema_decay=0.95, train__model__dropout=0.1)]
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.mkdir()
    # the uninterrupted reference and the first leg run here; the resume runs in a fresh process
    assert run_main(["train", *common, *sets(max_iters=30)], a, capsys).returncode == 0
    assert run_main(["train", *common, *sets(max_iters=17)], b, capsys).returncode == 0
    resumed = run_cli(["train", *common, *sets(max_iters=30)], b)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from iteration 17" in resumed.stdout
    assert "eval at iter 15" not in resumed.stdout  # nothing before the checkpoint repeats
    assert "eval at iter 20" in resumed.stdout
    run_a, run_b = a / "out" / "tiny_chars", b / "out" / "tiny_chars"
    assert ckpt_names(run_a) == ckpt_names(run_b)
    for name in ckpt_names(run_a):
        assert_same_state(
            CheckpointManager(LocalStore(run_a)).load(name), CheckpointManager(LocalStore(run_b)).load(name)
        )


def test_ctrl_c_exits_130_leaves_only_whole_checkpoints_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [*TINY, *sets(eval_interval=100000, checkpointing__interval=100000, checkpointing__keep__best=0)]
    run = tmp_path / "out" / "tiny_chars"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ml_playground", "train", *common, *sets(max_iters=100000)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=with_default_sigint,  # a user's Ctrl-C, even if this runner ignores SIGINT
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "ckpt_last_00000000.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # inside the training steps
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert "interrupted" in err
    # no temporary or partial file is left; only the writer lease's own files besides the checkpoint
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".ml_playground.lease")) == [
        "ckpt_last_00000000.pt"
    ]
    resumed = run_main(["train", *common, *sets(max_iters=3)], tmp_path, capsys)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from iteration 0" in resumed.stdout
    assert ckpt_names(run) == ["ckpt_last_00000000.pt", "ckpt_last_00000003.pt"]  # tiny_chars keeps two


def test_nothing_to_do_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["train", *TINY, *sets(max_iters=3)], tmp_path, capsys).returncode == 0
    again = run_main(["train", *TINY, *sets(max_iters=2)], tmp_path, capsys)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout


def test_sample_and_eval_from_a_run_and_from_one_checkpoint_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = run_main(["train", *TINY, *sets(max_iters=20, eval_interval=10, ema_decay=0.9)], tmp_path, capsys)
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "out" / "tiny_chars"
    best = next(n for n in ckpt_names(run) if n.startswith("ckpt_best_"))
    metric = best.removesuffix(".pt").rsplit("_", 1)[1]
    sample_settings = sets(sample__sample__max_new_tokens=30, sample__sample__num_samples=2)

    default = run_cli(["sample", "--set", 'sample.sample.start="Ada "', *sample_settings], tmp_path)
    assert default.returncode == 0, default.stderr
    texts = default.stdout.split("-" * 40 + "\n")
    assert len(texts) == 2
    assert all(t.startswith("Ada ") and len(t.rstrip("\n")) == len("Ada ") + 30 for t in texts)
    assert f"{run / best}" in default.stderr
    assert "ema weights" in default.stderr

    # the trainer evaluated the raw weights; eval on the same batches reproduces the best file's metric
    evaluated = run_cli(["eval", "--from", str(run), "--raw-weights"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"val loss {metric}" in evaluated.stdout

    from_run = run_main(["sample", "--from", str(run), "--raw-weights", *sample_settings], tmp_path, capsys)
    assert from_run.returncode == 0, from_run.stderr
    assert "raw weights" in from_run.stderr
    one_file = run_main(["sample", "--checkpoint", "out/tiny_chars/ckpt_last_00000020.pt"], tmp_path, capsys)
    assert one_file.returncode == 0, one_file.stderr
    assert "iteration 20" in one_file.stderr
    ema = run_main(["eval", "--checkpoint", str(run / "ckpt_last_00000020.pt")], tmp_path, capsys)
    assert ema.returncode == 0
    assert "ema weights" in ema.stdout


def test_sample_from_a_run_without_best_checkpoints_says_how_to_read_the_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = run_main(["train", *TINY, *sets(max_iters=2, checkpointing__keep__best=0)], tmp_path, capsys)
    assert trained.returncode == 0
    assert_clean_failure(
        run_main(["sample"], tmp_path, capsys), 1, "no best checkpoint", "sample.runtime.read_policy=latest"
    )
    latest = run_main(["sample", "--set", "sample.runtime.read_policy=latest"], tmp_path, capsys)
    assert latest.returncode == 0, latest.stderr
    assert "ckpt_last_00000002.pt" in latest.stderr


def test_sample_with_both_from_and_checkpoint_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_main(["sample", "--from", "a", "--checkpoint", "b.pt"], tmp_path, capsys)
    assert result.returncode == 2
    assert "not allowed with" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["train", "no_such_experiment"], 2, ["unknown experiment 'no_such_experiment'", "tiny_chars"]),
        (["train", "--set", "train.runtime.max_itres=5"], 2, ["train.runtime.max_itres", "unknown key"]),
        (["train", "--set", "train.runtime.max_iters=many"], 2, ["train.runtime.max_iters", "'many'"]),
        (["train", "--set", "train.runtime.out_dir=ftp://host/x"], 2, ["unsupported URL scheme 'ftp'"]),
        (["train", "--set", "nonsense"], 2, ["KEY=VALUE"]),
        (["sample", "--from", "missing_run"], 1, ["missing_run", "does not exist"]),
        (["eval"], 1, ["out/tiny_chars"]),
        # found by review: each of these was a traceback, or silently something else
        (["ckpt", "show", "run/.."], 2, ["'..' is not a checkpoint file name"]),
        (["ckpt", "show", "s3://ckpt_last_00000005.pt"], 2, ["names no file"]),
        (["train", "--set", "train.runtime.out_dir=s3:/my-bucket/runs/a"], 2, ["s3:// URL with a '/' missing"]),
        (["ckpt", "ls", "file://somehost/run"], 2, ["takes no host"]),
        (["ckpt", "ls", "file:///run?x=1"], 2, ["takes no host, query or fragment"]),
        (["train", "--set", "train.runtime.seed=18446744073709551616"], 2, ["train.runtime.seed"]),
        (["train", "--set", "train.optim.learning_rate=inf"], 2, ["train.optim.learning_rate"]),
        (["train", "--set", "train.runtime.max_iters=5\nfoo = 1"], 2, ["more than one value"]),
        (["train", "--config", "."], 2, ["is a directory"]),
    ],
)
def test_user_errors_end_with_a_message_and_exit_code_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, needles: list[str]
) -> None:
    assert_clean_failure(run_main(args, tmp_path, capsys), code, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_reading_onto_a_device_the_machine_lacks_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # checked before anything is read (it once failed with a traceback from model.to)
    result = run_main([command, "--set", "sample.runtime.device=cuda"], tmp_path, capsys)
    assert_clean_failure(result, 2, "sample.runtime.device = 'cuda'", "no CUDA device", "use 'cpu'")


def test_a_user_error_in_a_fresh_process_has_no_traceback(tmp_path: Path) -> None:
    assert_clean_failure(run_cli(["train", "no_such_experiment"], tmp_path), 2, "unknown experiment")


def test_a_broken_config_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "exp.toml"
    bad.write_text("[train.runtime\nmax_iters = 3\n", encoding="utf-8")
    assert_clean_failure(run_main(["train", "--config", str(bad)], tmp_path, capsys), 2, str(bad), "not valid TOML")


def test_sampling_a_corrupt_checkpoint_is_exit_1_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["train", *TINY, *sets(max_iters=2)], tmp_path, capsys).returncode == 0
    path = tmp_path / "out" / "tiny_chars" / "ckpt_last_00000002.pt"
    flip_tensor_byte(path)
    assert_clean_failure(run_cli(["sample", "--checkpoint", str(path)], tmp_path), 1, str(path))


@pytest.mark.parametrize(
    "command",
    [[], ["train"], ["sample"], ["eval"], ["ckpt"], *[["ckpt", t] for t in ("ls", "show", "verify", "cp", "export")]],
)
def test_every_command_has_help_with_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    result = run_main([*command, "--help"], tmp_path, capsys)
    assert result.returncode == 0
    assert "usage: ml-playground" in result.stdout
    if command and command != ["ckpt"]:
        assert "examples:" in result.stdout


def test_a_symlink_loop_as_a_location_or_config_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for args in (["ckpt", "ls", "loop"], ["train", "--config", "loop"], ["sample", "--from", "loop"]):
        assert_clean_failure(run_main(args, tmp_path, capsys), 2, "'loop' is not a usable path")
