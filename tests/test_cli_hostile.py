"""Hostile files through every CLI path that reads checkpoints, on local disk and on s3://.

A checkpoint crafted to run code when unpickled sits under valid checkpoint names in a run; ``sample``,
``eval``, ``ckpt show``, ``ckpt verify`` and a resuming ``train`` all refuse it with exit 1 and a message
naming it, and the sentinel the payload would create never appears.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cli_support import TINY, assert_clean_failure, run_main, sets
from tests.faults.test_hostile_files import _hostile_files
from tests.servers import MotoServer

NAMES = ("ckpt_best_00000005_1.000000.pt", "ckpt_last_00000005.pt")
KINDS = ("reduce-at-top", "reduce-in-metadata", "os-system-in-model")


def _commands(location: str, extra: list[str]) -> list[list[str]]:
    """Every CLI path that loads a checkpoint from ``location``, with ``extra`` storage arguments."""
    reading = [arg.replace("train.runtime.", "sample.runtime.") for arg in extra]
    return [
        ["sample", "--from", location, *reading],
        ["eval", "--from", location, *reading],
        ["sample", "--checkpoint", f"{location}/{NAMES[1]}", *reading],
        ["train", *TINY, *sets(max_iters=10), "--set", f"train.runtime.out_dir={location}", *extra],
    ]


def _ckpt_commands(location: str, endpoint: str | None) -> list[list[str]]:
    options = ["-o", f"endpoint_url={endpoint}"] if endpoint else []
    return [["ckpt", "show", f"{location}/{NAMES[0]}", *options]]


def _assert_verify_reports_both_bad(location: str, endpoint: str | None, cwd: Path, capsys: Any) -> None:
    options = ["-o", f"endpoint_url={endpoint}"] if endpoint else []
    result = run_main(["ckpt", "verify", location, *options], cwd, capsys)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for name in NAMES:
        assert f"BAD  {name}" in result.stdout
    assert "0 ok, 2 bad" in result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_local_run_is_refused_everywhere(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinel = tmp_path / "SENTINEL-code-ran"
    run = tmp_path / "run"
    run.mkdir()
    for name in NAMES:
        (run / name).write_bytes(_hostile_files(sentinel)[kind])
    for args in [*_commands(str(run), []), *_ckpt_commands(str(run), None)]:
        result = run_main(args, tmp_path, capsys)
        assert_clean_failure(result, 1, "ckpt_")
        assert not sentinel.exists(), args
    _assert_verify_reports_both_bad(str(run), None, tmp_path, capsys)
    assert not sentinel.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt_")) == sorted(NAMES)  # nothing rotated


@pytest.mark.s3
def test_a_hostile_s3_run_is_refused_everywhere(
    tmp_path: Path, moto_server: MotoServer, s3_bucket: str, s3_admin: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinel = tmp_path / "SENTINEL-code-ran"
    for name in NAMES:
        s3_admin.put_object(Bucket=s3_bucket, Key=f"runs/bad/{name}", Body=_hostile_files(sentinel)["reduce-at-top"])
    location = f"s3://{s3_bucket}/runs/bad"
    extra = ["--set", f"train.runtime.storage_options.endpoint_url={moto_server.endpoint}"]
    for args in [*_commands(location, extra), *_ckpt_commands(location, moto_server.endpoint)]:
        result = run_main(args, tmp_path, capsys)
        assert_clean_failure(result, 1, "ckpt_")
        assert not sentinel.exists(), args
    _assert_verify_reports_both_bad(location, moto_server.endpoint, tmp_path, capsys)
    assert not sentinel.exists()
    listed = s3_admin.list_objects_v2(Bucket=s3_bucket, Prefix="runs/bad/")["Contents"]
    assert sorted(obj["Key"].rsplit("/", 1)[1] for obj in listed if "/ckpt_" in obj["Key"]) == sorted(NAMES)
