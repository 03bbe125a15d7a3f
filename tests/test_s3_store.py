"""FsspecStore on S3 (a real moto server on loopback): multipart, conditional create, reads, options."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointStore, open_store
from ml_playground.checkpoint.stores import FsspecStore
from ml_playground.checkpoint.stores.s3 import S3Store
from ml_playground.checkpoint.stores.s3._upload import WRITE_ID_KEY
from ml_playground.errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError, StorageError
from ml_playground.locations import RemoteLocation
from tests.servers import S3LocationFactory
from tests.store_contract import read_bytes as _read
from tests.store_contract import write_bytes

pytestmark = pytest.mark.s3

MIB = 2**20
DATA = os.urandom(12 * MIB + 777)


def _write(store: CheckpointStore, name: str, data: bytes) -> None:
    write_bytes(store, name, data, chunk=999_983)  # an odd chunk size: writes straddle part boundaries


@pytest.fixture
def store(s3_location: S3LocationFactory) -> FsspecStore:
    made = open_store(s3_location(part_size_mib=5, max_concurrency=3), create=True)
    assert isinstance(made, FsspecStore)
    return made


def _requests(store: FsspecStore, operation: str) -> list[dict[str, Any]]:
    """Record the parameters of every ``operation`` call the store's client makes."""
    seen: list[dict[str, Any]] = []
    store.filesystem.connect().meta.events.register(
        f"before-call.s3.{operation}", lambda params, **_: seen.append(dict(params))
    )
    return seen


def test_large_object_goes_up_in_concurrent_parts_and_round_trips(
    store: FsspecStore, s3_admin: Any, s3_bucket: str
) -> None:
    parts = _requests(store, "UploadPart")
    completes = _requests(store, "CompleteMultipartUpload")
    _write(store, "big.pt", DATA)
    assert _read(store, "big.pt") == DATA
    assert len(parts) == 3  # 5 + 5 + 2 MiB
    assert completes[0]["headers"].get("If-None-Match") == "*"
    head = s3_admin.head_object(Bucket=s3_bucket, Key="run/big.pt")
    assert head["ETag"].endswith('-3"')
    assert head["ContentLength"] == len(DATA)


def test_exact_multiple_of_the_part_size_sends_no_empty_part(store: FsspecStore) -> None:
    parts = _requests(store, "UploadPart")
    data = DATA[: 10 * MIB]
    _write(store, "even.pt", data)
    assert len(parts) == 2
    assert _read(store, "even.pt") == data


def test_small_object_is_one_conditional_put(store: FsspecStore, s3_admin: Any, s3_bucket: str) -> None:
    puts = _requests(store, "PutObject")
    _write(store, "small.pt", b"tiny")
    assert len(puts) == 1
    assert puts[0]["headers"].get("If-None-Match") == "*"
    head = s3_admin.head_object(Bucket=s3_bucket, Key="run/small.pt")
    assert WRITE_ID_KEY in head["Metadata"]


@pytest.mark.parametrize("size", [100, 12 * MIB], ids=["single-put", "multipart"])
def test_concurrent_writer_of_the_same_name_gets_a_conflict_and_leaves_no_upload(
    store: FsspecStore, s3_admin: Any, s3_bucket: str, size: int
) -> None:
    ours = DATA[:size]
    theirs = bytes(reversed(ours))
    with (
        pytest.raises(CheckpointExistsError, match="ckpt_last_00000001.pt"),
        store.write("ckpt_last_00000001.pt") as stream,
    ):
        stream.write(ours)
        _write(store, "ckpt_last_00000001.pt", theirs)  # another writer commits first
    assert _read(store, "ckpt_last_00000001.pt") == theirs
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_reading_an_object_deleted_meanwhile_is_not_found(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    location = s3_location()
    store = S3Store.from_location(location, create=True)
    _write(store, "ckpt_last_00000001.pt", DATA)
    store_small_blocks = S3Store(location, filesystem=store.filesystem, read_block_size=MIB)
    with store_small_blocks.open("ckpt_last_00000001.pt") as stream:
        head = stream.read(1000)
        s3_admin.delete_object(Bucket=s3_bucket, Key="run/ckpt_last_00000001.pt")
        stream.seek(len(DATA) - 1000)  # beyond what the read-ahead cache holds
        with pytest.raises(CheckpointNotFoundError, match="ckpt_last_00000001.pt"):
            stream.read(1000)
    assert head == DATA[:1000]


def test_reads_have_bounded_block_size(store: FsspecStore) -> None:
    gets = _requests(store, "GetObject")
    _write(store, "big.pt", DATA)
    with store.open("big.pt") as stream:
        assert stream.read(10) == DATA[:10]
    assert gets, "a read fetched nothing"
    for params in gets:
        first, _, last = params["headers"]["Range"].removeprefix("bytes=").partition("-")
        assert int(last) - int(first) < 17 * MIB


def test_listing_ignores_sub_prefixes_and_other_runs(s3_location: S3LocationFactory) -> None:
    run = open_store(s3_location("run"), create=True)
    nested = open_store(s3_location("run/nested"), create=True)
    sibling = open_store(s3_location("run2"), create=True)
    _write(run, "a.pt", b"a")
    _write(nested, "b.pt", b"b")
    _write(sibling, "c.pt", b"c")
    assert [obj.name for obj in run.list()] == ["a.pt"]


def test_server_side_encryption_is_requested(s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str) -> None:
    store = open_store(s3_location(server_side_encryption="AES256", part_size_mib=5), create=True)
    _write(store, "small.pt", b"x")
    _write(store, "big.pt", DATA)
    for key in ("run/small.pt", "run/big.pt"):
        assert s3_admin.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"


def test_kms_key_is_used_and_never_logged(
    s3_location: S3LocationFactory, caplog: pytest.LogCaptureFixture, s3_admin: Any, s3_bucket: str
) -> None:
    secret = "arn:aws:kms:us-east-1:123456789012:key/secret-key-0123"
    location = s3_location(server_side_encryption="aws:kms", sse_kms_key_id=secret)
    with caplog.at_level(logging.DEBUG, logger="ml_playground"), caplog.at_level(logging.DEBUG, logger="s3fs"):
        store = open_store(location, create=True)
        _write(store, "k.pt", b"k")
    head = s3_admin.head_object(Bucket=s3_bucket, Key="run/k.pt")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == secret
    assert secret not in caplog.text
    assert secret not in repr(location)
    assert location.storage_options.redacted()["sse_kms_key_id"] == "***"


def test_requester_pays_is_sent_on_every_request(s3_location: S3LocationFactory) -> None:
    store = S3Store.from_location(s3_location(requester_pays=True), create=False)
    calls: list[dict[str, Any]] = []
    store.filesystem.connect().meta.events.register("before-call.s3", lambda params, **_: calls.append(params))
    _write(store, "a.pt", b"a")
    store.list()
    assert calls
    assert all(call["headers"].get("x-amz-request-payer") == "requester" for call in calls)


def test_options_that_do_not_apply_to_a_scheme_are_refused() -> None:
    from ml_playground.locations import StorageOptions

    location = RemoteLocation(scheme="memory", root="x", storage_options=StorageOptions(region="eu-west-1"))
    with pytest.raises(ConfigError, match="region"):
        open_store(location)


def test_many_threads_saving_different_names_all_commit(store: FsspecStore) -> None:
    errors: list[BaseException] = []

    def save(index: int) -> None:
        try:
            _write(store, f"t{index}.pt", DATA[: 6 * MIB + index])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(obj.size for obj in store.list()) == [6 * MIB, 6 * MIB + 1, 6 * MIB + 2]


def test_parts_in_flight_and_memory_stay_bounded(s3_location: S3LocationFactory) -> None:
    import tracemalloc

    store = open_store(s3_location(part_size_mib=5, max_concurrency=2), create=True)
    assert isinstance(store, FsspecStore)
    events = store.filesystem.connect().meta.events
    in_flight = [0, 0]  # now, most

    def started(**_: Any) -> None:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)

    def finished(**_: Any) -> None:
        in_flight[0] -= 1

    events.register("before-call.s3.UploadPart", started)
    events.register("after-call.s3.UploadPart", finished)
    data = DATA + DATA + DATA  # 36 MiB: eight parts
    tracemalloc.start()
    try:
        write_bytes(store, "big.pt", data, chunk=MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_flight[1] == 2  # parts overlap, and never more than max_concurrency
    # (max_concurrency + 1) parts of 5 MiB, plus BytesIO growth and client buffers; far below the 36 MiB object
    assert peak < 24 * MIB, f"peak {peak / MIB:.1f} MiB while writing {len(data) / MIB:.0f} MiB"
    assert _read(store, "big.pt") == data


def test_reading_an_object_replaced_meanwhile_fails_instead_of_mixing_bytes(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    location = s3_location()
    store = S3Store.from_location(location, create=True)
    _write(store, "a.pt", DATA)
    reader = S3Store(location, filesystem=store.filesystem, read_block_size=MIB)
    with reader.open("a.pt") as stream:
        head = stream.read(1000)
        s3_admin.put_object(Bucket=s3_bucket, Key="run/a.pt", Body=bytes(len(DATA)))
        stream.seek(len(DATA) - 1000)
        with pytest.raises(StorageError, match=r"a\.pt.*changed while it was being read") as caught:
            stream.read(1000)
    assert not isinstance(caught.value, CheckpointExistsError)
    assert head == DATA[:1000]
