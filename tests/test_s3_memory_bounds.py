"""Memory guards of S3 saves and loads (issue 6, targets 3 and 4), measured in a subprocess.

moto runs in its own process (tests/servers.py), so its copies of the object are not the client's.
A save (a single file, or one rank's parts of a sharded checkpoint) streams: at most ``max_concurrency`` parts
in flight plus the one being filled, whatever the checkpoint's size. A load fetches ranges concurrently into a
temporary file and loads it by path: the tensors are the only large allocation (peak <= 1.2x the checkpoint),
and the temporary file is gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.servers import S3LocationFactory

pytestmark = [pytest.mark.s3, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

TENSOR_MIB = 96

PROBE = textwrap.dedent(
    """
    import gc, json, re, sys
    from pathlib import Path
    import torch
    from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, open_store
    from ml_playground.locations import RemoteLocation

    def status():
        text = Path("/proc/self/status").read_text()
        return {k: int(re.search(rf"^{k}:\\s+(\\d+) kB", text, re.M).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}

    location = RemoteLocation.model_validate_json(sys.argv[1])
    total, mib = int(sys.argv[2]), 2**20
    model = {f"w{i}": torch.rand(8 * mib // 4) for i in range(total // 8 // 3)}
    state = {i: {"exp_avg": torch.rand_like(w), "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(1.0)}
             for i, w in enumerate(model.values())}
    checkpoint = Checkpoint(model=model, optimizer={"state": state, "param_groups": [{"params": list(state)}]},
                            model_args={}, iter_num=1, best_val_loss=1.0)
    name = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=0)).save_last(checkpoint)
    del checkpoint, model, state
    gc.collect()
    reader = CheckpointManager(open_store(location, create=False))
    start = status()
    Path("/proc/self/clear_refs").write_text("5")
    loaded = reader.load(name.filename)
    end = status()
    size = sum(t.numel() * t.element_size() for t in loaded.model.values())
    print(json.dumps({"peak": end["VmHWM"] - start["VmRSS"], "model_mib": size / mib}))
    """
)


@pytest.mark.timeout(120)
def test_s3_load_peak_is_within_1_2x_of_the_checkpoint(s3_location: S3LocationFactory, tmp_path: Path) -> None:
    # 16 MiB ranges, 4 in flight: six ranges, so concurrency is exercised
    location = s3_location(part_size_mib=16, max_concurrency=4)
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, location.model_dump_json(), str(TENSOR_MIB)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "TMPDIR": str(temp), "AWS_EC2_METADATA_DISABLED": "true"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model_mib"] == pytest.approx(TENSOR_MIB / 3, rel=0.05)  # the load really happened
    assert result["peak"] <= 1.2 * TENSOR_MIB, result
    assert list(temp.glob("ml_playground-load-*")) == []  # the temporary copy is deleted after the load


SAVE_PROBE = textwrap.dedent(
    """
    import gc, json, re, sys
    from pathlib import Path
    import torch
    from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, open_store
    from ml_playground.locations import RemoteLocation

    def status():
        text = Path("/proc/self/status").read_text()
        return {k: int(re.search(rf"^{k}:\\s+(\\d+) kB", text, re.M).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}

    def checkpoint(iter_num, total_mib):
        mib = 2**20
        model = {f"w{i}": torch.rand(8 * mib // 4) for i in range(max(total_mib // 8 // 3, 1))}
        state = {i: {"exp_avg": torch.rand_like(w), "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(1.0)}
                 for i, w in enumerate(model.values())}
        return Checkpoint(model=model, optimizer={"state": state, "param_groups": [{"params": list(state)}]},
                          model_args={}, iter_num=iter_num, best_val_loss=1.0)

    location = RemoteLocation.model_validate_json(sys.argv[1])
    manager = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=0))
    if sys.argv[3] == "sharded":  # one rank's parts and its manifest, through DCP with our writer
        from tests.test_sharded_store import _save
        save = lambda ckpt: _save(manager, ckpt)
    else:
        save = lambda ckpt: manager.save_last(ckpt).filename
    save(checkpoint(0, 24))  # botocore's service models and aiohttp (and DCP) load here, not in the save
    big = checkpoint(1, int(sys.argv[2]))  # the tensors exist before the measured save, as in training
    gc.collect()
    start = status()
    Path("/proc/self/clear_refs").write_text("5")
    name = save(big)
    end = status()
    print(json.dumps({"peak": end["VmHWM"] - start["VmRSS"], "name": name}))
    """
)

# 19 parts of 5 MiB (S3's smallest part), two in flight
SAVE_TENSOR_MIB, PART_MIB, IN_FLIGHT = 96, 5, 2
SAVE_OVERHEAD_MIB = 16  # torch's pickle, buffers of aiohttp and botocore; measured 5-8 MiB


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_s3_save_peak_is_the_parts_in_flight_not_the_checkpoint(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str, layout: str
) -> None:
    location = s3_location(part_size_mib=PART_MIB, max_concurrency=IN_FLIGHT)
    done = subprocess.run(
        [sys.executable, "-c", SAVE_PROBE, location.model_dump_json(), str(SAVE_TENSOR_MIB), layout],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    objects = s3_admin.list_objects_v2(Bucket=s3_bucket, Prefix=f"run/{result['name']}")["Contents"]
    size = sum(obj["Size"] for obj in objects)  # the file, or the manifest and the parts (each of many parts)
    assert size >= SAVE_TENSOR_MIB * 2**20  # the save really happened
    # max_concurrency parts in flight plus the one being filled (docs/performance.md, target 3)
    assert result["peak"] <= PART_MIB * (IN_FLIGHT + 1) + SAVE_OVERHEAD_MIB, result
