"""The GCS journey through the real CLI: train to ``gs://`` on the emulator, then sample, eval and the
``ckpt`` tools from the URL, each in a fresh process (unsigned requests: ``anon = true``, as for any emulator)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ml_playground.locations import RemoteLocation
from tests.cli_support import TINY, assert_quiet_success, run_cli, sets
from tests.servers import GcsEmulator

pytestmark = [pytest.mark.gcs, pytest.mark.slow]


@pytest.mark.journey
def test_train_to_gcs_then_sample_eval_and_inspect_from_the_url_in_fresh_processes(
    tmp_path: Path, gcs_emulator: GcsEmulator, gcs_location: Callable[..., RemoteLocation]
) -> None:
    location = gcs_location("runs/tiny")
    url, endpoint = location.url, gcs_emulator.endpoint
    trained = run_cli(
        [
            "train",
            *TINY,
            *sets(max_iters=20, eval_interval=10, checkpointing__interval=10),
            "--set", f"train.runtime.out_dir={url}",
            "--set", f"train.runtime.storage_options.endpoint_url={endpoint}",
            "--set", "train.runtime.storage_options.anon=true",
        ],
        tmp_path,
    )  # fmt: skip
    assert_quiet_success(trained)
    assert f"checkpoints are in {url}" in trained.stdout
    stored = sorted(path.rsplit("/", 1)[1] for path in gcs_emulator.filesystem().ls(location.root))
    assert stored[1:] == ["ckpt_last_00000010.pt", "ckpt_last_00000020.pt"]
    assert stored[0].startswith("ckpt_best_000000")
    assert not (tmp_path / "out").exists()  # nothing written locally

    reading = [
        "--set", f"sample.runtime.storage_options.endpoint_url={endpoint}",
        "--set", "sample.runtime.storage_options.anon=true",
    ]  # fmt: skip
    sampled = run_cli(["sample", "--from", url, *reading, *sets(sample__sample__max_new_tokens=25)], tmp_path)
    assert_quiet_success(sampled)
    assert f"sampling from {url}/{stored[0]}" in sampled.stderr
    assert len(sampled.stdout.rstrip("\n")) == 1 + 25  # the "\n" prompt and 25 characters

    evaluated = run_cli(["eval", "--from", url, "--raw-weights", *reading], tmp_path)
    assert_quiet_success(evaluated)
    assert f"val loss {stored[0].removesuffix('.pt').rsplit('_', 1)[1]}" in evaluated.stdout

    opt = ["-o", f"endpoint_url={endpoint}", "-o", "anon=true"]
    listed = run_cli(["ckpt", "ls", url, *opt], tmp_path)
    assert_quiet_success(listed)
    assert listed.stdout.splitlines()[0] == f"3 checkpoints in {url}"
    shown = run_cli(["ckpt", "show", f"{url}/ckpt_last_00000020.pt", *opt], tmp_path)
    assert_quiet_success(shown)
    assert "iteration:        20" in shown.stdout
    verified = run_cli(["ckpt", "verify", url, *opt], tmp_path)
    assert_quiet_success(verified)
    assert f"in {url}: 3 ok, 0 bad" in verified.stdout
