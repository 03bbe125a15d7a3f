"""Weights-only loads from S3 (issue 6, target 7): only the model's and EMA's bytes cross the wire.

Bytes are counted by a TCP proxy between the store and the moto server (responses as sent, headers
included), so a stray whole-object GET would show however it was made.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, LocalStore, ModelWeights, open_store
from ml_playground.config_loader import parse_location
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointRotatedAwayError,
    StorageError,
)
from tests.conftest import make_checkpoint
from tests.servers import MotoServer, S3LocationFactory
from tests.tcp_proxy import CuttingProxy

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]

WIDTH = 1024  # a 4 MiB weight matrix: the model ~4 MiB, AdamW's state ~8 MiB more, an EMA ~4 MiB


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[CuttingProxy]:
    with CuttingProxy(int(moto_server.endpoint.rsplit(":", 1)[1])) as running:
        yield running


def _save(s3_location: S3LocationFactory, checkpoint: Checkpoint) -> str:
    writer = CheckpointManager(open_store(s3_location(), create=True), KeepPolicy(last=1, best=0))
    name = writer.save_last(checkpoint)
    assert name is not None
    return name.filename


def _reader(s3_location: S3LocationFactory, proxy: CuttingProxy) -> CheckpointManager:
    return CheckpointManager(open_store(s3_location(endpoint_url=proxy.endpoint)))


def _weight_bytes(checkpoint: Checkpoint) -> int:
    states = [checkpoint.model, *([checkpoint.ema] if checkpoint.ema is not None else [])]
    return sum(tensor.untyped_storage().nbytes() for state in states for tensor in state.values())


def _assert_weights_of(weights: ModelWeights, checkpoint: Checkpoint) -> None:
    assert (weights.iter_num, weights.best_val_loss) == (checkpoint.iter_num, checkpoint.best_val_loss)
    assert (dict(weights.model_args), dict(weights.config)) == (dict(checkpoint.model_args), dict(checkpoint.config))
    assert dict(weights.data_state) == dict(checkpoint.data_state)
    assert weights.model.keys() == checkpoint.model.keys()
    for key, tensor in checkpoint.model.items():
        assert torch.equal(weights.model[key], tensor), key
    assert (weights.ema is None) == (checkpoint.ema is None)
    if weights.ema is not None and checkpoint.ema is not None:
        assert weights.ema.keys() == checkpoint.ema.keys()
        for key, tensor in checkpoint.ema.items():
            assert torch.equal(weights.ema[key], tensor), key


def _flip_byte_of(s3_admin: Any, bucket: str, filename: str, tensor: torch.Tensor) -> None:
    """Flip one byte inside ``tensor``'s bytes in the stored object (found by content, whatever the layout)."""
    key = f"run/{filename}"
    blob = bytearray(s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read())
    at = blob.find(tensor.detach().contiguous().numpy().tobytes())
    assert at > 0
    blob[at + 5] ^= 0x40
    s3_admin.put_object(Bucket=bucket, Key=key, Body=bytes(blob))


@pytest.mark.parametrize("ema", [False, True], ids=["no-ema", "ema"])
def test_a_weights_load_fetches_only_the_model_and_ema_bytes(
    s3_location: S3LocationFactory, proxy: CuttingProxy, temp_dir: Path, ema: bool
) -> None:
    checkpoint = make_checkpoint(7, width=WIDTH, ema=ema)
    filename = _save(s3_location, checkpoint)
    reader = _reader(s3_location, proxy)
    size = next(info.size for info in reader.checkpoints() if info.filename == filename)
    proxy.received = 0
    weights = reader.load_weights(filename)
    fetched = proxy.received
    _assert_weights_of(weights, checkpoint)
    wanted = _weight_bytes(checkpoint)
    assert wanted <= fetched <= 1.1 * wanted, (fetched, wanted, size)
    assert fetched < 0.7 * size  # the optimizer's state (2x the model) stayed on the server
    assert list(temp_dir.glob("ml_playground-weights-*")) == []


def test_a_flipped_byte_in_a_model_tensor_is_detected(
    s3_location: S3LocationFactory, proxy: CuttingProxy, s3_admin: Any, s3_bucket: str, temp_dir: Path
) -> None:
    checkpoint = make_checkpoint(7, width=WIDTH, ema=True)
    filename = _save(s3_location, checkpoint)
    _flip_byte_of(s3_admin, s3_bucket, filename, checkpoint.model["0.weight"])
    with pytest.raises(CheckpointCorruptError, match=r"ckpt_last_00000007.pt is damaged: .*model\.0\.weight"):
        _reader(s3_location, proxy).load_weights(filename)
    assert list(temp_dir.glob("ml_playground-weights-*")) == []


def test_a_flipped_byte_in_the_optimizer_state_is_neither_fetched_nor_noticed(
    s3_location: S3LocationFactory, proxy: CuttingProxy, s3_admin: Any, s3_bucket: str, temp_dir: Path
) -> None:
    checkpoint = make_checkpoint(7, width=WIDTH, ema=True)
    filename = _save(s3_location, checkpoint)
    _flip_byte_of(s3_admin, s3_bucket, filename, checkpoint.optimizer["state"][0]["exp_avg"])
    reader = _reader(s3_location, proxy)
    _assert_weights_of(reader.load_weights(filename), checkpoint)
    with pytest.raises(CheckpointCorruptError, match=r"optimizer\.state\.0\.exp_avg"):
        reader.load(filename)  # the damage is real: a full load sees it


def test_an_object_replaced_during_a_weights_load_fails_cleanly(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str, temp_dir: Path
) -> None:
    checkpoint = make_checkpoint(7, width=WIDTH)
    filename = _save(s3_location, checkpoint)
    reader = CheckpointManager(open_store(s3_location()))
    replaced: list[bool] = []

    def replace_once(**_: Any) -> None:
        if not replaced:
            replaced.append(True)
            s3_admin.put_object(Bucket=s3_bucket, Key=f"run/{filename}", Body=b"not the checkpoint")

    reader.store.filesystem.connect().meta.events.register("before-call.s3.GetObject", replace_once)  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match=f"{filename} was replaced while being loaded"):
        reader.load_weights(filename)
    assert replaced == [True]
    assert list(temp_dir.glob("ml_playground-weights-*")) == []


def test_a_missing_checkpoint_is_not_found(s3_location: S3LocationFactory, temp_dir: Path) -> None:
    _save(s3_location, make_checkpoint(7))
    with pytest.raises(CheckpointNotFoundError, match="ckpt_last_00000009.pt"):
        CheckpointManager(open_store(s3_location())).load_weights("ckpt_last_00000009.pt")
    assert list(temp_dir.glob("ml_playground-weights-*")) == []


def test_s3_memory_and_local_stores_give_the_same_weights(s3_location: S3LocationFactory, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(7, width=64, ema=True)
    filename = _save(s3_location, checkpoint)
    memory = parse_location(f"memory://weights-{tmp_path.name}/run", base_dir=tmp_path)
    managers = [
        CheckpointManager(store, KeepPolicy(last=1, best=0))
        for store in (
            open_store(s3_location()),
            open_store(memory, create=True),
            LocalStore(tmp_path / "run", create=True),
        )
    ]
    for manager in managers[1:]:
        assert manager.save_last(checkpoint) is not None
    for manager in managers:
        _assert_weights_of(manager.load_weights(filename), checkpoint)


@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "weights"])
def test_an_object_rotated_away_during_a_ranged_load_is_rotated_away_not_replaced(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str, temp_dir: Path, weights_only: bool
) -> None:
    """A ranged GET's If-Match fails (412 on moto) for a deleted object too: that is rotation, which a
    reader of a chosen checkpoint survives by choosing again, not a replaced object. Found by the reader
    stress test (issue 15)."""
    checkpoint = make_checkpoint(7, width=WIDTH)
    filename = _save(s3_location, checkpoint)
    reader = CheckpointManager(open_store(s3_location()))

    def rotate_away_once(**_: Any) -> None:
        if s3_admin.list_objects_v2(Bucket=s3_bucket, Prefix=f"run/{filename}").get("KeyCount"):
            s3_admin.put_object(Bucket=s3_bucket, Key="run/ckpt_last_00000008.pt", Body=b"newer")
            s3_admin.delete_object(Bucket=s3_bucket, Key=f"run/{filename}")

    reader.store.filesystem.connect().meta.events.register("before-call.s3.GetObject", rotate_away_once)  # type: ignore[attr-defined]
    with pytest.raises(CheckpointRotatedAwayError, match=f"{filename} was rotated away"):
        if weights_only:
            reader.load_weights(filename)
        else:
            reader.load(filename)
    assert list(temp_dir.iterdir()) == []
