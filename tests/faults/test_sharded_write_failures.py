"""A sharded save whose write fails on one rank or on every rank (FSDP, torchrun, world size 2).

- A real full file system (a small tmpfs) fills up during a run that saves every iteration, synchronous and
  asynchronous: whichever ranks' writes hit ENOSPC (a part's, or the manifest's), the save fails on every rank
  with the same message, exit 1, no traceback; no manifest of the failed save, no part of it left behind.
- S3 (moto on loopback) behind a proxy that cuts the uploads of rank 1's ``.optim`` part of iteration 1's
  save only (a fault of one writer; the other rank's parts commit), or every rank's: the same outcome on
  every rank, and no multipart upload left open (the optimizer has stepped: each ``.optim`` part is 6 MB,
  a multipart upload of 5 MiB parts).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, CheckpointStore, LocalStore, open_store
from ml_playground.checkpoint._store import TEMP_PREFIX
from tests.cli_support import TINY, sets
from tests.distributed_support import exit_codes, rank_lines, rank_text, torchrun
from tests.faults.test_distributed_faults import _mount
from tests.servers import MotoServer, S3LocationFactory
from tests.tcp_proxy import CuttingProxy

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

FSDP = [*TINY, *sets(distributed__strategy="fsdp", distributed__timeout_s=60, distributed__preempt_timeout_s=5)]
BIG = sets(train__model__n_layer=2, train__model__n_embd=256, train__model__n_head=4)  # a stepped .optim: 6 MB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: room for a few of the tiny model's sharded checkpoints (~165 KiB each), then ENOSPC."""
    yield from _mount(tmp_path, "1m")


def _same_error_everywhere(result: subprocess.CompletedProcess[str]) -> str:
    assert exit_codes(result) == {0: 1, 1: 1}, result.stdout + result.stderr
    messages = [rank_text(result, rank).split("error: ", 1)[-1] for rank in (0, 1)]
    assert messages[0] == messages[1]  # the same message on every rank
    assert "Traceback" not in rank_text(result, 0) + rank_text(result, 1)
    return messages[0]


def _nothing_half_done(store: CheckpointStore) -> list[str]:
    """Every visible checkpoint is complete and verifies; the failed save left no part and no temporary."""
    manager = CheckpointManager(store)
    assert not [obj.name for obj in store.list() if obj.name.startswith(TEMP_PREFIX)]
    assert manager.leftovers() == []  # every rank deleted what it had committed of the failed save
    names = []
    for info in manager.checkpoints():
        assert info.world_size == 2
        manager.verify(info.filename)
        names.append(info.filename)
    return names


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_fails_a_sharded_save_on_every_rank_with_the_same_error(
    small_disk: Path, tmp_path: Path, async_save: bool
) -> None:
    run = small_disk / "run"
    saves = sets(eval_interval=4, checkpointing__interval=1, checkpointing__keep__last=100)
    args = ["train", *FSDP, *saves, *sets(out_dir=str(run), max_iters=60, checkpointing__async_save=async_save)]
    result = torchrun(args, tmp_path)
    message = _same_error_everywhere(result)
    assert "no space left on the device" in message
    assert f"{run}/ckpt_" in " ".join(message.split())
    names = _nothing_half_done(LocalStore(run))
    assert names  # some saves committed before the disk filled
    newest = max(int(name.split("_")[2].split(".")[0]) for name in names)
    # no rank trained past the failed save: it was seen there (sync) or at the next save point (async)
    reached = [int(line.split()[1].split("/")[0]) for line in rank_lines(result, 0) if line.startswith("iter ")]
    assert not reached or reached[-1] <= newest + (2 if async_save else 1)


def _optim_upload_of(rank: int | None) -> Any:
    """A request head that uploads a part (``UploadPart``) of rank ``rank``'s (None: any rank's) .optim."""
    key = b".optim?" if rank is None else f"part-{rank:05d}-of-00002.optim?".encode()
    return lambda head: key in head.split(b"\r\n", 1)[0] and b"partNumber=" in head.split(b"\r\n", 1)[0]


@pytest.mark.s3
@pytest.mark.parametrize(
    ("failing", "async_save"), [(1, False), (1, True), (None, False)], ids=["rank1-sync", "rank1-async", "every-sync"]
)
def test_an_s3_upload_failing_on_one_or_every_rank_fails_the_save_everywhere_and_leaves_no_upload(
    moto_server: MotoServer,
    s3_location: S3LocationFactory,
    s3_bucket: str,
    s3_admin: Any,
    tmp_path: Path,
    failing: int | None,
    async_save: bool,
) -> None:
    port = int(moto_server.endpoint.rsplit(":", 1)[1])
    with CuttingProxy(port) as proxy:
        proxy.cut_when = _optim_upload_of(failing)
        options = sets(storage_options__endpoint_url=proxy.endpoint, storage_options__max_attempts=2)
        options += sets(storage_options__part_size_mib=5)  # rank 1's 6 MB .optim part: a multipart upload
        run = sets(out_dir=f"s3://{s3_bucket}/run", max_iters=1, checkpointing__async_save=async_save)
        result = torchrun(["train", *FSDP, *BIG, *options, *run], tmp_path)
    message = " ".join(_same_error_everywhere(result).split())
    assert f"s3://{s3_bucket}/run/ckpt_" in message
    if failing is not None:
        assert f"part-{failing:05d}-of-00002.optim" in message  # the failing rank's own error, on every rank
    assert proxy.cut_count >= 1
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    saved = _nothing_half_done(open_store(s3_location("run")))
    assert "ckpt_last_00000000.pt" in saved  # iteration 0's optimizer state is small: no multipart, no cut
    keys = [obj["Key"] for obj in s3_admin.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert not [key for key in keys if "_00000001" in key]  # the committed parts of rank 0 deleted too
