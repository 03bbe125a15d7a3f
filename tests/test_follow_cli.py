"""``ml-playground eval --follow`` through the real command: a run training in another process is followed
to its end; the flags' usage errors (exit 2), a corrupt checkpoint (exit 1), Ctrl-C (exit 130)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_support import TINY, assert_clean_failure, ckpt_names, cli_env, flip_tensor_byte, run_main, sets
from tests.conftest import with_default_sigint

FOLLOW_FAST = ["--poll", "0.1", "--idle-timeout", "60"]
RUN_SETTINGS = [*TINY, *sets(max_iters=30, eval_interval=5, checkpointing__interval=10)]
ALL_KEPT = sets(checkpointing__keep__last=100, checkpointing__keep__best=100)


def _popen(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ml_playground", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=with_default_sigint,
    )


def _finish(process: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_follow_reports_a_training_run_in_another_process_once_each_in_order_and_ends_with_it(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"  # does not exist yet: the follower waits for it
    log = tmp_path / "evals.jsonl"
    follower = _popen(
        ["eval", "--from", str(run), "--follow", *FOLLOW_FAST, "--log", str(log), "--raw-weights"], tmp_path
    )
    time.sleep(1.0)
    trainer = _popen(["train", *RUN_SETTINGS, *ALL_KEPT, *sets(out_dir=str(run))], tmp_path)
    _, train_err = _finish(trainer)
    assert trainer.returncode == 0, train_err
    out, err = _finish(follower)  # ends by itself once the run is complete
    assert follower.returncode == 0, err
    assert "Traceback" not in err
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    names = [line["name"] for line in lines]
    assert names == [line.split()[3].rstrip(":") for line in out.splitlines() if line.startswith("iter ")]
    assert sorted(names) == ckpt_names(run)  # every checkpoint of the run, each once (none was rotated)
    iterations = [line["iter_num"] for line in lines]
    assert iterations == sorted(iterations)  # in iteration order
    assert iterations[-1] == 30
    assert "ckpt_last_00000030.pt" in names  # the final checkpoint
    assert all(line["status"] == "evaluated" for line in lines)
    for line in lines:
        assert {"name", "kind", "iter_num", "metric", "eval_loss", "status"} <= line.keys()
        if line["kind"] == "best":  # same batches, same arithmetic: eval reproduces the saved metric
            assert line["eval_loss"] == pytest.approx(line["metric"], abs=1e-6)
    evaluated_states = {line["iter_num"] for line in lines if line["same_state_as"] is None}
    assert len(evaluated_states) == len([line for line in lines if line["same_state_as"] is None])
    assert f"followed {run}: {len(names)} checkpoints reported ({len(names)} evaluated, 0 rotated away)" in out
    assert "max_iters" in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (max_iters 30) to copy: trained once, in this process."""
    where = tmp_path_factory.mktemp("trained")
    from ml_playground.cli import main

    assert main(["train", *RUN_SETTINGS, *sets(out_dir=str(where / "run"))]) == 0
    return where / "run"


def test_follow_of_a_finished_run_reports_what_is_there_and_ends(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_main(["eval", "--from", str(trained), "--follow", "--poll", "0.05"], tmp_path, capsys)
    assert result.returncode == 0, result.stderr
    reported = [line.split()[3].rstrip(":") for line in result.stdout.splitlines() if line.startswith("iter ")]
    assert reported == sorted(ckpt_names(trained), key=lambda name: (int(name.split("_")[2][:8]), "best" in name))


def test_a_corrupt_checkpoint_fails_the_follow_naming_it(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    flip_tensor_byte(run / "ckpt_last_00000030.pt")
    log = tmp_path / "log.jsonl"
    result = run_main(["eval", "--from", str(run), "--follow", "--poll", "0.05", "--log", str(log)], tmp_path, capsys)
    assert_clean_failure(result, 1, "ckpt_last_00000030.pt")
    last = json.loads(log.read_text().splitlines()[-1])
    assert (last["name"], last["status"]) == ("ckpt_last_00000030.pt", "corrupt")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--follow", "--checkpoint", "run/ckpt_last_00000010.pt"], "--checkpoint"),
        (["--from", "run", "--poll", "1"], "--poll only apply with --follow"),
        (["--from", "run", "--until", "5", "--log", "x.jsonl"], "--until, --log only apply with --follow"),
        (["--from", "run", "--follow", "--log", "missing-dir/x.jsonl"], "missing-dir"),
        (["--follow", "--set", "sample.runtime.checkpoint=ckpt_last_00000010.pt"], "sample.runtime.checkpoint"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    assert_clean_failure(run_main(["eval", *args], tmp_path, capsys), 2, needle)


@pytest.mark.parametrize(
    "args", [["--poll", "0"], ["--poll", "nan"], ["--idle-timeout", "-1"], ["--until", "-3"], ["--until", "x"]]
)
def test_bad_flag_values_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    result = run_main(["eval", "--follow", *args], tmp_path, capsys)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_a_follow_with_130(tmp_path: Path) -> None:
    follower = _popen(["eval", "--from", str(tmp_path / "never"), "--follow", "--idle-timeout", "0"], tmp_path)
    assert follower.stdout is not None
    assert "waiting for" in follower.stdout.readline()
    follower.send_signal(signal.SIGINT)
    out, err = _finish(follower, 60)
    assert follower.returncode == 130, out + err
    assert "Traceback" not in err
