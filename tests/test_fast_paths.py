"""The fast local paths: CRC-free saves, early writeback, path and mmap loads, deferred verification."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import Checkpoint, CheckpointManager, FileOps, KeepPolicy, LocalStore
from ml_playground.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from tests.conftest import ProtocolOnlyStore, assert_same_checkpoint, make_checkpoint

MARKER = 1234.5678  # a float32 value whose bytes we can find in the file


def _checkpoint_with_marker(iter_num: int = 3) -> Checkpoint:
    base = make_checkpoint(iter_num, width=16)
    model = dict(base.model)
    model["marker"] = torch.full((4096,), MARKER, dtype=torch.float32)
    return Checkpoint(
        model=model,
        optimizer=base.optimizer,
        model_args=base.model_args,
        iter_num=base.iter_num,
        best_val_loss=base.best_val_loss,
        rng_state=base.rng_state,
    )


def _flip_marker_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    needle = torch.tensor([MARKER] * 4, dtype=torch.float32).numpy().tobytes()
    at = data.index(needle) + 5
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def manager(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(LocalStore(run_dir, create=True), KeepPolicy(last=2, best=1))


@pytest.mark.parametrize("crc_before", [True, False])
def test_saved_file_loads_with_plain_torch_load_and_crc_switch_is_restored(
    manager: CheckpointManager, run_dir: Path, crc_before: bool
) -> None:
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc_before)
    try:
        name = manager.save_last(_checkpoint_with_marker())
        assert torch.serialization.get_crc32_options() is crc_before
    finally:
        torch.serialization.set_crc32_options(previous)
    assert name is not None
    raw = torch.load(run_dir / name.filename, weights_only=True)
    assert torch.equal(raw["model"]["marker"], torch.full((4096,), MARKER))


@pytest.mark.parametrize("mmap", [False, True])
def test_local_loads_round_trip(manager: CheckpointManager, mmap: bool) -> None:
    original = _checkpoint_with_marker()
    manager.save_last(original)
    assert_same_checkpoint(manager.load_latest(mmap=mmap), original)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mmap_load_maps_the_file_instead_of_copying_it(manager: CheckpointManager, run_dir: Path) -> None:
    name = manager.save_last(_checkpoint_with_marker())
    assert name is not None
    loaded = manager.load(name.filename, mmap=True, verify=False)
    maps = Path("/proc/self/maps").read_text()
    assert str(run_dir / name.filename) in maps
    assert float(loaded.model["marker"][0]) == pytest.approx(MARKER)


def test_default_load_detects_a_flipped_tensor_byte(manager: CheckpointManager, run_dir: Path) -> None:
    name = manager.save_last(_checkpoint_with_marker())
    assert name is not None
    _flip_marker_byte(run_dir / name.filename)
    for mmap in (False, True):
        with pytest.raises(CheckpointCorruptError, match="marker"):
            manager.load(name.filename, mmap=mmap)


def test_deferred_verification_loads_then_verify_finds_the_damage(manager: CheckpointManager, run_dir: Path) -> None:
    name = manager.save_last(_checkpoint_with_marker())
    assert name is not None
    manager.verify(name.filename)  # intact
    _flip_marker_byte(run_dir / name.filename)
    loaded = manager.load(name.filename, mmap=True, verify=False)
    assert loaded.iter_num == 3
    with pytest.raises(CheckpointCorruptError, match=r"tensor model\.marker"):
        manager.verify(name.filename)


def test_verify_of_a_missing_checkpoint_is_not_found(manager: CheckpointManager) -> None:
    with pytest.raises(CheckpointNotFoundError):
        manager.verify("ckpt_last_00000009.pt")


def test_stream_store_loads_and_verifies_but_refuses_mmap(run_dir: Path) -> None:
    manager = CheckpointManager(ProtocolOnlyStore(LocalStore(run_dir, create=True)))
    original = _checkpoint_with_marker()
    name = manager.save_last(original)
    assert name is not None
    assert_same_checkpoint(manager.load(name.filename), original)
    manager.verify(name.filename)
    with pytest.raises(CheckpointError, match="mmap"):
        manager.load(name.filename, mmap=True)


class _RecordingOps(FileOps):
    def __init__(self) -> None:
        self.kicks: list[tuple[int, int]] = []

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        self.kicks.append((offset, length))
        super().start_writeback(fd, offset, length)


def test_large_writes_start_writeback_in_contiguous_pieces(tmp_path: Path) -> None:
    ops = _RecordingOps()
    store = LocalStore(tmp_path, create=True, file_ops=ops)
    payload = bytes(range(256)) * (40 * 4096)  # 40 MiB in one write call
    with store.write("blob") as stream:
        stream.write(payload)
    assert (tmp_path / "blob").read_bytes() == payload
    assert len(ops.kicks) >= 2
    position = 0
    for offset, length in ops.kicks:
        assert offset == position
        position += length
    assert position <= len(payload)
