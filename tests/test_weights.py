"""Weights-only loads (``CheckpointManager.load_weights``) from local and ``memory://`` stores.

The S3 side (bytes fetched, If-Match) is in ``test_s3_weights.py``.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import (
    Checkpoint,
    CheckpointManager,
    KeepPolicy,
    LocalStore,
    open_store,
)
from ml_playground.config_loader import parse_location
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointRotatedAwayError,
    CheckpointSchemaError,
)
from tests.conftest import ProtocolOnlyStore, make_checkpoint

pytestmark = pytest.mark.timeout(60)


def _local(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(LocalStore(tmp_path / "run", create=True), KeepPolicy(last=2, best=1))


def _memory(tmp_path: Path) -> CheckpointManager:
    location = parse_location(f"memory://weights-{tmp_path.name}/run", base_dir=tmp_path)
    return CheckpointManager(open_store(location, create=True), KeepPolicy(last=2, best=1))


def _protocol_only(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(ProtocolOnlyStore(LocalStore(tmp_path / "run", create=True)), KeepPolicy(last=2, best=1))


def _tied(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint with a tied weight (two keys, one storage, as GPT's wte/lm_head) and an empty buffer."""
    model = dict(checkpoint.model)
    model["tied.weight"] = model["0.weight"]
    model["empty"] = torch.empty(0, 3)
    return dataclasses.replace(checkpoint, model=model)


@pytest.mark.parametrize("make", [_local, _memory, _protocol_only], ids=["local", "memory", "protocol-only"])
@pytest.mark.parametrize("ema", [False, True], ids=["no-ema", "ema"])
def test_load_weights_returns_the_model_ema_and_metadata(tmp_path: Path, make: object, ema: bool) -> None:
    manager = make(tmp_path)  # type: ignore[operator]
    checkpoint = _tied(make_checkpoint(12, 0.25, width=32, ema=ema))
    name = manager.save_best(checkpoint)
    weights = manager.load_weights(name.filename)
    assert (weights.iter_num, weights.best_val_loss) == (12, 0.25)
    assert dict(weights.model_args) == dict(checkpoint.model_args)
    assert dict(weights.config) == dict(checkpoint.config)
    assert dict(weights.data_state) == dict(checkpoint.data_state)
    assert weights.model.keys() == checkpoint.model.keys()
    for key, tensor in checkpoint.model.items():
        assert torch.equal(weights.model[key], tensor), key
        assert weights.model[key].dtype == tensor.dtype
    assert weights.has_ema is ema
    if checkpoint.ema is not None:
        assert weights.ema is not None
        for key, tensor in checkpoint.ema.items():
            assert torch.equal(weights.ema[key], tensor), key
    # a tied weight stays tied, as in a full load; and no tensor points into a (deleted) file any more
    assert weights.model["tied.weight"].untyped_storage().data_ptr() == weights.model["0.weight"].data_ptr()
    assert not hasattr(weights, "optimizer")


def test_the_weights_are_independent_of_the_local_file(tmp_path: Path) -> None:
    manager = _local(tmp_path)
    checkpoint = make_checkpoint(3, width=16)
    name = manager.save_last(checkpoint)
    assert name is not None
    weights = manager.load_weights(name.filename)
    path = tmp_path / "run" / name.filename
    path.write_bytes(b"\0" * path.stat().st_size)  # overwrite in place: a mapped tensor would change
    assert torch.equal(weights.model["0.weight"], checkpoint.model["0.weight"])


def test_map_location_and_verify_false(tmp_path: Path) -> None:
    manager = _memory(tmp_path)
    checkpoint = make_checkpoint(3, width=16)
    name = manager.save_last(checkpoint)
    assert name is not None
    weights = manager.load_weights(name.filename, map_location="meta", verify=False)
    assert {tensor.device.type for tensor in weights.model.values()} == {"meta"}
    assert weights.model["0.weight"].shape == checkpoint.model["0.weight"].shape


@pytest.mark.parametrize("make", [_local, _memory], ids=["local", "memory"])
def test_a_flipped_model_byte_is_detected_and_verify_false_skips_the_check(tmp_path: Path, make: object) -> None:
    manager = make(tmp_path)  # type: ignore[operator]
    checkpoint = make_checkpoint(3, width=64)
    name = manager.save_last(checkpoint).filename
    store = manager.store
    with store.open(name) as stream:
        blob = bytearray(stream.read())
    at = blob.find(checkpoint.model["0.weight"].numpy().tobytes())
    assert at > 0
    blob[at + 3] ^= 0x01
    store.delete(name)
    with store.write(name) as stream:
        stream.write(bytes(blob))
    with pytest.raises(CheckpointCorruptError, match=rf"{name} is damaged: .*model\.0\.weight"):
        manager.load_weights(name)
    assert not torch.equal(manager.load_weights(name, verify=False).model["0.weight"], checkpoint.model["0.weight"])


def test_content_must_match_the_name(tmp_path: Path) -> None:
    manager = _local(tmp_path)
    name = manager.save_last(make_checkpoint(3))
    assert name is not None
    (tmp_path / "run" / name.filename).rename(tmp_path / "run" / "ckpt_last_00000004.pt")
    with pytest.raises(CheckpointSchemaError, match="holds iteration 3, but its name says 4"):
        manager.load_weights("ckpt_last_00000004.pt")


def test_a_rotated_away_checkpoint_names_its_successor(tmp_path: Path) -> None:
    manager = CheckpointManager(LocalStore(tmp_path / "run", create=True), KeepPolicy(last=1, best=0))
    manager.save_last(make_checkpoint(1))
    manager.save_last(make_checkpoint(2))
    with pytest.raises(CheckpointRotatedAwayError, match="ckpt_last_00000002.pt"):
        manager.load_weights("ckpt_last_00000001.pt")


@pytest.mark.parametrize("make", [_local, _memory], ids=["local", "memory"])
def test_a_truncated_file_is_corrupt(tmp_path: Path, make: object) -> None:
    manager = make(tmp_path)  # type: ignore[operator]
    name = manager.save_last(make_checkpoint(3, width=64)).filename
    with manager.store.open(name) as stream:
        blob = stream.read()
    manager.store.delete(name)
    with manager.store.write(name) as stream:
        stream.write(blob[: len(blob) // 2])
    with pytest.raises(CheckpointCorruptError, match=name):
        manager.load_weights(name)


@pytest.mark.parametrize("make", [_local, _memory], ids=["local", "memory"])
def test_a_format_version_1_file_loads_weights_only(tmp_path: Path, make: object) -> None:
    # version 1 orders the optimizer before the EMA and keeps its digests in data.pkl: the ranges differ,
    # the result must not
    manager = make(tmp_path)  # type: ignore[operator]
    v1 = Path(__file__).parent / "data" / "format_v1.pt"
    with manager.store.write("ckpt_best_00000007_0.500000.pt") as stream:
        stream.write(v1.read_bytes())
    raw = torch.load(v1, weights_only=True)
    weights = manager.load_weights("ckpt_best_00000007_0.500000.pt")
    assert (weights.iter_num, weights.best_val_loss) == (7, 0.5)
    assert weights.ema is not None
    for section, state in (("model", weights.model), ("ema", weights.ema)):
        assert state.keys() == raw[section].keys()
        assert all(torch.equal(state[key], raw[section][key]) for key in state)


@pytest.mark.parametrize("make", [_local, _memory], ids=["local", "memory"])
@pytest.mark.parametrize("where", [0x7FFFFFF0, 0xFFFFFFF0], ids=["past-the-end", "far-past-the-end"])
def test_a_zip_directory_said_to_start_past_the_end_is_corrupt(tmp_path: Path, make: object, where: int) -> None:
    manager = make(tmp_path)  # type: ignore[operator]
    name = manager.save_last(make_checkpoint(3, width=16)).filename
    with manager.store.open(name) as stream:
        blob = bytearray(stream.read())
    assert blob[-22:-18] == b"PK\x05\x06"  # torch writes no archive comment: the EOCD ends the file
    blob[-6:-2] = where.to_bytes(4, "little")  # the EOCD's "start of the central directory"
    manager.store.delete(name)
    with manager.store.write(name) as stream:
        stream.write(bytes(blob))
    with pytest.raises(CheckpointCorruptError, match=rf"{name}"):
        manager.load_weights(name)


def _rewritten(manager: CheckpointManager, name: str, damage: Callable[[bytearray], None]) -> None:
    with manager.store.open(name) as stream:
        blob = bytearray(stream.read())
    damage(blob)
    manager.store.delete(name)
    with manager.store.write(name) as stream:
        stream.write(bytes(blob))


def _record_data(blob: bytearray, suffix: str) -> tuple[int, int]:
    """Where the data of the zip member whose name ends with ``suffix`` starts, and its size."""
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    name_length, extra_length = struct.unpack_from("<HH", blob, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length, info.file_size


ALIGNMENT_PROBE = """
import sys
from pathlib import Path
from ml_playground.checkpoint import CheckpointManager, LocalStore
from ml_playground.errors import CheckpointCorruptError
manager = CheckpointManager(LocalStore(Path(sys.argv[1])))
for call in (
    lambda: manager.load_weights(sys.argv[2]),
    lambda: manager.load(sys.argv[2], map_location="meta", verify=False),
    lambda: manager.load(sys.argv[2], mmap=True, verify=False),
):
    try:
        call()
    except CheckpointCorruptError as exc:
        print("corrupt:", exc)
"""


@pytest.mark.parametrize("value", [b"00", b"-0", b" 0"])
def test_a_zero_storage_alignment_is_corrupt_not_a_crash(tmp_path: Path, value: bytes) -> None:
    # torch divides by this record when it computes offsets (weights-only, mmap and meta loads): 0 killed
    # the process with SIGFPE. The digests do not cover it, so every such load checks it first.
    manager = _local(tmp_path)
    name = manager.save_last(make_checkpoint(3, width=16)).filename

    def zero_alignment(blob: bytearray) -> None:
        start, size = _record_data(blob, "/.storage_alignment")
        assert blob[start : start + size] == b"64"
        blob[start : start + size] = value

    _rewritten(manager, name, zero_alignment)
    done = subprocess.run(
        [sys.executable, "-c", ALIGNMENT_PROBE, str(tmp_path / "run"), name],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    expected = f"corrupt: {tmp_path / 'run' / name} is damaged: its .storage_alignment record"
    assert [line.startswith(expected) for line in done.stdout.splitlines()] == [True, True, True], done.stdout


@pytest.mark.parametrize("load", ["load", "load_weights"])
def test_a_file_of_the_other_byte_order_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    # torch would byte-swap it (and the digests then call it damaged); the weights-only load, which reads
    # the bytes itself, returned them unswapped
    other = "big" if sys.byteorder == "little" else "little"
    manager = _local(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(sys, "byteorder", other)  # what torch.save records as the file's byte order
        name = manager.save_last(make_checkpoint(3, width=16)).filename
    with pytest.raises(CheckpointError, match=rf"{name} was written on a {other}-endian machine"):
        getattr(manager, load)(name)


@pytest.mark.parametrize("make", [_local, _memory], ids=["local", "memory"])
def test_a_zip_directory_entry_of_an_unknown_version_is_corrupt(tmp_path: Path, make: object) -> None:
    manager = make(tmp_path)  # type: ignore[operator]
    name = manager.save_last(make_checkpoint(3, width=16)).filename

    def unknown_version(blob: bytearray) -> None:
        entry = blob.index(b"PK\x01\x02")  # the first central directory entry
        blob[entry + 6] = 0xFF  # "version needed to extract": zipfile raises NotImplementedError

    _rewritten(manager, name, unknown_version)
    with pytest.raises(CheckpointCorruptError, match=rf"{name} has an unreadable zip directory"):
        manager.load_weights(name)


def test_a_verified_weights_load_to_the_meta_device(tmp_path: Path) -> None:
    manager = _memory(tmp_path)
    name = manager.save_last(make_checkpoint(3, width=16, ema=True))
    assert name is not None
    weights = manager.load_weights(name.filename, map_location="meta")  # verified on the CPU, then moved
    assert {tensor.device.type for tensor in weights.model.values()} == {"meta"}
    assert weights.ema is not None
    assert {tensor.device.type for tensor in weights.ema.values()} == {"meta"}


class RotatedWhileOpening(LocalStore):
    """A local store whose file disappears right after the load found it (rotation in another process)."""

    def local_path(self, name: str) -> Path:
        path = super().local_path(name)
        path.unlink()
        return path


def test_a_local_file_rotated_away_during_a_weights_load_is_not_found(tmp_path: Path) -> None:
    writer = _local(tmp_path)
    first = writer.save_last(make_checkpoint(3, width=16))
    writer.save_last(make_checkpoint(4, width=16))
    assert first is not None
    reader = CheckpointManager(RotatedWhileOpening(tmp_path / "run"))
    with pytest.raises(CheckpointRotatedAwayError, match=r"ckpt_last_00000003\.pt was rotated away"):
        reader.load_weights(first.filename)
