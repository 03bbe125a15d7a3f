"""A training run's sharded load (``checkpoint.sharded.load_into``, DCP's reader over our store) in one process.

Two ways into a run's tensors: straight into a contiguous tensor that takes a whole saved chunk (a load at the
world size it was saved at), or through a buffer narrowed and copied (resharding, or a tensor whose memory is
not one contiguous run). Both fill the tensors with the saved values and both verify every byte they read.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from ml_playground.checkpoint import (
    Capabilities,
    Checkpoint,
    CheckpointManager,
    LocalStore,
    open_store,
    sharded,
)
from ml_playground.config_loader import parse_location
from ml_playground.errors import CheckpointCorruptError
from tests.conftest import make_checkpoint
from tests.test_sharded_store import _save
from tests.test_sharded_store import _tensors as _state

pytestmark = pytest.mark.timeout(120)


def _templates(saved: dict[str, Any], *, contiguous: bool) -> dict[str, Any]:
    """Zeroed tensors of the saved shapes; ``contiguous=False``: every matrix a transposed (strided) view."""

    def empty(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: empty(item) for key, item in value.items()}
        if isinstance(value, list):
            return [empty(item) for item in value]
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() == 2 and not contiguous:
            return torch.zeros(value.shape[::-1], dtype=value.dtype).t()
        return torch.zeros_like(value)

    return {key: empty(value) for key, value in saved.items()}


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    return []


def _assert_holds(templates: dict[str, Any], checkpoint: Checkpoint) -> None:
    """Every tensor of ``templates`` equals the saved one (bitwise)."""
    for loaded, saved in zip(_tensors(templates), _tensors(_state(checkpoint)), strict=True):
        assert torch.equal(loaded, saved)


def _index(manager: CheckpointManager, name: str) -> sharded.ShardIndex:
    return sharded.ShardIndex.of(manager.load_manifest(name).shards, name, f"{manager.store.url}/{name}")


def _load(manager: CheckpointManager, name: str, templates: dict[str, Any]) -> None:
    sharded.load_into(manager.store, name, _index(manager, name), templates)


@pytest.mark.parametrize("contiguous", [True, False], ids=["into the tensors", "through a buffer"])
def test_a_load_fills_every_tensor_with_the_saved_values(tmp_path: Path, contiguous: bool) -> None:
    checkpoint = make_checkpoint(3, width=6)
    manager = CheckpointManager(LocalStore(tmp_path / "run", create=True))
    name = _save(manager, checkpoint)
    templates = _templates(_state(checkpoint), contiguous=contiguous)
    assert any(not t.is_contiguous() for t in _tensors(templates)) == (not contiguous)
    _load(manager, name, templates)
    _assert_holds(templates, checkpoint)


def test_reads_through_a_buffer_share_one_buffer(tmp_path: Path) -> None:
    """A resharded load reads each saved chunk whole into one buffer, grown to the largest chunk, not a fresh
    buffer per chunk: at world size 3 from 2, fresh buffers grew each rank's peak RSS 46-73 MiB (the scratch
    buffer: 15-17 MiB; docs/performance.md, "Sharded checkpoints (FSDP2)"). Counted with torch's profiler:
    every CPU allocation of the load."""
    generator = torch.Generator().manual_seed(0)
    rows = [512, 1024, 1536, 768, 1280, 256, 1792, 640]  # matrices of 1024 columns, 2 to 7 MiB
    model = {f"w{i}": torch.rand(n, 1024, generator=generator) for i, n in enumerate(rows)}
    moments = {
        i: {"exp_avg": w.clone(), "exp_avg_sq": w.clone(), "step": torch.tensor(1.0)}
        for i, w in enumerate(model.values())
    }
    checkpoint = Checkpoint(
        model=model,
        optimizer={"state": moments, "param_groups": [{"params": list(moments)}]},
        model_args={},
        iter_num=1,
        best_val_loss=1.0,
    )
    manager = CheckpointManager(LocalStore(tmp_path / "run", create=True))
    name = _save(manager, checkpoint)
    index = _index(manager, name)
    templates = _templates(_state(checkpoint), contiguous=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        sharded.load_into(manager.store, name, index, templates)
    allocated = sum(event.cpu_memory_usage for event in profile.events() if event.cpu_memory_usage > 0)
    largest = max(w.numel() * w.element_size() for w in model.values())
    read = 3 * sum(w.numel() * w.element_size() for w in model.values())
    assert largest <= allocated <= 4 * largest < read / 3  # grown to the largest chunk, a few times at most
    _assert_holds(templates, checkpoint)


class StreamedStore(LocalStore):
    """A local store read only through its streams, as a store with no local files and no sparse copies is."""

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, local_path=None, local_copy=None, partial_copy=None)


@pytest.mark.parametrize("contiguous", [True, False], ids=["into the tensors", "through a buffer"])
def test_a_load_through_the_stores_stream_fills_every_tensor_and_verifies(tmp_path: Path, contiguous: bool) -> None:
    store = StreamedStore(tmp_path / "run", create=True)
    manager = CheckpointManager(store)
    checkpoint = make_checkpoint(2, width=5)
    name = _save(manager, checkpoint)
    templates = _templates(_state(checkpoint), contiguous=contiguous)
    _load(manager, name, templates)
    _assert_holds(templates, checkpoint)
    part = store.path / f"{name}.part-00000-of-00001.model"
    original = part.read_bytes()
    data = bytearray(original)
    data[7] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=re.escape(f"{part.name} is damaged")):
        _load(manager, name, _templates(_state(checkpoint), contiguous=contiguous))
    part.write_bytes(original[:-3])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        _load(manager, name, _templates(_state(checkpoint), contiguous=contiguous))


def test_a_load_from_memory_fills_every_tensor_and_verifies(tmp_path: Path) -> None:
    """memory:// reads through a sparse copy of the ranges asked for."""
    location = parse_location(f"memory://reads-{tmp_path.name}/run", base_dir=tmp_path)
    manager = CheckpointManager(open_store(location, create=True))
    checkpoint = make_checkpoint(2, width=5)
    name = _save(manager, checkpoint)
    templates = _templates(_state(checkpoint), contiguous=True)
    _load(manager, name, templates)
    _assert_holds(templates, checkpoint)
    part = f"{location.url}/{name}.part-00000-of-00001.optim"
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat(part))
    data[-9] ^= 0x01
    fs.pipe(part, bytes(data))
    with pytest.raises(CheckpointCorruptError, match=re.escape(f"{part} is damaged")):
        _load(manager, name, _templates(_state(checkpoint), contiguous=True))


@pytest.mark.parametrize("contiguous", [True, False], ids=["into the tensors", "through a buffer"])
@pytest.mark.parametrize("kind", ["model", "optim"])
def test_a_flipped_bit_fails_the_load_naming_the_part(tmp_path: Path, contiguous: bool, kind: str) -> None:
    checkpoint = make_checkpoint(3, width=6)
    store = LocalStore(tmp_path / "run", create=True)
    manager = CheckpointManager(store)
    name = _save(manager, checkpoint)
    part = f"{name}.part-00000-of-00001.{kind}"
    path = store.path / part
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=re.escape(f"{part} is damaged")):
        _load(manager, name, _templates(_state(checkpoint), contiguous=contiguous))


@pytest.mark.parametrize("contiguous", [True, False], ids=["into the tensors", "through a buffer"])
def test_a_truncated_part_fails_the_load(tmp_path: Path, contiguous: bool) -> None:
    checkpoint = make_checkpoint(3, width=6)
    store = LocalStore(tmp_path / "run", create=True)
    manager = CheckpointManager(store)
    name = _save(manager, checkpoint)
    path = store.path / f"{name}.part-00000-of-00001.model"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        _load(manager, name, _templates(_state(checkpoint), contiguous=contiguous))
