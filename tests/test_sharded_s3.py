"""Sharded checkpoints on S3 (moto on loopback): FSDP training at world size 2 writes there and resumes there
bitwise; ``sample`` and ``eval`` of a sharded checkpoint fetch only its weights; ``ckpt cp`` copies a sharded run
S3 -> local and local -> S3, parts first and manifest last, and the copy verifies on the target.

Bytes over the wire are counted by a TCP proxy between the readers and the moto server (responses as sent,
headers included), as in tests/test_s3_weights.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore, open_store
from ml_playground.errors import CheckpointCorruptError
from tests.cli_support import TINY, assert_same_state, ckpt_names, run_cli, run_main, sets
from tests.conftest import make_checkpoint
from tests.distributed_support import rank_text, torchrun
from tests.servers import MotoServer, S3LocationFactory
from tests.tcp_proxy import CuttingProxy
from tests.test_sharded_store import _save

pytestmark = [pytest.mark.s3, pytest.mark.distributed, pytest.mark.timeout(600)]

FSDP = [*TINY, *sets(distributed__strategy="fsdp", distributed__timeout_s=60, ema_decay=0.9)]
RESUMED = [*FSDP, *sets(eval_interval=4, checkpointing__interval=4, train__model__dropout=0.1, train__model__n_layer=2)]
BIG = sets(train__model__n_layer=2, train__model__n_embd=256, train__model__n_head=4)  # 6.4 MB of weights


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[CuttingProxy]:
    with CuttingProxy(int(moto_server.endpoint.rsplit(":", 1)[1])) as running:
        yield running


def _writing(location: Any) -> list[str]:
    endpoint = location.storage_options.endpoint_url
    return sets(out_dir=f"s3://{location.root}", storage_options__endpoint_url=endpoint)


def _ok(result: Any) -> Any:
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Traceback" not in text
    assert "Warning" not in text
    return result


@pytest.mark.parametrize("kind", ["model", "optim"])
def test_a_flipped_bit_in_an_s3_part_is_caught_on_load_naming_the_part(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str, kind: str
) -> None:
    manager = CheckpointManager(open_store(s3_location(), create=True), KeepPolicy(last=1, best=0))
    name = _save(manager, make_checkpoint(1, width=256, ema=True))  # one rank, without a process group
    part = f"{name}.part-00000-of-00001.{kind}"
    blob = bytearray(s3_admin.get_object(Bucket=s3_bucket, Key=f"run/{part}")["Body"].read())
    blob[len(blob) // 2] ^= 0x10
    s3_admin.put_object(Bucket=s3_bucket, Key=f"run/{part}", Body=bytes(blob))
    reader = CheckpointManager(open_store(s3_location()))
    reads = [reader.verify, reader.load] + ([reader.load_weights] if kind == "model" else [])
    for read in reads:  # ranged reads of a weights-only load included
        with pytest.raises(CheckpointCorruptError, match=part.replace(".", r"\.")):
            read(name)
    if kind == "optim":
        assert reader.load_weights(name).iter_num == 1  # never fetched, so never noticed


def test_an_fsdp_run_on_s3_resumes_there_bitwise(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str, tmp_path: Path
) -> None:
    whole, split = s3_location("whole"), s3_location("split")
    _ok(torchrun(["train", *RESUMED, *_writing(whole), *sets(max_iters=12)], tmp_path))
    asynchronous = sets(checkpointing__async_save=True)  # the other side saves in the background
    _ok(torchrun(["train", *RESUMED, *_writing(split), *asynchronous, *sets(max_iters=8)], tmp_path))
    resumed = _ok(torchrun(["train", *RESUMED, *_writing(split), *asynchronous, *sets(max_iters=12)], tmp_path))
    assert "resuming from iteration 8" in rank_text(resumed, 0)
    managers = CheckpointManager(open_store(whole)), CheckpointManager(open_store(split))
    names = [sorted(info.filename for info in manager.checkpoints()) for manager in managers]
    assert names[0] == names[1]
    assert "ckpt_last_00000012.pt" in names[0]
    for name in ("ckpt_last_00000012.pt", "ckpt_last_00000008.pt"):
        assert_same_state(managers[0].load(name), managers[1].load(name))
    info = managers[1].checkpoints()[0]
    assert (info.sharded, info.world_size) == (True, 2)
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_readers_of_a_sharded_s3_run_fetch_only_the_weights_and_cp_copies_it_both_ways(
    s3_location: S3LocationFactory,
    proxy: CuttingProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    location = s3_location("run")
    url = f"s3://{location.root}"
    train = ["train", *FSDP, *BIG, *_writing(location), *sets(max_iters=1, checkpointing__interval=1)]
    _ok(torchrun(train, tmp_path))
    name = "ckpt_last_00000001.pt"  # the optimizer has stepped: its state (2x the model) is in the parts
    manager = CheckpointManager(open_store(location))
    info = next(info for info in manager.checkpoints() if info.filename == name)
    weights = manager.load_weights(name)
    assert weights.ema is not None
    wanted = sum(t.untyped_storage().nbytes() for state in (weights.model, weights.ema) for t in state.values())

    reading = [
        "--checkpoint",
        f"{url}/{name}",
        "--set",
        f"sample.runtime.storage_options.endpoint_url={proxy.endpoint}",
    ]
    for command in (["sample", *reading, *sets(sample__sample__max_new_tokens=8)], ["eval", *reading]):
        proxy.received = 0
        result = run_main(command, tmp_path, capsys)
        assert result.returncode == 0, result.stdout + result.stderr
        assert wanted <= proxy.received <= 1.1 * wanted, (command[0], proxy.received, wanted, info.size)
        assert proxy.received < 0.6 * info.size  # the optimizer's state stayed on the server

    opt = ["-o", f"endpoint_url={proxy.endpoint}"]
    local = tmp_path / "copy"
    down = run_main(["ckpt", "cp", url, str(local), *opt], tmp_path, capsys)
    assert down.returncode == 0, down.stderr
    assert ckpt_names(local) == sorted(obj.name for obj in manager.store.list() if obj.name.startswith("ckpt_"))
    verified = run_cli(["ckpt", "verify", str(local)], tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert_same_state(CheckpointManager(LocalStore(local)).load(name), manager.load(name))

    target = s3_location("back")
    proxy.requests.clear()
    up = run_main(["ckpt", "cp", str(local), f"s3://{target.root}", *opt], tmp_path, capsys)
    assert up.returncode == 0, up.stderr
    writes = [
        line.split()[1].decode().split("?")[0].rsplit("/", 1)[1] for line in proxy.requests if line.startswith(b"PUT ")
    ]
    for copied in manager.checkpoints():  # each checkpoint: every part written before its manifest
        order = [written for written in writes if written.startswith(copied.filename)]
        assert order[-1] == copied.filename, order
        assert sorted(set(order[:-1])) == sorted(copied.parts)
    verified = run_cli(["ckpt", "verify", f"s3://{target.root}", *opt], tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert_same_state(CheckpointManager(open_store(target)).load(name), manager.load(name))
