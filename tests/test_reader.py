"""Our reader of tensor bytes (``format/_reader.py``): what verified full and weights-only loads read through.

It must fill every storage with exactly the bytes ``torch.load`` puts there, keep torch's sharing, views
and offsets, compute the digest ``tensor_digest`` computes for every tensor (however the pieces it reads
cut across tensors), and turn a short file or a failing thread into an error naming the file.
"""

from __future__ import annotations

import io
import re
import resource
import struct
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground.checkpoint import Checkpoint, CheckpointManager, LocalStore, decode, encode
from ml_playground.checkpoint.format import TENSOR_SECTIONS, _decode, _digests, _reader, _weights
from ml_playground.checkpoint.format._decode import checked_structure
from ml_playground.checkpoint.format._torch import load_unread
from ml_playground.checkpoint.format._zip_layout import Archive
from ml_playground.errors import CheckpointCorruptError, CheckpointNotFoundError
from tests.conftest import assert_same_checkpoint, awkward_checkpoint, make_checkpoint

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Checkpoint, Path]:
    checkpoint = awkward_checkpoint(make_checkpoint(width=16))
    path = tmp_path / "ckpt.pt"
    with path.open("wb") as handle:
        encode(checkpoint, handle)
    return checkpoint, path


def _planned(archive: Archive) -> tuple[Any, list[tuple[str, str, torch.Tensor]], _reader.Plan]:
    payload = load_unread(archive, None)
    tensors = checked_structure(payload, archive.source)
    plan = _reader.plan(archive, payload, tensors, read=None, hashed=TENSOR_SECTIONS)
    assert plan is not None
    return payload, tensors, plan


def _data_start(blob: bytes, info: zipfile.ZipInfo) -> int:
    name_length, extra_length = struct.unpack_from("<HH", blob, info.header_offset + 26)
    return int(info.header_offset + 30 + name_length + extra_length)


def _storage_groups(tensors: list[tuple[str, str, torch.Tensor]]) -> list[list[int]]:
    """Which tensors (by index) share a non-empty storage."""
    groups: dict[int, list[int]] = {}
    for index, (_, _, tensor) in enumerate(tensors):
        if tensor.untyped_storage().nbytes():
            groups.setdefault(tensor.untyped_storage().data_ptr(), []).append(index)
    return sorted(groups.values())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("piece", [40, 1 << 20], ids=["40-byte-pieces", "1MiB-pieces"])
@pytest.mark.parametrize("kind", ["path", "stream"])
def test_the_reader_fills_every_storage_as_torch_load_does_and_hashes_every_tensor(
    saved: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch, threads: int, piece: int, kind: str
) -> None:
    # 40-byte pieces cut through tensors, views and runs; PARALLEL_BYTES 0 lets a second thread read
    monkeypatch.setattr(_reader, "PIECE", piece)
    monkeypatch.setattr(_reader, "PARALLEL_BYTES", 0)
    _, path = saved
    data: Path | io.BytesIO = path if kind == "path" else io.BytesIO(path.read_bytes())
    archive = Archive(data, "ckpt")
    with _reader.opened(archive) as source:
        assert source is not None
        payload, tensors, plan = _planned(archive)
        digests = plan.read(source, threads=threads)
    plain = torch.load(path, weights_only=True)
    expected = list(_digests.tensors({key: value for key, value in plain.items() if key != "integrity"}))
    assert [(s, p) for s, p, _ in tensors] == [(s, p) for s, p, _ in expected]
    for (_, where, ours), (_, _, theirs), digest in zip(tensors, expected, digests, strict=True):
        assert torch.equal(ours, theirs), where
        assert (ours.dtype, ours.stride(), ours.storage_offset()) == (
            theirs.dtype,
            theirs.stride(),
            theirs.storage_offset(),
        )
        assert digest == _digests.tensor_digest(theirs), where
    assert _storage_groups(tensors) == _storage_groups(expected)
    assert torch.equal(payload["integrity"]["tensors"], plain["integrity"]["tensors"])


def test_verified_loads_of_a_path_and_of_a_stream_go_through_the_reader(
    saved: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, path = saved
    reads: list[int] = []
    read = _reader.Plan.read

    def counted(self: _reader.Plan, data: _reader.Bytes, *, threads: int = 2) -> list[bytes | None]:
        reads.append(1)
        return read(self, data, threads=threads)

    monkeypatch.setattr(_reader.Plan, "read", counted)
    assert_same_checkpoint(decode(path, source="ckpt"), checkpoint)
    assert_same_checkpoint(decode(io.BytesIO(path.read_bytes()), source="ckpt"), checkpoint)
    assert len(reads) == 2
    decode(path, source="ckpt", verify=False)  # torch.load reads unverified loads, as before
    decode(path, source="ckpt", mmap=True, verify=False)
    assert len(reads) == 2


def test_a_flipped_byte_is_found_in_whichever_piece_it_lies(saved: tuple[Checkpoint, Path]) -> None:
    checkpoint, path = saved
    data = bytearray(path.read_bytes())
    at = bytes(data).index(checkpoint.model["grid"].numpy().tobytes()) + 4 * 23  # grid's last float: the tail
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"ckpt is damaged: the bytes of tensor model\.grid do not"):
        decode(path, source="ckpt")


def test_a_compressed_storage_record_is_refused_before_anything_reads_it(
    saved: tuple[Checkpoint, Path], tmp_path: Path
) -> None:
    # this reader reads bytes as they lie; a deflated record (which our writer never makes) is refused from the
    # zip directory before torch or the reader reads any record (format/_zip_layout.py, Archive.check_stored)
    _, path = saved
    deflated = tmp_path / "deflated.pt"
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(deflated, "w") as out:
        for info in source.infolist():  # read past zipfile: our records' CRC fields are 0
            start = _data_start(blob, info)
            packing = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            out.writestr(info.filename, blob[start : start + info.file_size], compress_type=packing)
    with pytest.raises(CheckpointCorruptError, match=r"deflated is damaged or hostile: its zip member .*/data/0 is"):
        decode(deflated, source="deflated")
    with deflated.open("rb") as stream, pytest.raises(CheckpointCorruptError, match=r"/data/0 is compressed"):
        decode(stream, source="deflated")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("cut", "error"),
    [
        (
            "inside the last record's data",
            r"ckpt is truncated: the data of its zip record .*/data/\d+ ends 4 bytes early",
        ),
        ("before a record's header", r"ckpt is truncated: it ends before its zip record .*/data/\d+$"),
    ],
)
def test_a_file_cut_while_it_is_read_is_corrupt(
    saved: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch, threads: int, cut: str, error: str
) -> None:
    monkeypatch.setattr(_reader, "PIECE", 40)
    monkeypatch.setattr(_reader, "PARALLEL_BYTES", 0)
    _, path = saved
    with zipfile.ZipFile(path) as archive:
        storages = [info for info in archive.infolist() if "/data/" in info.filename]
    blob = path.read_bytes()
    last = storages[-1]  # the integrity record's digests: the last bytes any storage needs
    length = _data_start(blob, last) + last.file_size - 4 if cut.startswith("inside") else last.header_offset + 10
    archive = Archive(path, "ckpt")
    with _reader.opened(archive) as source:
        assert source is not None
        _, _, plan = _planned(archive)
        with path.open("r+b") as handle:
            handle.truncate(length)  # the open file shrinks under the reader
        with pytest.raises(CheckpointCorruptError, match=error):
            plan.read(source, threads=threads)


def test_a_failure_in_the_helper_thread_stops_the_reading_and_is_raised() -> None:
    done: list[int] = []

    def work(item: int, stop: threading.Event) -> None:
        if item == 0:  # whichever thread took it waits until the other one has failed
            assert stop.wait(10)
            return
        if item == 1:
            raise OSError(5, "Input/output error")
        done.append(item)

    with pytest.raises(OSError, match="Input/output error"):
        _reader._share(list(range(6)), work, 2)  # type: ignore[arg-type]
    assert done == []  # nothing was taken after the failure


LARGER_THAN_THE_FILE = r"is damaged or hostile: its tensor model\.blob is backed by a storage of \d+ bytes, more than"


@pytest.mark.parametrize(
    ("claimed", "refusal"),
    [
        (2**33, LARGER_THAN_THE_FILE),  # allocated (untouched), then refused by check_loaded
        (2**40, rf"(is not a readable checkpoint \(truncated or damaged: .*allocate|{LARGER_THAN_THE_FILE})"),
    ],
    ids=["8GiB", "1TiB"],
)
def test_a_pickle_that_claims_a_huge_storage_is_refused_without_touching_its_memory(
    tmp_path: Path, claimed: int, refusal: str
) -> None:
    # Under skip_data torch allocates each storage at the size the pickle claims, before any check: the
    # memory must stay untouched, and the storage be refused before the reader plans a read (1 TiB is more than
    # this machine can allocate at all: that failure is a refusal too)
    base = make_checkpoint(width=16)
    checkpoint = Checkpoint(**{**vars(base), "model": {**base.model, "blob": torch.zeros(4660, dtype=torch.uint8)}})
    buffer = io.BytesIO()
    encode(checkpoint, buffer)
    blob = buffer.getvalue()
    rebuilt = tmp_path / "ckpt_last_00000000.pt"
    with zipfile.ZipFile(io.BytesIO(blob)) as source, zipfile.ZipFile(rebuilt, "w") as out:
        for info in source.infolist():
            start = _data_start(blob, info)
            record = blob[start : start + info.file_size]
            if info.filename.endswith("/data.pkl"):  # blob's storage size, 4660 bytes, as BININT2 in its id tuple
                (found,) = re.finditer(rb"M\x34\x12tq.Q", record, flags=re.S)  # then TUPLE, BINPUT, BINPERSID
                long1 = b"\x8a\x06" + claimed.to_bytes(6, "little")  # the size as LONG1
                record = record[: found.start()] + long1 + record[found.start() + 3 :]
            out.writestr(info.filename, record)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = rf"ckpt_last_00000000\.pt {refusal}"
    with pytest.raises(CheckpointCorruptError, match=refused):
        decode(rebuilt, source=rebuilt.name)
    with pytest.raises(CheckpointCorruptError, match=refused):
        CheckpointManager(LocalStore(tmp_path)).load_weights(rebuilt.name)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB: nothing was touched


@pytest.mark.parametrize("load", ["decode", "load_weights"])
def test_a_file_rotated_away_after_torch_read_its_pickle_is_not_found(
    saved: tuple[Checkpoint, Path], monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    # found by tests/test_reader_stress.py: the archive's later reads by name raised a bare FileNotFoundError,
    # which a reader of a chosen checkpoint does not take for "rotated away, choose again"
    _, path = saved
    name = path.rename(path.with_name("ckpt_last_00000001.pt"))
    module = _decode if load == "decode" else _weights
    unread = module.load_unread

    def then_rotated(archive: Archive, map_location: Any) -> Any:
        payload = unread(archive, map_location)
        name.unlink()
        return payload

    monkeypatch.setattr(module, "load_unread", then_rotated)
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint .*ckpt_last_00000001\.pt$"):
        if load == "decode":
            decode(name, source=str(name))
        else:
            CheckpointManager(LocalStore(name.parent)).load_weights(name.name)
