"""Faults under torchrun (world size 2, gloo on CPU): a failed save stops every rank, a killed rank loses nothing.

- A real full file system (a small tmpfs) fails a save on rank 0, synchronous and asynchronous: every rank
  ends with exit 1 and the same message, no rank trains past it, every visible checkpoint verifies.
- An S3 upload cut by a proxy (moto on loopback): the same, and no multipart upload is left open.
- SIGKILL of rank 0 or rank 1 at a random moment of a run that saves every other step (so kills land
  mid-save and mid-async-save too): torchrun tears the group down; no half checkpoint is visible, every
  visible one verifies, a restart resumes from the newest. ``pytest -m sweep`` runs the longer sweep.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, LocalStore
from ml_playground.checkpoint._store import TEMP_PREFIX
from tests.cli_support import TINY, ckpt_names, sets
from tests.distributed_support import (
    cleanup,
    exit_codes,
    launcher_env,
    rank_text,
    torchrun,
    torchrun_command,
    worker_pids,
)
from tests.servers import MotoServer
from tests.tcp_proxy import CuttingProxy

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

SAVES_OFTEN = [*TINY, *sets(eval_interval=4, checkpointing__interval=1, checkpointing__keep__last=100)]
SWEEP_KILLS = 12
"""Kills in the ``sweep`` run (docs/reliability.md quotes its counts); CI runs 3."""


def _mount(tmp_path: Path, size: str) -> Iterator[Path]:
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 KiB tmpfs: room for a few of the tiny model's checkpoints, then a real ENOSPC."""
    yield from _mount(tmp_path, "160k")


def _audit(run: Path) -> list[str]:
    """Every visible checkpoint verifies; no temporary is listed."""
    manager = CheckpointManager(LocalStore(run))
    listed = [obj.name for obj in manager.store.list()]
    assert not [name for name in listed if name.startswith(TEMP_PREFIX)]
    names = [info.filename for info in manager.checkpoints()]
    for name in names:
        manager.verify(name)
    return names


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_that_fails_on_rank_0_stops_every_rank_with_the_same_error(
    small_disk: Path, tmp_path: Path, async_save: bool
) -> None:
    run = small_disk / "run"
    args = ["train", *SAVES_OFTEN, *sets(out_dir=str(run), max_iters=40, checkpointing__async_save=async_save)]
    result = torchrun(args, tmp_path)
    assert exit_codes(result) == {0: 1, 1: 1}, result.stdout + result.stderr
    errors = [" ".join(line for line in rank_text(result, r).split("error: ", 1)[1:]) for r in (0, 1)]
    assert errors[0]
    assert "no space left on the device" in errors[0]
    assert errors[0] == errors[1]  # the same message on every rank
    assert "Traceback" not in rank_text(result, 0) + rank_text(result, 1)
    names = _audit(run)
    assert names  # some saves committed before the disk filled
    last = max(CheckpointManager(LocalStore(run)).checkpoints(), key=lambda info: info.iter_num)
    # no rank trained past the failed save: rank 0 saw it at the next save point (sync: that save itself)
    reached = [line for line in rank_lines_of(result, 0) if line.startswith("iter ")]
    assert not reached or int(reached[-1].split()[1].split("/")[0]) <= last.iter_num + (2 if async_save else 1)


def rank_lines_of(result: subprocess.CompletedProcess[str], rank: int) -> list[str]:
    prefix = f"[default{rank}]:"
    return [line[len(prefix) :] for line in (result.stdout + result.stderr).splitlines() if line.startswith(prefix)]


@pytest.mark.s3
def test_an_s3_save_cut_by_the_network_stops_every_rank_and_leaves_no_upload(
    moto_server: MotoServer, s3_bucket: str, s3_admin: Any, tmp_path: Path
) -> None:
    port = int(moto_server.endpoint.rsplit(":", 1)[1])
    with CuttingProxy(port) as proxy:
        proxy.cut_after_bytes = 3 << 20  # small requests pass; every 5 MiB part is cut, each retry too
        model = sets(train__model__n_layer=2, train__model__n_embd=256, train__model__n_head=4)
        options = sets(storage_options__endpoint_url=proxy.endpoint, storage_options__max_attempts=2)
        args = ["train", *TINY, *model, *options, *sets(out_dir=f"s3://{s3_bucket}/run", max_iters=0)]
        result = torchrun(args, tmp_path, env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    assert exit_codes(result) == {0: 1, 1: 1}, result.stdout + result.stderr
    first, second = (rank_text(result, r).split("error: ", 1)[-1] for r in (0, 1))
    assert f"s3://{s3_bucket}/run/ckpt_" in first
    assert first == second
    assert proxy.cut_count >= 1
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    keys = [obj["Key"] for obj in s3_admin.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert not [key for key in keys if key.startswith("run/ckpt_")]


def _kill_a_rank(tmp_path: Path, rng: random.Random, victim: int, async_save: bool) -> tuple[list[str], str]:
    """Start a long run, SIGKILL rank ``victim`` at a random moment after its first save; the visible names
    and what the kill left (a temporary: it landed mid-save)."""
    run = tmp_path / "out" / "run"
    args = ["train", *SAVES_OFTEN, *sets(out_dir="out/run", max_iters=100000, checkpointing__async_save=async_save)]
    agent = subprocess.Popen(
        torchrun_command(args), cwd=tmp_path, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (run.exists() and ckpt_names(run)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt_names(run), "the run saved nothing in 120 s"
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(worker_pids(agent.pid)[victim], signal.SIGKILL)
        left = [name for name in os.listdir(run) if name.startswith(TEMP_PREFIX)]
        agent.wait(timeout=60)  # torchrun tears the group down (the survivor dies on its SIGTERM)
    finally:
        cleanup(agent)
    return _audit(run), "mid-save" if left else "between saves"


def _restart_resumes_from_the_newest(tmp_path: Path, names: list[str]) -> None:
    newest = max(int(name.split("_")[2].split(".")[0]) for name in names)
    args = ["train", *SAVES_OFTEN, *sets(out_dir="out/run", max_iters=newest + 2)]
    resumed = torchrun(args, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from iteration {newest} " in rank_text(resumed, 0)


def _sweep(tmp_path: Path, kills: int) -> dict[str, int]:
    rng = random.Random(20261204)
    seen: dict[str, int] = {}
    for index in range(kills):
        case = tmp_path / f"kill{index}"
        case.mkdir()
        victim, async_save = index % 2, index % 3 == 2
        names, where = _kill_a_rank(case, rng, victim, async_save)
        assert names
        _restart_resumes_from_the_newest(case, names)
        label = f"rank {victim} {'async' if async_save else 'sync'} {where}"
        seen[label] = seen.get(label, 0) + 1
    return seen


def test_sigkill_of_a_rank_loses_no_checkpoint_and_a_restart_resumes(tmp_path: Path) -> None:
    seen = _sweep(tmp_path, 3)
    assert sum(seen.values()) == 3


@pytest.mark.sweep
def test_sigkill_sweep_of_both_ranks_sync_and_async(tmp_path: Path, record_property: Any) -> None:
    seen = _sweep(tmp_path, SWEEP_KILLS)
    record_property("distributed_sigkill", seen)
    assert sum(seen.values()) == SWEEP_KILLS
    assert any("rank 0" in label for label in seen)
    assert any("rank 1" in label for label in seen)
