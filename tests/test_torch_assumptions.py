"""What the checkpoint format borrows from torch's archive writer and reader, one test per assumption.

When a torch release changes one of these behaviours, the test that fails names the assumption and the
code that relies on it (``ml_playground/checkpoint/format``), before any save is corrupted.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import torch

from ml_playground.checkpoint._tree import tensors_in
from ml_playground.checkpoint.format._torch import crc32_off, load_mapped, load_unread
from ml_playground.checkpoint.format._zip_layout import Archive, data_offset, directory_start, match_storages

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


def test_the_offset_switch_makes_a_mapped_load_compute_offsets_without_local_headers(tmp_path: Path) -> None:
    # weights-only loads from a sparse copy rely on it: other records' local headers are holes (_torch.load_mapped)
    path = tmp_path / "full.pt"
    torch.save(_payload(), path)
    raw = bytearray(path.read_bytes())
    for info in zipfile.ZipFile(path).infolist():
        if "/data/" in info.filename and not info.filename.endswith("/data/0"):
            raw[info.header_offset : info.header_offset + 30] = bytes(30)  # what a hole reads as
    holes = tmp_path / "holes.pt"
    holes.write_bytes(raw)
    loaded = load_mapped(Archive(holes, str(holes)))
    assert all(torch.equal(loaded[key], value) for key, value in _payload().items()), (
        BROKEN + "with torch.utils.serialization.config.load.calculate_storage_offsets, torch.load(mmap=True) "
        "computes every storage's offset and reads no local header but data/0's"
    )


def test_a_mapped_loads_storages_lie_in_record_order_at_their_data_offsets(tmp_path: Path) -> None:
    # weights-only loads tie each mapped storage to its zip record by address (_zip_layout.match_storages)
    path = tmp_path / "full.pt"
    torch.save(_payload(), path)
    archive = Archive(path, str(path))
    records = archive.records(directory_start(path, path.stat().st_size, str(path)))
    loaded = load_mapped(archive)
    by_pointer = match_storages((t.untyped_storage() for t in loaded.values()), records, str(path))
    base = min(by_pointer) - data_offset(path, by_pointer[min(by_pointer)], str(path))
    assert all(pointer - base == data_offset(path, record, str(path)) for pointer, record in by_pointer.items()), (
        BROKEN + "a memory-mapped load maps the file once, so each storage lies at its record's data offset, "
        "in the order of the records"
    )


def test_skip_data_loads_allocate_every_storage_and_read_no_storage_record(tmp_path: Path) -> None:
    # our reader fills the storages of a skip_data load itself (_torch.load_unread, _reader)
    payload = {**_payload(), "tied": None, "view": None}
    payload["tied"], payload["view"] = payload["b"], payload["c"][1:]
    path = tmp_path / "full.pt"
    torch.save(payload, path)
    raw = bytearray(path.read_bytes())
    for info in zipfile.ZipFile(path).infolist():  # every storage record, header and data, becomes a hole
        if "/data/" in info.filename:
            raw[info.header_offset : info.header_offset + 30 + len(info.filename) + info.file_size] = bytes(
                30 + len(info.filename) + info.file_size
            )
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
            name_length, extra_length = (
                int.from_bytes(blob[info.header_offset + 26 : info.header_offset + 28], "little"),
                int.from_bytes(blob[info.header_offset + 28 : info.header_offset + 30], "little"),
            )
            start = info.header_offset + 30 + name_length + extra_length
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
