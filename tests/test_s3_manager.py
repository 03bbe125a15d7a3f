"""CheckpointManager over S3 on a real moto server: save, rotate, discover, load, and a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, open_store
from ml_playground.checkpoint.stores import FsspecStore
from ml_playground.checkpoint.stores.s3 import S3Store
from ml_playground.config_loader import load, parse_checkpoint_ref
from ml_playground.errors import CheckpointRotatedAwayError, StorageError
from ml_playground.locations import RemoteLocation
from tests.conftest import assert_same_checkpoint, make_checkpoint
from tests.servers import MotoServer, S3LocationFactory

pytestmark = pytest.mark.s3


def _manager(location: RemoteLocation, last: int = 2, best: int = 1, create: bool = True) -> CheckpointManager:
    return CheckpointManager(open_store(location, create=create), KeepPolicy(last=last, best=best))


def test_save_rotate_and_load_over_s3(s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str) -> None:
    manager = _manager(s3_location())
    saved = {}
    for step, loss in [(0, 3.0), (10, 2.0), (20, 2.5), (30, 1.5), (40, 1.7)]:
        checkpoint = make_checkpoint(step, loss, seed=step)
        if loss < min([c.best_val_loss for c in saved.values()], default=float("inf")):
            manager.save_best(checkpoint)
        manager.save_last(checkpoint)
        saved[step] = checkpoint
    keys = sorted(obj["Key"] for obj in s3_admin.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["run/ckpt_best_00000030_1.500000.pt", "run/ckpt_last_00000030.pt", "run/ckpt_last_00000040.pt"]
    fresh = _manager(s3_location(), create=False)
    assert_same_checkpoint(fresh.load_latest(), saved[40])
    assert_same_checkpoint(fresh.load_best(), saved[30])


def test_multipart_sized_checkpoint_round_trips_through_the_manager(s3_location: S3LocationFactory) -> None:
    manager = _manager(s3_location(part_size_mib=5, max_concurrency=2))
    checkpoint = make_checkpoint(7, 0.5, width=1100, ema=True)  # ~19 MiB with AdamW state and EMA
    name = manager.save_last(checkpoint)
    assert name is not None
    info = manager.latest()
    assert info is not None
    assert info.size > 15 * 2**20
    assert_same_checkpoint(manager.load(name.filename), checkpoint)


def test_reader_of_a_rotated_away_checkpoint_is_told_so(s3_location: S3LocationFactory) -> None:
    writer = _manager(s3_location(), last=1, best=0)
    reader = _manager(s3_location(), last=1, best=0, create=False)
    writer.save_last(make_checkpoint(1))
    chosen = reader.choose("latest")
    writer.save_last(make_checkpoint(2))  # rotates iteration 1 away in "another process"
    with pytest.raises(CheckpointRotatedAwayError, match=r"ckpt_last_00000001\.pt.*ckpt_last_00000002\.pt"):
        reader.load(chosen.filename)


def test_config_with_an_s3_out_dir_and_storage_options_opens_the_store(
    tmp_path: Path, moto_server: MotoServer, s3_bucket: str
) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        textwrap.dedent(
            f"""
            [train.runtime]
            out_dir = "s3://{s3_bucket}/runs/a"
            [train.runtime.storage_options]
            endpoint_url = "{moto_server.endpoint}"
            region = "us-east-1"
            max_attempts = 2
            part_size_mib = 8
            """
        )
    )
    config = load(config_file)
    location = config.train.runtime.out_dir
    assert isinstance(location, RemoteLocation)
    assert location.url == f"s3://{s3_bucket}/runs/a"
    manager = CheckpointManager(open_store(location, create=True))
    manager.save_last(make_checkpoint(0))
    assert [info.filename for info in manager.checkpoints()] == ["ckpt_last_00000000.pt"]


_CHILD = """
import json, sys, torch
from pathlib import Path
from ml_playground.checkpoint import CheckpointManager, open_store
from ml_playground.config_loader import parse_checkpoint_ref, parse_location
from ml_playground.locations import StorageOptions

args = json.loads(sys.argv[1])
options = StorageOptions(endpoint_url=args["endpoint"], region="us-east-1")
manager = CheckpointManager(open_store(parse_location(args["run_url"], base_dir=Path.cwd(), storage_options=options)))
location, name = parse_checkpoint_ref(args["file_url"], base_dir=Path.cwd(), storage_options=options)
single = CheckpointManager(open_store(location)).load(name)
latest, best = manager.load_latest(), manager.load_best()
torch.save(
    {"latest": latest.model, "best": best.model, "single": single.model,
     "latest_iter": latest.iter_num, "best_iter": best.iter_num, "best_opt": best.optimizer["state"]},
    args["out"],
)
"""


def test_a_new_process_loads_latest_best_and_a_single_file_url_exactly(
    s3_location: S3LocationFactory, moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    manager = _manager(s3_location("e2e"), last=2, best=2)
    written = {}
    for step, loss in [(0, 4.0), (5, 3.0), (10, 3.5), (15, 2.0), (20, 2.2)]:
        checkpoint = make_checkpoint(step, loss, width=64, seed=step + 1)
        written[step] = checkpoint
        if loss in (4.0, 3.0, 2.0):
            manager.save_best(checkpoint)
        manager.save_last(checkpoint)
    assert [info.filename for info in manager.checkpoints()] == [
        "ckpt_last_00000020.pt",
        "ckpt_last_00000015.pt",
        "ckpt_best_00000015_2.000000.pt",
        "ckpt_best_00000005_3.000000.pt",
    ]
    out = tmp_path / "loaded.pt"
    args = {
        "endpoint": moto_server.endpoint,
        "run_url": f"s3://{s3_bucket}/e2e",
        "file_url": f"s3://{s3_bucket}/e2e/ckpt_best_00000005_3.000000.pt",
        "out": str(out),
    }
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(out, weights_only=True)
    assert (loaded["latest_iter"], loaded["best_iter"]) == (20, 15)
    for key, tensor in written[20].model.items():
        assert torch.equal(loaded["latest"][key], tensor), key
    for key, tensor in written[15].model.items():
        assert torch.equal(loaded["best"][key], tensor), key
    for key, tensor in written[5].model.items():
        assert torch.equal(loaded["single"][key], tensor), key
    for index, state in written[15].optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["best_opt"][index][key], value)


def test_checkpoint_ref_splits_a_file_url() -> None:
    location, name = parse_checkpoint_ref("s3://bucket/run/ckpt_last_00000001.pt", base_dir=Path.cwd())
    assert isinstance(location, RemoteLocation)
    assert (location.url, name) == ("s3://bucket/run", "ckpt_last_00000001.pt")


def test_a_network_fault_during_torch_save_surfaces_as_storage_error(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    from botocore.exceptions import ConnectionClosedError

    # one part in flight: the second part's write waits for the first, so the fault surfaces inside torch.save
    manager = _manager(s3_location(part_size_mib=5, max_concurrency=1), last=1, best=0)
    previous = make_checkpoint(1)
    manager.save_last(previous)

    def fail(**_: Any) -> None:
        raise ConnectionClosedError(endpoint_url="injected UploadPart fault")

    store = manager.store
    assert isinstance(store, FsspecStore)
    store.filesystem.connect().meta.events.register("before-send.s3.UploadPart", fail)
    # torch.save turns a failing write into a bare RuntimeError; the store's own error is what surfaces
    with pytest.raises(StorageError, match=r"ckpt_last_00000002\.pt.*injected UploadPart fault"):
        manager.save_last(make_checkpoint(2, width=1100))
    assert [info.filename for info in manager.checkpoints()] == ["ckpt_last_00000001.pt"]
    assert_same_checkpoint(manager.load_latest(), previous)
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_a_checkpoint_rotated_away_during_torch_load_is_reported_as_such(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    location = s3_location()
    writer = _manager(location, last=1, best=0)
    writer.save_last(make_checkpoint(1, width=1100))  # ~19 MiB: four ranged GETs of 5 MiB, one at a time
    store = S3Store(
        location.model_copy(
            update={
                "storage_options": location.storage_options.model_copy(
                    update={"part_size_mib": 5, "max_concurrency": 1}
                )
            }
        ),
        read_block_size=2**20,
    )
    reader = CheckpointManager(store, KeepPolicy(last=1, best=0))
    gets = [0]

    def rotate_after_first_read(**_: Any) -> None:
        gets[0] += 1
        if gets[0] == 2:  # another process saves iteration 2 and rotates iteration 1 away
            s3_admin.put_object(Bucket=s3_bucket, Key="run/ckpt_last_00000002.pt", Body=b"x")
            s3_admin.delete_object(Bucket=s3_bucket, Key="run/ckpt_last_00000001.pt")

    store.filesystem.connect().meta.events.register("before-send.s3.GetObject", rotate_after_first_read)
    with pytest.raises(CheckpointRotatedAwayError, match=r"ckpt_last_00000001\.pt was rotated away"):
        reader.load("ckpt_last_00000001.pt")
