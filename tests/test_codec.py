"""The codec: round trips, plain torch.load compatibility, and every failure a distinct error."""

from __future__ import annotations

import io
import pickle
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import xxhash

from ml_playground.checkpoint import FORMAT_VERSION, Checkpoint, decode, encode
from ml_playground.checkpoint.format import FORMAT_MAGIC, MIGRATIONS, _digests, verify_sections
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointSchemaError,
    CheckpointVersionError,
    UnsafeCheckpointError,
)
from tests.conftest import assert_same_checkpoint, make_checkpoint


def _encoded(checkpoint: Checkpoint) -> bytes:
    buffer = io.BytesIO()
    encode(checkpoint, buffer)
    return buffer.getvalue()


def _decode(data: bytes, **kwargs: object) -> Checkpoint:
    return decode(io.BytesIO(data), source="mem/ckpt.pt", **kwargs)  # type: ignore[arg-type]


def _payload(data: bytes) -> dict[str, object]:
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert isinstance(loaded, dict)
    return loaded


def _reencode(payload: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("ema", [False, True])
def test_round_trip_is_exact(ema: bool) -> None:
    original = make_checkpoint(iter_num=42, best_val_loss=0.125, ema=ema)
    assert_same_checkpoint(original, _decode(_encoded(original)))


def test_file_loads_with_plain_torch_load_weights_only() -> None:
    payload = _payload(_encoded(make_checkpoint(iter_num=3)))
    assert payload["format"] == FORMAT_MAGIC
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["meta"]["iter_num"] == 3  # type: ignore[index]


def test_map_location_is_applied() -> None:
    loaded = _decode(_encoded(make_checkpoint()), map_location="cpu")
    assert all(t.device.type == "cpu" for t in loaded.model.values())


def test_non_contiguous_and_empty_tensors_round_trip() -> None:
    base = make_checkpoint()
    model = dict(base.model)
    model["transposed"] = torch.arange(12.0).reshape(3, 4).t()
    model["empty"] = torch.empty(0, 5)
    model["half"] = torch.randn(7).to(torch.bfloat16)
    checkpoint = Checkpoint(model=model, optimizer=base.optimizer, model_args={}, iter_num=1, best_val_loss=1.0)
    loaded = _decode(_encoded(checkpoint))
    for key, tensor in model.items():
        assert torch.equal(loaded.model[key], tensor)


def test_flipped_byte_in_tensor_data_is_detected_and_named() -> None:
    checkpoint = make_checkpoint()
    data = bytearray(_encoded(checkpoint))
    needle = checkpoint.model["0.weight"].numpy().tobytes()[:16]
    offset = bytes(data).index(needle)
    data[offset + 3] ^= 0x01
    with pytest.raises(CheckpointCorruptError, match=r"mem/ckpt.pt.*0\.weight"):
        _decode(bytes(data))


def test_changed_metadata_is_detected() -> None:
    payload = _payload(_encoded(make_checkpoint(iter_num=5)))
    payload["meta"]["iter_num"] = 6  # type: ignore[index]
    with pytest.raises(CheckpointCorruptError, match="metadata"):
        _decode(_reencode(payload))


def test_verify_false_skips_checksums_but_not_schema() -> None:
    payload = _payload(_encoded(make_checkpoint(iter_num=5)))
    payload["model"]["0.weight"] += 1  # type: ignore[index,operator]
    data = _reencode(payload)
    with pytest.raises(CheckpointCorruptError):
        _decode(data)
    assert _decode(data, verify=False).iter_num == 5


@pytest.mark.parametrize("length", [0, 1, 100, 1000, -1000, -100, -1])
def test_truncated_file_is_corrupt(length: int) -> None:
    data = _encoded(make_checkpoint())
    with pytest.raises(CheckpointCorruptError, match="mem/ckpt.pt"):
        _decode(data[:length])


def test_newer_format_version_is_refused_clearly() -> None:
    payload = _payload(_encoded(make_checkpoint()))
    payload["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointVersionError, match="Upgrade ml_playground"):
        _decode(_reencode(payload))


def test_foreign_torch_file_is_a_schema_error() -> None:
    with pytest.raises(CheckpointSchemaError, match="not an ml_playground checkpoint"):
        _decode(_reencode({"model": {"w": torch.zeros(2)}}))


def test_missing_field_is_a_schema_error() -> None:
    payload = _payload(_encoded(make_checkpoint()))
    del payload["optimizer"]
    with pytest.raises(CheckpointSchemaError, match="optimizer"):
        _decode(_reencode(payload))


class _Sentinel:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickled_code_is_refused_without_running(capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_MAGIC, "payload": _Sentinel()}, buffer)
    with pytest.raises(UnsafeCheckpointError, match="mem/ckpt.pt"):
        _decode(buffer.getvalue())
    assert "pwned" not in capsys.readouterr().out


def test_plain_pickle_is_not_a_checkpoint() -> None:
    with pytest.raises(CheckpointError):
        _decode(pickle.dumps({"a": 1}))


def test_non_plain_config_cannot_be_saved() -> None:
    base = make_checkpoint()
    with pytest.raises(CheckpointSchemaError, match="config"):
        Checkpoint(
            model=base.model,
            optimizer=base.optimizer,
            model_args={},
            iter_num=0,
            best_val_loss=1.0,
            config={"path": object()},  # type: ignore[dict-item]
        )


@pytest.mark.parametrize(
    ("field", "value"), [("iter_num", -1), ("iter_num", True), ("iter_num", 1.0), ("best_val_loss", "1")]
)
def test_checkpoint_fields_are_typed(field: str, value: object) -> None:
    base = make_checkpoint()
    kwargs: dict[str, object] = {
        "model": base.model,
        "optimizer": base.optimizer,
        "model_args": {},
        "iter_num": 0,
        "best_val_loss": 1.0,
    }
    kwargs[field] = value
    with pytest.raises(CheckpointSchemaError, match=field):
        Checkpoint(**kwargs)  # type: ignore[arg-type]


def test_the_digest_record_holds_every_tensors_digest_and_is_the_last_tensor_record() -> None:
    checkpoint = make_checkpoint(ema=True)
    data = _encoded(checkpoint)
    payload = _payload(data)
    digests = payload["integrity"]["tensors"]  # type: ignore[index]
    tensors = [
        *checkpoint.model.values(),
        *(checkpoint.ema or {}).values(),
        *checkpoint.rng_state.values(),
        *(t for state in checkpoint.optimizer["state"].values() for t in state.values()),
    ]
    assert isinstance(digests, torch.Tensor)
    assert digests.dtype == torch.uint8
    assert [bytes(row) for row in digests.tolist()] == [
        bytes.fromhex(xxhash.xxh3_64_hexdigest(t.contiguous().numpy().tobytes())) for t in tensors
    ]
    # the digests are written (by a second thread) after every other tensor; the weights come first
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        records = sorted(
            (info for info in archive.infolist() if "/data/" in info.filename and info.file_size),
            key=lambda info: info.header_offset,
        )
    assert _record(data, records[-1]) == bytes(b for row in digests.tolist() for b in row)
    assert _record(data, records[0]) == checkpoint.model["0.weight"].numpy().tobytes()


def _record(archive: bytes, info: zipfile.ZipInfo) -> bytes:
    # zipfile.read() would check the CRC fields, which our files leave at 0 (docs/file-format.md)
    name_length, extra_length = struct.unpack_from("<HH", archive, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    return archive[start : start + info.file_size]


class _FailingAfter(io.RawIOBase):
    """A stream whose write number ``fail_at`` (counting from 0) fails with ENOSPC."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.writes = fail_at, 0

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device")
        self.writes += 1
        return len(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("fail_at", [0, 3, 30])
def test_a_failed_write_stops_the_digest_thread(fail_at: int) -> None:
    before = set(threading.enumerate())
    with pytest.raises(OSError, match="No space left"):
        encode(make_checkpoint(width=64), _FailingAfter(fail_at))  # type: ignore[arg-type]
    assert set(threading.enumerate()) == before


def test_a_failure_in_the_digest_thread_fails_the_save(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(tensor: torch.Tensor) -> bytes:
        raise MemoryError("no memory for a contiguous copy")

    monkeypatch.setattr(_digests, "tensor_digest", broken)
    with pytest.raises(MemoryError, match="contiguous copy"):
        _encoded(make_checkpoint())


def test_a_digest_record_written_in_pieces_abandons_the_save(monkeypatch: pytest.MonkeyPatch) -> None:
    # a torch whose writer split records into several writes would leave the placeholder in the file:
    # the save must fail rather than write a checkpoint without its digests
    real_save = torch.save

    def save_in_pieces(obj: object, stream: io.RawIOBase) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        for start in range(0, len(data), 5):
            stream.write(data[start : start + 5])

    monkeypatch.setattr(torch, "save", save_in_pieces)
    with pytest.raises(CheckpointError, match=r"saving mem/ckpt\.pt was abandoned.*integrity record"):
        encode(make_checkpoint(), io.BytesIO(), destination="mem/ckpt.pt")


def test_crc32_is_off_only_until_torch_opens_its_writer() -> None:
    # torch.set_crc32_options is process-global: a slow save (a long upload) must not keep it off for others
    reached, release = threading.Event(), threading.Event()

    class SlowUpload(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            reached.set()
            release.wait(timeout=30)
            return len(data)  # type: ignore[arg-type]

    saver = threading.Thread(target=encode, args=(make_checkpoint(), SlowUpload()))
    saver.start()
    try:
        assert reached.wait(timeout=30)
        assert torch.serialization.get_crc32_options() is True
    finally:
        release.set()
        saver.join(timeout=30)
    assert not saver.is_alive()


_V1_FILE = Path(__file__).parent / "data" / "format_v1.pt"
"""Written by ml_playground 0.1.0's encoder (format version 1): make_checkpoint(iter_num=7,
best_val_loss=0.5, ema=True, seed=3), rng_state from a generator seeded with 0."""


def test_a_format_version_1_file_loads_through_its_migration() -> None:
    raw = torch.load(_V1_FILE, weights_only=True)
    assert raw["format_version"] == 1
    assert isinstance(raw["integrity"]["tensors"][0], str)
    loaded = decode(_V1_FILE, source="format_v1.pt")
    assert (loaded.iter_num, loaded.best_val_loss, dict(loaded.data_state)) == (7, 0.5, {"position": 7})
    assert loaded.ema is not None
    for section, state in (("model", loaded.model), ("ema", loaded.ema), ("rng_state", loaded.rng_state)):
        assert state.keys() == raw[section].keys()
        assert all(torch.equal(state[key], raw[section][key]) for key in state)
    assert loaded.optimizer["param_groups"] == raw["optimizer"]["param_groups"]
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], raw["optimizer"]["state"][0]["exp_avg"])


def test_a_format_version_1_file_migrates_to_a_verifiable_version_2_payload() -> None:
    raw = torch.load(_V1_FILE, weights_only=True)
    migrated = MIGRATIONS[1](raw)
    assert migrated["format_version"] == 2
    assert list(migrated) == ["format", "format_version", "meta", "model", "ema", "rng_state", "optimizer", "integrity"]
    assert MIGRATIONS[2](migrated)["meta"]["world_size"] == 1
    verify_sections(migrated, "migrated")  # the converted digest record checks the same bytes
    assert decode(io.BytesIO(_reencode(migrated)), source="re-saved").iter_num == 7


_V2_FILE = Path(__file__).parent / "data" / "format_v2.pt"
"""Written by the format version 2 encoder: make_checkpoint(iter_num=7, best_val_loss=0.5, ema=True, seed=3),
rng_state from a generator seeded with 0."""


def test_a_format_version_2_file_loads_as_world_size_1() -> None:
    raw = torch.load(_V2_FILE, weights_only=True)
    assert raw["format_version"] == 2
    assert "world_size" not in raw["meta"]
    loaded = decode(_V2_FILE, source="format_v2.pt")
    assert (loaded.iter_num, loaded.best_val_loss, loaded.world_size) == (7, 0.5, 1)
    assert all(torch.equal(loaded.model[key], raw["model"][key]) for key in raw["model"])
    migrated = MIGRATIONS[2](raw)
    assert migrated["format_version"] == 3
    assert migrated["meta"]["world_size"] == 1
    verify_sections(migrated, "migrated")  # the structure digest follows the added field


def test_damage_in_a_format_version_2_file_is_detected_before_migrating() -> None:
    raw = torch.load(_V2_FILE, weights_only=True)
    damaged = {**raw, "meta": {**raw["meta"], "iter_num": 8}}
    with pytest.raises(CheckpointCorruptError, match="metadata does not match"):
        verify_sections(MIGRATIONS[2](damaged), "damaged")


def test_damage_in_a_format_version_1_file_is_detected() -> None:
    data = bytearray(_V1_FILE.read_bytes())
    raw = torch.load(_V1_FILE, weights_only=True)
    offset = bytes(data).index(raw["ema"]["1.bias"].numpy().tobytes())
    data[offset] ^= 0x10
    with pytest.raises(CheckpointCorruptError, match=r"format_v1\.pt.*ema\.1\.bias"):
        decode(io.BytesIO(bytes(data)), source="format_v1.pt")


def test_a_save_leaves_the_global_rng_untouched() -> None:
    # a bitwise resume depends on it: saving between two steps must not move torch's generator
    checkpoint = make_checkpoint()
    before = torch.get_rng_state()
    _encoded(checkpoint)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_checkpoint_without_tensors_round_trips() -> None:
    checkpoint = Checkpoint(model={}, optimizer={}, model_args={}, iter_num=2, best_val_loss=1.0)
    assert _decode(_encoded(checkpoint)).iter_num == 2


def test_a_checksum_thread_that_cannot_start_fails_the_save_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def at_thread_limit(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", at_thread_limit)
    stream = io.BytesIO()
    with pytest.raises(CheckpointError, match=r"saving mem/ckpt\.pt failed before writing: .*thread limit"):
        encode(make_checkpoint(), stream, destination="mem/ckpt.pt")
    assert stream.getvalue() == b""
