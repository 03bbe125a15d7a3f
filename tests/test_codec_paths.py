"""Whole loads of a local file (``decode(path)``, what every local load and a remote store's local copy use).

The result must equal what ``torch.load`` returns, views and shared storages included, must not depend on
the file afterwards, and damage anywhere in the tensor data must be an error naming the tensor."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import Checkpoint, decode, encode
from ml_playground.errors import CheckpointCorruptError
from tests.conftest import awkward_checkpoint, make_checkpoint

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Checkpoint, Path]:
    checkpoint = awkward_checkpoint(make_checkpoint(width=16))
    path = tmp_path / "ckpt_last_00000003.pt"
    with path.open("wb") as handle:
        encode(checkpoint, handle)
    return checkpoint, path


@pytest.mark.parametrize("verify", [True, False])
def test_a_whole_load_by_path_equals_torch_load(saved: tuple[Checkpoint, Path], verify: bool) -> None:
    checkpoint, path = saved
    loaded = decode(path, source="ckpt", verify=verify)
    plain = torch.load(path, weights_only=True)
    for key, tensor in checkpoint.model.items():
        assert torch.equal(loaded.model[key], tensor), key
        assert loaded.model[key].stride() == plain["model"][key].stride(), key
        assert loaded.model[key].storage_offset() == plain["model"][key].storage_offset(), key
    assert loaded.ema is not None
    assert all(torch.equal(loaded.ema[key], value) for key, value in (checkpoint.ema or {}).items())
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], checkpoint.optimizer["state"][0]["exp_avg"])
    # shared storages stay shared, as torch.load keeps them
    storage = loaded.model["grid"].untyped_storage().data_ptr()
    assert loaded.model["row_view"].untyped_storage().data_ptr() == storage
    assert loaded.model["transposed"].untyped_storage().data_ptr() == storage
    assert loaded.model["tied"].data_ptr() == loaded.model["0.weight"].data_ptr()


def test_the_result_does_not_depend_on_the_file(saved: tuple[Checkpoint, Path]) -> None:
    checkpoint, path = saved
    loaded = decode(path, source="ckpt")
    path.write_bytes(b"\0" * path.stat().st_size)  # in place: a tensor still mapped from it would change
    assert torch.equal(loaded.model["0.weight"], checkpoint.model["0.weight"])
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg_sq"], checkpoint.optimizer["state"][0]["exp_avg_sq"])


def test_a_flipped_optimizer_byte_is_found_and_named(saved: tuple[Checkpoint, Path]) -> None:
    checkpoint, path = saved
    data = bytearray(path.read_bytes())
    at = bytes(data).index(checkpoint.optimizer["state"][1]["exp_avg"].numpy().tobytes())
    data[at + 2] ^= 0x04
    path.write_bytes(bytes(data))
    damaged = r"ckpt is damaged: the bytes of tensor optimizer\.state\.1\.exp_avg\b"
    with pytest.raises(CheckpointCorruptError, match=damaged):
        decode(path, source="ckpt")
    assert decode(path, source="ckpt", verify=False).iter_num == 3


def test_a_file_cut_inside_its_tensor_data_is_corrupt(saved: tuple[Checkpoint, Path]) -> None:
    checkpoint, path = saved
    data = path.read_bytes()
    inside = data.index(checkpoint.model["0.weight"].numpy().tobytes()) + 10
    for length in (inside, len(data) // 2, len(data) - 200):
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointCorruptError, match="ckpt"):
            decode(path, source="ckpt")


def test_a_verified_load_to_the_meta_device_verifies_first_then_moves(saved: tuple[Checkpoint, Path]) -> None:
    _, path = saved
    loaded = decode(path, source="ckpt", map_location="meta")
    assert {tensor.device.type for tensor in loaded.model.values()} == {"meta"}
    assert loaded.model["grid"].shape == (4, 6)


def test_a_file_of_the_other_byte_order_loads_as_torch_load_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.save records sys.byteorder and torch.load swaps the bytes of a file from the other order;
    # (a reader that copied the bytes as they lie in the file, without swapping, would load other values)
    other = "big" if sys.byteorder == "little" else "little"
    checkpoint = make_checkpoint(width=4)
    buffer = io.BytesIO()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "byteorder", other)
        encode(checkpoint, buffer)
    path = tmp_path / "other.pt"
    path.write_bytes(buffer.getvalue())
    loaded = decode(path, source="other.pt", verify=False)
    swapped = torch.load(path, weights_only=True)["model"]["0.weight"]
    assert torch.equal(loaded.model["0.weight"], swapped)
    assert not torch.equal(swapped, checkpoint.model["0.weight"])


@pytest.mark.parametrize("model", [{}, {"empty": torch.empty(0, 3)}], ids=["no-tensors", "an-empty-tensor"])
def test_a_checkpoint_with_no_tensor_bytes_loads_by_path(tmp_path: Path, model: dict[str, torch.Tensor]) -> None:
    checkpoint = Checkpoint(model=model, optimizer={}, model_args={}, iter_num=1, best_val_loss=1.0)
    path = tmp_path / "ckpt.pt"
    with path.open("wb") as handle:
        encode(checkpoint, handle)
    loaded = decode(path, source="ckpt")
    assert {key: tuple(value.shape) for key, value in loaded.model.items()} == {
        k: tuple(v.shape) for k, v in model.items()
    }
