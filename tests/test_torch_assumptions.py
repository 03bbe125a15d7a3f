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

from ml_playground.checkpoint.format._torch import crc32_off, load_mapped
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
