"""What the checkpoint format borrows from torch's archive writer and reader, one test per assumption.

When a torch release changes one of these behaviours, the test that fails names the assumption and the
code that relies on it (``ml_playground/checkpoint/format``), before any save is corrupted.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import torch

from ml_playground.checkpoint._tree import tensors_in
from ml_playground.checkpoint.format._torch import crc32_off, load_unread
from ml_playground.checkpoint.format._zip_layout import Archive

BROKEN = f"torch {torch.__version__} broke an assumption of ml_playground.checkpoint.format: "


class _Recorder:
    """A write-only stream keeping every write torch makes, as torch made it."""

    def __init__(self, on_first_write: object = None) -> None:
        self.buffer = io.BytesIO()
        self.writes: list[bytes] = []
        self._on_first_write = on_first_write

    def write(self, data: bytes) -> int:
        if self._on_first_write is not None:
            callback, self._on_first_write = self._on_first_write, None
            callback()  # type: ignore[operator]
        self.writes.append(bytes(data))
        return self.buffer.write(data)

    def flush(self) -> None:
        pass


def _payload() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.arange(1000),
        "b": torch.randn(64, generator=generator),
        "c": torch.randn(3, 5, generator=generator),
    }


def test_torch_reads_the_crc_switch_once_when_it_opens_its_writer() -> None:
    # encode turns CRC32 off only until torch's first write (_encode.encode, _torch.crc32_off)
    switch = crc32_off()
    switch.__enter__()
    assert not torch.serialization.get_crc32_options()
    recorder = _Recorder(on_first_write=lambda: switch.__exit__(None, None, None))
    torch.save(_payload(), recorder)
    assert torch.serialization.get_crc32_options(), "the CRC switch is back on after the first write"
    crcs = {info.filename: info.CRC for info in zipfile.ZipFile(io.BytesIO(recorder.buffer.getvalue())).infolist()}
    assert all(crc == 0 for crc in crcs.values()), (
        BROKEN + "torch reads set_crc32_options once, when it opens its zip writer, before its first write "
        f"(records written after the switch went back on carry CRCs: {crcs})"
    )
    control = _Recorder()
    torch.save(_payload(), control)
    assert any(info.CRC for info in zipfile.ZipFile(io.BytesIO(control.buffer.getvalue())).infolist())


def test_torch_writes_an_uncompressed_record_in_one_write_of_the_tensors_bytes() -> None:
    # encode writes the digests in place of a placeholder record it recognises by its bytes (_encode._DigestSink)
    placeholder = os.urandom(16 * 8)
    recorder = _Recorder()
    digests = torch.tensor(list(placeholder), dtype=torch.uint8).reshape(16, 8)
    torch.save({**_payload(), "integrity": {"tensors": digests}}, recorder)
    assert placeholder in recorder.writes, (
        BROKEN + "torch.save hands over an uncompressed tensor record in one write call, straight from the "
        "tensor's bytes (the integrity record's placeholder is replaced in that write)"
    )


def _data_start(blob: bytes | bytearray, info: zipfile.ZipInfo) -> int:
    name_length, extra_length = struct.unpack_from("<HH", blob, info.header_offset + 26)
    return int(info.header_offset + 30 + name_length + extra_length)


def test_skip_data_loads_allocate_every_storage_and_read_no_storage_record(tmp_path: Path) -> None:
    # our reader fills the storages of a skip_data load itself (_torch.load_unread, _reader)
    payload = {**_payload(), "tied": None, "view": None}
    payload["tied"], payload["view"] = payload["b"], payload["c"][1:]
    path = tmp_path / "full.pt"
    torch.save(payload, path)
    raw = bytearray(path.read_bytes())
    for info in zipfile.ZipFile(path).infolist():  # every storage record, header and data, becomes a hole
        if "/data/" in info.filename:
            end = _data_start(raw, info) + info.file_size
            raw[info.header_offset : end] = bytes(end - info.header_offset)
    holes = tmp_path / "holes.pt"
    holes.write_bytes(raw)
    loaded = load_unread(Archive(holes, str(holes)), None)
    plain = torch.load(path, weights_only=True)
    for key, tensor in plain.items():
        got = loaded[key]
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == (
            tensor.dtype,
            tensor.shape,
            tensor.stride(),
            tensor.storage_offset(),
        ), BROKEN + f"a load under torch.serialization.skip_data rebuilds {key} as torch.load does"
        assert got.untyped_storage().nbytes() == tensor.untyped_storage().nbytes()
        assert got.device.type == "cpu"
    assert loaded["tied"].data_ptr() == loaded["b"].data_ptr(), BROKEN + "skip_data loads keep shared storages shared"
    assert loaded["view"].untyped_storage().data_ptr() == loaded["c"].untyped_storage().data_ptr()
    assert len({loaded[key].untyped_storage().data_ptr() for key in "abc"}) == 3


def test_torch_save_numbers_storages_in_the_order_the_tree_walk_meets_them(tmp_path: Path) -> None:
    # our reader pairs the i-th distinct storage of the walk with record data/i (_reader.plan)
    grid = torch.arange(24.0).reshape(4, 6)
    payload = {
        "z": {"late": grid[1:], "scalar": torch.tensor(2.0)},
        "a": [torch.empty(0), grid.t(), (torch.ones(3, dtype=torch.int16), grid)],
        "m": {"tied": grid, 5: torch.arange(7)},
    }
    path = tmp_path / "order.pt"
    torch.save(payload, path)
    blob = path.read_bytes()
    records = {}
    for info in zipfile.ZipFile(path).infolist():
        if "/data/" in info.filename:
            start = _data_start(blob, info)
            records[int(info.filename.rsplit("/", 1)[1])] = blob[start : start + info.file_size]
    walked: list[bytes] = []
    seen: set[int] = set()
    for _, tensor in tensors_in(torch.load(path, weights_only=True)):
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            walked.append(bytes(storage))
    stored = [records[key] for key in sorted(records) if records[key]]
    assert walked == stored, (
        BROKEN + "torch.save numbers storages in the order its pickler first meets them, which is the order of "
        "ml_playground's tree walk (dict items in order, depth first)"
    )
