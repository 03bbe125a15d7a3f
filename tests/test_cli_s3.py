"""The S3 journeys through the real CLI: train to ``s3://`` on the moto server, then sample, eval and the
``ckpt`` tools from the URL in fresh processes. Credentials come from the environment (standard chain)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cli_support import (
    TINY,
    assert_clean_failure,
    assert_quiet_success,
    ckpt_names,
    flip_tensor_byte,
    run_cli,
    run_main,
    sets,
)
from tests.servers import MotoServer

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def keys(s3_admin: Any, bucket: str, prefix: str) -> list[str]:
    listed = s3_admin.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
    names = (obj["Key"].removeprefix(f"{prefix}/") for obj in listed)
    return sorted(name for name in names if not name.startswith(".ml_playground.lease"))


def uploads(s3_admin: Any, bucket: str) -> list[Any]:
    return list(s3_admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@pytest.mark.journey
def test_train_to_s3_then_sample_eval_and_inspect_from_the_url_in_fresh_processes(
    tmp_path: Path, moto_server: MotoServer, s3_bucket: str, s3_admin: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{s3_bucket}/runs/tiny"
    endpoint = moto_server.endpoint
    trained = run_cli(
        [
            "train",
            *TINY,
            *sets(max_iters=20, eval_interval=10, checkpointing__interval=10, ema_decay=0.9),
            "--set", f"train.runtime.out_dir={url}",
            "--set", f"train.runtime.storage_options.endpoint_url={endpoint}",
        ],
        tmp_path,
    )  # fmt: skip
    assert_quiet_success(trained)
    assert f"checkpoints are in {url}" in trained.stdout
    stored = keys(s3_admin, s3_bucket, "runs/tiny")
    assert stored[1:] == ["ckpt_last_00000010.pt", "ckpt_last_00000020.pt"]
    assert stored[0].startswith("ckpt_best_000000")
    assert uploads(s3_admin, s3_bucket) == []
    assert not (tmp_path / "out").exists()  # nothing written locally

    reading = ["--set", f"sample.runtime.storage_options.endpoint_url={endpoint}"]
    best_metric = stored[0].removesuffix(".pt").rsplit("_", 1)[1]
    sampled = run_cli(["sample", "--from", url, *reading, *sets(sample__sample__max_new_tokens=25)], tmp_path)
    assert_quiet_success(sampled)
    assert f"sampling from {url}/{stored[0]}" in sampled.stderr
    assert len(sampled.stdout.rstrip("\n")) == 1 + 25  # the "\n" prompt and 25 characters

    evaluated = run_cli(["eval", "--from", url, "--raw-weights", *reading], tmp_path)
    assert_quiet_success(evaluated)
    assert f"val loss {best_metric}" in evaluated.stdout

    opt = ["-o", f"endpoint_url={endpoint}"]
    listed = run_cli(["ckpt", "ls", url, *opt], tmp_path)
    assert_quiet_success(listed)
    assert listed.stdout.splitlines()[0] == f"3 checkpoints in {url}"
    shown = run_cli(["ckpt", "show", f"{url}/ckpt_last_00000020.pt", *opt], tmp_path)
    assert_quiet_success(shown)
    assert "iteration:        20" in shown.stdout
    verified = run_cli(["ckpt", "verify", url, *opt], tmp_path)
    assert_quiet_success(verified)
    assert f"in {url}: 3 ok, 0 bad" in verified.stdout

    one = run_main(["sample", "--checkpoint", f"{url}/ckpt_last_00000020.pt", *reading], tmp_path, capsys)
    assert one.returncode == 0, one.stderr
    assert "iteration 20, ema weights" in one.stderr


def test_resume_from_s3_continues_where_the_run_stopped(
    tmp_path: Path, moto_server: MotoServer, s3_bucket: str, s3_admin: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{s3_bucket}/run"
    common = [
        *TINY,
        *sets(checkpointing__interval=5, checkpointing__keep__best=0),
        "--set", f"train.runtime.out_dir={url}",
        "--set", f"train.runtime.storage_options.endpoint_url={moto_server.endpoint}",
    ]  # fmt: skip
    assert run_main(["train", *common, *sets(max_iters=5)], tmp_path, capsys).returncode == 0
    resumed = run_main(["train", *common, *sets(max_iters=10)], tmp_path, capsys)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from iteration 5" in resumed.stdout
    assert keys(s3_admin, s3_bucket, "run") == ["ckpt_last_00000005.pt", "ckpt_last_00000010.pt"]


def test_ckpt_tools_between_local_and_s3(
    tmp_path: Path, moto_server: MotoServer, s3_bucket: str, s3_admin: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["train", *TINY, *sets(max_iters=4, checkpointing__interval=2)], tmp_path, capsys).returncode == 0
    local = tmp_path / "out" / "tiny_chars"
    url = f"s3://{s3_bucket}/copied"
    opt = ["-o", f"endpoint_url={moto_server.endpoint}"]

    copied = run_main(["ckpt", "cp", str(local), url, *opt], tmp_path, capsys)
    assert copied.returncode == 0, copied.stderr
    assert keys(s3_admin, s3_bucket, "copied") == ckpt_names(local)

    listed = run_main(["ckpt", "ls", url, *opt], tmp_path, capsys)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == f"{len(ckpt_names(local))} checkpoints in {url}"

    verified = run_cli(["ckpt", "verify", url, *opt], tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert f"in {url}: {len(ckpt_names(local))} ok, 0 bad" in verified.stdout

    shown = run_main(["ckpt", "show", f"{url}/ckpt_last_00000004.pt", *opt], tmp_path, capsys)
    assert "iteration:        4" in shown.stdout

    back = run_main(["ckpt", "cp", f"{url}/ckpt_last_00000004.pt", "back", *opt], tmp_path, capsys)
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "back" / "ckpt_last_00000004.pt").read_bytes() == (local / "ckpt_last_00000004.pt").read_bytes()

    exported = run_main(
        ["ckpt", "export", f"{url}/ckpt_last_00000004.pt", f"s3://{s3_bucket}/w.safetensors", *opt], tmp_path, capsys
    )
    assert exported.returncode == 0, exported.stderr
    assert "w.safetensors" in [o["Key"] for o in s3_admin.list_objects_v2(Bucket=s3_bucket)["Contents"]]

    empty = run_main(["ckpt", "verify", f"s3://{s3_bucket}/nothing-here", *opt], tmp_path, capsys)
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert f"0 checkpoints in s3://{s3_bucket}/nothing-here" in empty.stdout


def test_ckpt_verify_on_s3_names_a_corrupted_object(
    tmp_path: Path, moto_server: MotoServer, s3_bucket: str, s3_admin: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["train", *TINY, *sets(max_iters=2)], tmp_path, capsys).returncode == 0
    local = tmp_path / "out" / "tiny_chars" / "ckpt_last_00000002.pt"
    damaged = flip_tensor_byte(local)
    s3_admin.put_object(Bucket=s3_bucket, Key="bad/ckpt_last_00000002.pt", Body=damaged)
    result = run_main(["ckpt", "verify", f"s3://{s3_bucket}/bad", "-o", f"endpoint_url={moto_server.endpoint}"],
                      tmp_path, capsys)  # fmt: skip
    assert result.returncode == 1
    assert "BAD  ckpt_last_00000002.pt" in result.stdout


def test_training_into_a_missing_bucket_fails_before_training(
    tmp_path: Path, moto_server: MotoServer, aws_test_credentials: None
) -> None:
    result = run_cli(
        [
            "train",
            *TINY,
            "--set", "train.runtime.out_dir=s3://no-such-bucket-here/run",
            "--set", f"train.runtime.storage_options.endpoint_url={moto_server.endpoint}",
            "--set", "train.runtime.storage_options.max_attempts=1",
        ],
        tmp_path,
    )  # fmt: skip
    assert_clean_failure(result, 1, "no-such-bucket-here")
    assert "eval at iter" not in result.stdout
