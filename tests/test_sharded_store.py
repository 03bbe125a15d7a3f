"""Sharded checkpoints on a store, in one process: discovery, rotation, leftovers, loads, damage, hostile manifests.

The checkpoints here are written through ``checkpoint.sharded.save`` without a process group (one rank,
plain tensors): the same writer, manifest and parts a torchrun run writes, without launching one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from ml_playground.checkpoint import (
    Checkpoint,
    CheckpointKind,
    CheckpointManager,
    CheckpointName,
    KeepPolicy,
    LocalStore,
    decode,
    encode,
    sharded,
)
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNameError,
    StorageError,
)
from tests.conftest import make_checkpoint

pytestmark = pytest.mark.timeout(120)


class RecordingStore(LocalStore):
    """A local store that records its deletes in order and can fail the write of chosen names."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, create=True)
        self.deleted: list[str] = []
        self.fail_writes: set[str] = set()

    @contextlib.contextmanager
    def write(self, name: str) -> Iterator[IO[bytes]]:
        with super().write(name) as stream:
            if any(name.endswith(suffix) for suffix in self.fail_writes):
                raise StorageError(f"{self.url}/{name}: injected write failure")
            yield stream

    def delete(self, name: str) -> None:
        super().delete(name)
        self.deleted.append(name)


def _tensors(checkpoint: Checkpoint) -> dict[str, Any]:
    """What a sharded run hands the writer: the optimizer keyed by parameter names, as DCP's state_dict gives."""
    names = list(checkpoint.model)
    optimizer = checkpoint.optimizer
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer["param_groups"]]
    state = {names[i]: moments for i, moments in optimizer["state"].items()}
    saved = {"model": dict(checkpoint.model), "optim": {"state": state, "param_groups": groups}}
    if checkpoint.ema is not None:
        saved["ema"] = dict(checkpoint.ema)
    return saved


def _save(manager: CheckpointManager, checkpoint: Checkpoint, kind: CheckpointKind = CheckpointKind.LAST) -> str:
    meta = dataclasses.replace(checkpoint, model={}, optimizer={}, ema=None)
    name = manager.prepare_save(kind, meta)
    assert name is not None
    parts = sharded.save(
        manager.store,
        name.filename,
        _tensors(checkpoint),
        manifest=lambda record: dataclasses.replace(meta, shards=record),
    )
    manager.committed(name, parts)
    return name.filename


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "run")


def _files(store: LocalStore) -> list[str]:
    return sorted(p.name for p in store.path.iterdir() if p.name.startswith("ckpt_"))


def test_a_sharded_checkpoint_is_one_checkpoint_with_its_parts(store: RecordingStore) -> None:
    manager = CheckpointManager(store)
    original = make_checkpoint(3, ema=True)
    name = _save(manager, original)
    parts = (f"{name}.part-00000-of-00001.model", f"{name}.part-00000-of-00001.optim")
    assert _files(store) == [name, *parts]
    (info,) = manager.checkpoints()
    assert (info.filename, info.parts, info.world_size, info.sharded) == (name, parts, 1, True)
    assert info.size == sum((store.path / each).stat().st_size for each in (name, *parts))
    loaded = manager.load(name)
    assert loaded.shards is None
    assert loaded.model.keys() == original.model.keys()
    assert all(torch.equal(v, original.model[k]) for k, v in loaded.model.items())
    assert loaded.ema is not None
    assert original.ema is not None
    assert all(torch.equal(v, original.ema[k]) for k, v in loaded.ema.items())
    # the optimizer comes back in torch's own form: parameters numbered as the groups list them
    assert loaded.optimizer["param_groups"] == original.optimizer["param_groups"]
    for index, moments in original.optimizer["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded.optimizer["state"][index][key], value)
    assert (loaded.iter_num, loaded.world_size, dict(loaded.rng_state).keys()) == (3, 1, original.rng_state.keys())
    weights = manager.load_weights(name)
    assert weights.shards is None
    assert weights.ema is not None
    assert weights.model.keys() == original.model.keys()
    manifest = manager.load_manifest(name)
    assert manifest.shards is not None
    assert manifest.has_ema
    assert not manifest.model
    manager.verify(name)


def test_rotation_deletes_the_manifest_before_its_parts(store: RecordingStore) -> None:
    manager = CheckpointManager(store, KeepPolicy(last=1, best=0))
    first = _save(manager, make_checkpoint(1))
    second = _save(manager, make_checkpoint(2))
    assert store.deleted == [first, f"{first}.part-00000-of-00001.model", f"{first}.part-00000-of-00001.optim"]
    assert _files(store) == [second, f"{second}.part-00000-of-00001.model", f"{second}.part-00000-of-00001.optim"]
    with manager.acquire_writer():  # from the lease holder's own view too
        third = _save(manager, make_checkpoint(3))
    assert store.deleted[3:] == [second, f"{second}.part-00000-of-00001.model", f"{second}.part-00000-of-00001.optim"]
    assert [info.filename for info in manager.checkpoints()] == [third]


def test_leftovers_are_listed_and_only_the_writer_removes_them(store: RecordingStore) -> None:
    manager = CheckpointManager(store)
    name = _save(manager, make_checkpoint(1))
    leftover = "ckpt_last_00000002.pt.part-00001-of-00002.optim"
    (store.path / leftover).write_bytes(b"half a save")
    assert [info.filename for info in manager.checkpoints()] == [name]
    assert [obj.name for obj in manager.leftovers()] == [leftover]
    with pytest.raises(CheckpointError, match="only the writer"):
        manager.remove_leftovers()
    assert leftover in _files(store)
    with manager.acquire_writer():
        assert leftover not in _files(store)
    assert manager.leftovers() == []


@pytest.mark.parametrize(
    "name",
    [
        "ckpt_last_00000001.pt.part-1-of-2.model",  # ranks with fewer than 5 digits
        "ckpt_last_00000001.pt.part-00002-of-00002.model",  # a rank beyond the world size
        "ckpt_last_00000001.pt.part-00000-of-00001.weights",
        "ckpt_last_1.pt.part-00000-of-00001.model",  # not a checkpoint's name before it
    ],
)
def test_a_name_that_looks_like_a_part_but_is_not_one_is_a_clear_error(store: RecordingStore, name: str) -> None:
    (store.path / name).write_bytes(b"")
    with pytest.raises(CheckpointNameError, match="part"):
        CheckpointManager(store).checkpoints()


def _damaged(store: LocalStore, part: str, offset: int) -> None:
    path = store.path / part
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_part_is_caught_and_names_the_part(store: RecordingStore) -> None:
    manager = CheckpointManager(store)
    name = _save(manager, make_checkpoint(1))
    part = f"{name}.part-00000-of-00001.model"
    _damaged(store, part, 5)
    for read in (manager.verify, manager.load, manager.load_weights):
        with pytest.raises(CheckpointCorruptError, match=part.replace(".", r"\.")):
            read(name)


def test_a_truncated_or_missing_part_is_caught(store: RecordingStore) -> None:
    manager = CheckpointManager(store)
    name = _save(manager, make_checkpoint(1))
    part = store.path / f"{name}.part-00000-of-00001.optim"
    part.write_bytes(part.read_bytes()[:-3])
    with pytest.raises(CheckpointCorruptError, match="bytes, not the"):
        manager.verify(name)
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        manager.load(name)
    part.unlink()
    with pytest.raises(CheckpointCorruptError, match="incomplete: its part .* is missing"):
        manager.load(name)
    with pytest.raises(CheckpointCorruptError, match="is missing"):
        manager.verify(name)


def test_a_failed_part_write_leaves_no_manifest_and_no_part(store: RecordingStore) -> None:
    manager = CheckpointManager(store)
    store.fail_writes = {".optim"}  # the model part commits first, then the optimizer part fails
    with pytest.raises(StorageError, match="injected"):
        _save(manager, make_checkpoint(1))
    assert _files(store) == []
    assert store.deleted == ["ckpt_last_00000001.pt.part-00000-of-00001.model"]


def test_a_failed_manifest_write_leaves_no_part(store: RecordingStore) -> None:
    manager = CheckpointManager(store)
    store.fail_writes = {"0001.pt"}
    with pytest.raises(StorageError, match="injected"):
        _save(manager, make_checkpoint(1))
    assert _files(store) == []


def _rewritten(store: LocalStore, name: str, change: Any) -> None:
    """The manifest ``name`` re-encoded (its digests valid) with ``change(shards)`` applied to its record, whose
    DCP metadata is given to ``change`` decoded from its JSON text."""
    path = store.path / name
    manifest = decode(path, source=name)
    assert manifest.shards is not None
    record = dict(manifest.shards)
    plain = json.loads(record["dcp"])
    changed = change({**record, "parts": dict(record["parts"]), "dcp": plain})
    if changed["dcp"] is plain:  # changed in place: written back as JSON text (else as ``change`` left it)
        changed["dcp"] = json.dumps(plain)
    buffer = io.BytesIO()
    encode(dataclasses.replace(manifest, shards=changed), buffer)
    path.write_bytes(buffer.getvalue())


def _first_item(shards: dict[str, Any]) -> dict[str, Any]:
    return shards["dcp"]["storage"][0][1]


def _other_part(shards: dict[str, Any]) -> dict[str, Any]:
    _first_item(shards)["part"] = "ckpt_last_00000009.pt.part-00000-of-00001.model"
    return shards


def _outside(shards: dict[str, Any]) -> dict[str, Any]:
    _first_item(shards)["offset"] = 10**9
    return shards


def _foreign_parts(shards: dict[str, Any]) -> dict[str, Any]:
    shards["parts"] = {"ckpt_last_00000009.pt.part-00000-of-00001.model": 1, **shards["parts"]}
    return shards


def _chunk_shrunk(shards: dict[str, Any]) -> dict[str, Any]:
    for entry in shards["dcp"]["items"]:
        if entry["kind"] == "tensor":
            entry["chunks"][0][1][0] -= 1  # [offsets, sizes] of the first chunk
            return shards
    raise AssertionError("no tensor")


def _path_collision(shards: dict[str, Any]) -> dict[str, Any]:
    paths = shards["dcp"]["paths"]
    paths[1][1] = list(paths[0][1])
    return shards


def _no_sections(shards: dict[str, Any]) -> dict[str, Any]:
    shards["sections"] = ["model", "ema", "optim"]  # no EMA was saved
    return shards


def _big_endian(shards: dict[str, Any]) -> dict[str, Any]:
    shards["byteorder"] = "big"
    return shards


def _dcp_as_tables(shards: dict[str, Any]) -> dict[str, Any]:
    shards["dcp"] = {"text": json.dumps(shards["dcp"])}  # plain data, but not the JSON text a manifest keeps
    return shards


def _dcp_not_json(shards: dict[str, Any]) -> dict[str, Any]:
    shards["dcp"] = json.dumps(shards["dcp"])[:-1]
    return shards


def _dcp_nested_too_deep(shards: dict[str, Any]) -> dict[str, Any]:
    shards["dcp"] = "[" * 200_000 + "]" * 200_000
    return shards


def _first_offset_written_as(text: str) -> Any:
    def change(shards: dict[str, Any]) -> dict[str, Any]:
        plain = json.dumps(shards["dcp"], separators=(",", ":"))
        assert '"offset":0' in plain
        shards["dcp"] = plain.replace('"offset":0', f'"offset":{text}', 1)
        return shards

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_other_part, "outside its part"),
        (_outside, "outside its part"),
        (_foreign_parts, "not a part of it"),
        (_chunk_shrunk, "do not cover it exactly|no saved bytes of its size"),
        (_path_collision, "path"),
        (_no_sections, "sections"),
        (_big_endian, "endian"),
        (_dcp_as_tables, "its DCP metadata is a dict, not JSON text"),
        (_dcp_not_json, "not JSON"),
        (_dcp_nested_too_deep, "not JSON"),
        (_first_offset_written_as("NaN"), "not JSON"),
        (_first_offset_written_as("9" * 5000), "not JSON"),  # beyond int's digit limit for text
        (_first_offset_written_as("0.0"), "offset = 0.0"),
    ],
)
def test_a_manifest_whose_record_does_not_hold_together_is_refused(
    store: RecordingStore, change: Any, message: str
) -> None:
    manager = CheckpointManager(store)
    name = _save(manager, make_checkpoint(1))
    _rewritten(store, name, change)
    with pytest.raises(CheckpointError, match=message):
        manager.load(name)


def test_a_manifest_keeps_dcp_metadata_as_one_json_text(store: RecordingStore) -> None:
    """One string, not thousands of small lists: every rank of a load unpickles and walks the manifest
    (docs/file-format.md, "Sharded checkpoints: the manifest")."""
    manager = CheckpointManager(store)
    name = _save(manager, make_checkpoint(1, ema=True))
    record = torch.load(store.path / name, weights_only=True)["shards"]
    assert isinstance(record["dcp"], str)
    plain = json.loads(record["dcp"])
    assert set(plain) == {"items", "paths", "storage"}
    assert {"model.0.weight", "ema.0.weight"} <= {entry["fqn"] for entry in plain["items"]}


def test_a_sharded_manifest_names_its_checkpoint_and_never_replaces_one(store: RecordingStore) -> None:
    manager = CheckpointManager(store)
    name = _save(manager, make_checkpoint(1))
    assert CheckpointName.parse(name).iter_num == 1
    with pytest.raises(CheckpointError):
        _save(manager, make_checkpoint(1))
    assert manager.load(name).iter_num == 1
