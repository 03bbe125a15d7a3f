"""Faults during an S3 save bigger than the multipart threshold, against a real moto server.

After every failed save: nothing under the final name, the previous checkpoint intact, and no
multipart upload left open (asked of the server itself, not of the store under test).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointStore, open_store
from ml_playground.checkpoint.stores import FsspecStore
from ml_playground.errors import CheckpointError, CheckpointExistsError, StorageError
from tests.servers import MotoServer, S3LocationFactory
from tests.store_contract import Boom, write_bytes
from tests.store_contract import read_bytes as _read
from tests.tcp_proxy import CuttingProxy

pytestmark = pytest.mark.s3

PART_MIB = 5
BIG = os.urandom(16 * 2**20 + 12345)  # four parts of 5 MiB, the last one short
PREVIOUS = b"the previous checkpoint" * 1000
NEW = "ckpt_last_00000002.pt"
OLD = "ckpt_last_00000001.pt"


def _write(store: CheckpointStore, name: str, data: bytes) -> None:
    write_bytes(store, name, data, chunk=1_000_003)  # an odd chunk size: writes straddle part boundaries


@pytest.fixture
def check_clean(s3_admin: Any, s3_bucket: str) -> Callable[[CheckpointStore], None]:
    def check(store: CheckpointStore) -> None:
        keys = [obj["Key"] for obj in s3_admin.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert keys == [f"run/{OLD}"]
        assert s3_admin.get_object(Bucket=s3_bucket, Key=f"run/{OLD}")["Body"].read() == PREVIOUS
        assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
        assert [obj.name for obj in store.list()] == [OLD]

    return check


@pytest.fixture
def store(s3_location: S3LocationFactory) -> FsspecStore:
    made = open_store(s3_location(part_size_mib=PART_MIB, max_concurrency=2), create=True)
    assert isinstance(made, FsspecStore)
    _write(made, OLD, PREVIOUS)
    return made


@pytest.fixture
def proxied(moto_server: MotoServer, s3_location: S3LocationFactory) -> Iterator[tuple[CuttingProxy, FsspecStore]]:
    port = int(moto_server.endpoint.rsplit(":", 1)[1])
    with CuttingProxy(port) as proxy:
        location = s3_location(endpoint_url=proxy.endpoint, part_size_mib=PART_MIB, max_concurrency=2, read_timeout=5)
        made = open_store(location, create=True)
        assert isinstance(made, FsspecStore)
        _write(made, OLD, PREVIOUS)
        yield proxy, made


def _client(store: FsspecStore) -> Any:
    return store.filesystem.connect()


@pytest.mark.parametrize("interrupt", [Boom, KeyboardInterrupt])
def test_exception_mid_upload_aborts_everything(
    store: FsspecStore, check_clean: Callable[[CheckpointStore], None], interrupt: type[BaseException]
) -> None:
    with pytest.raises(interrupt), store.write(NEW) as stream:
        stream.write(BIG[: 12 * 2**20])  # two parts uploaded or in flight, a third buffered
        raise interrupt
    check_clean(store)


def test_persistently_failing_upload_part_raises_storage_error_and_aborts(
    store: FsspecStore, check_clean: Callable[[CheckpointStore], None]
) -> None:
    from botocore.exceptions import ConnectionClosedError

    def fail(**_: Any) -> None:
        raise ConnectionClosedError(endpoint_url="injected UploadPart fault")

    _client(store).meta.events.register("before-send.s3.UploadPart", fail)
    with pytest.raises(StorageError, match=f"{NEW}.*injected UploadPart fault"):
        _write(store, NEW, BIG)
    check_clean(store)


def test_a_transient_upload_part_failure_is_retried(store: FsspecStore) -> None:
    from botocore.exceptions import ConnectionClosedError

    failures = [1]

    def fail_once(**_: Any) -> None:
        if failures:
            failures.pop()
            raise ConnectionClosedError(endpoint_url="injected UploadPart fault")

    _client(store).meta.events.register("before-send.s3.UploadPart", fail_once)
    _write(store, NEW, BIG)
    assert failures == []
    assert _read(store, NEW) == BIG


def test_failed_complete_aborts_the_upload(store: FsspecStore, check_clean: Callable[[CheckpointStore], None]) -> None:
    from botocore.exceptions import ConnectionClosedError

    def fail(**_: Any) -> None:
        raise ConnectionClosedError(endpoint_url="injected CompleteMultipartUpload fault")

    _client(store).meta.events.register("before-send.s3.CompleteMultipartUpload", fail)
    with pytest.raises(StorageError, match=f"{NEW}.*injected CompleteMultipartUpload fault"):
        _write(store, NEW, BIG)
    check_clean(store)


def test_connection_cut_mid_upload_fails_cleanly(
    proxied: tuple[CuttingProxy, FsspecStore], check_clean: Callable[[CheckpointStore], None]
) -> None:
    proxy, store = proxied
    proxy.cut_after_bytes = 2 * 2**20  # every connection dies inside its first part
    with pytest.raises(CheckpointError, match=NEW):
        _write(store, NEW, BIG)
    assert proxy.cut_count >= 2
    proxy.cut_after_bytes = None  # the abort went through; checks go around the proxy
    check_clean(store)


def test_connection_cut_once_is_retried_and_the_bytes_are_exact(proxied: tuple[CuttingProxy, FsspecStore]) -> None:
    proxy, store = proxied
    proxy.cut_after_bytes = 2 * 2**20
    proxy.cuts = 1
    _write(store, NEW, BIG)
    assert proxy.cut_count == 1
    assert _read(store, NEW) == BIG


def test_lost_complete_response_is_settled_by_the_object_itself(
    proxied: tuple[CuttingProxy, FsspecStore], s3_admin: Any, s3_bucket: str
) -> None:
    proxy, store = proxied
    proxy.drop_response_when = lambda head: head.startswith(b"POST ") and b"uploadId=" in head.split(b"\r\n", 1)[0]
    proxy.drops = 1
    _write(store, NEW, BIG)
    assert proxy.drop_count == 1
    assert _read(store, NEW) == BIG
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_single_put_cut_mid_request_fails_cleanly(
    proxied: tuple[CuttingProxy, FsspecStore], check_clean: Callable[[CheckpointStore], None]
) -> None:
    proxy, store = proxied
    proxy.cut_after_bytes = 2 * 2**20
    with pytest.raises(CheckpointError, match=NEW):
        _write(store, NEW, BIG[: 4 * 2**20])  # under one part: a single PutObject
    proxy.cut_after_bytes = None
    check_clean(store)


def test_lost_put_response_then_412_on_retry_is_recognised_as_our_own_object(
    proxied: tuple[CuttingProxy, FsspecStore], s3_admin: Any, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, store = proxied
    proxy.drop_response_when = lambda head: head.startswith(f"PUT /{s3_bucket}/run/{NEW}".encode())
    proxy.drops = 1
    with caplog.at_level(logging.INFO, logger="ml_playground"):
        _write(store, NEW, PREVIOUS + b"new")  # under one part: a single conditional PutObject
    assert proxy.drop_count == 1
    assert "retried after it had landed" in caplog.text  # the retry got 412 and the write id settled it
    assert _read(store, NEW) == PREVIOUS + b"new"


def test_someone_elses_object_is_not_mistaken_for_ours(store: FsspecStore, s3_admin: Any, s3_bucket: str) -> None:
    from botocore.exceptions import ConnectionClosedError

    events = _client(store).meta.events

    def other_writer_wins(**_: Any) -> None:
        # the commit never reaches the server; meanwhile another writer commits the same name
        events.unregister("before-send.s3.CompleteMultipartUpload", other_writer_wins)
        s3_admin.put_object(Bucket=s3_bucket, Key=f"run/{NEW}", Body=b"theirs")
        raise ConnectionClosedError(endpoint_url="injected CompleteMultipartUpload fault")

    events.register("before-send.s3.CompleteMultipartUpload", other_writer_wins)
    with pytest.raises(CheckpointExistsError, match=NEW):  # the retried commit is refused: not ours
        _write(store, NEW, BIG)
    assert _read(store, NEW) == b"theirs"
    assert s3_admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.usefixtures("ctrl_c_enabled")
def test_ctrl_c_while_parts_are_in_flight_aborts_everything(
    store: FsspecStore, check_clean: Callable[[CheckpointStore], None]
) -> None:
    import _thread
    import asyncio

    async def interrupt_main_while_uploading(**_: Any) -> None:
        _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread, wherever it is
        await asyncio.sleep(1)  # the part stays in flight meanwhile

    _client(store).meta.events.register("before-send.s3.UploadPart", interrupt_main_while_uploading)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _write(store, NEW, BIG)
    assert time.monotonic() - started < 10
    check_clean(store)


@pytest.mark.usefixtures("ctrl_c_enabled")
@pytest.mark.parametrize(
    ("request_name", "data"),
    [("PutObject", PREVIOUS[:1000]), ("CreateMultipartUpload", BIG)],
    ids=["single-put-commit", "create-multipart"],
)
def test_ctrl_c_while_a_commit_or_create_runs_leaves_nothing_once_it_lands(
    store: FsspecStore, check_clean: Callable[[CheckpointStore], None], request_name: str, data: bytes
) -> None:
    # Ctrl-C stops our wait, not the request (it runs on fsspec's loop): it used to land after the save
    # had failed, publishing the checkpoint (PutObject) or leaving an open upload (Create...)
    import _thread
    import asyncio
    import signal
    import threading

    client = _client(store)
    raised = threading.Event()

    def ctrl_c(signum: int, frame: object) -> None:
        raised.set()
        raise KeyboardInterrupt

    async def interrupt_main_while_sending(**_: Any) -> None:
        client.meta.events.unregister(f"before-send.s3.{request_name}", interrupt_main_while_sending)
        _thread.interrupt_main()
        # the request is held until the main thread has raised the KeyboardInterrupt, however loaded the machine
        await asyncio.get_running_loop().run_in_executor(None, raised.wait, 20)

    client.meta.events.register(f"before-send.s3.{request_name}", interrupt_main_while_sending)
    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            _write(store, NEW, data)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert raised.is_set()
    time.sleep(1)  # after the request landed
    check_clean(store)


def test_next_writer_aborts_uploads_a_killed_writer_left_in_its_location(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    # what SIGKILL mid-save leaves behind; moto dates every upload in 2010, so all of these are "old"
    for key in ("run/ckpt_last_00000009.pt", "run/nested/ckpt_last_00000001.pt", "other/ckpt_last_00000001.pt"):
        s3_admin.create_multipart_upload(Bucket=s3_bucket, Key=key)
    open_store(s3_location("run"), create=True)
    left = sorted(upload["Key"] for upload in s3_admin.list_multipart_uploads(Bucket=s3_bucket)["Uploads"])
    assert left == ["other/ckpt_last_00000001.pt", "run/nested/ckpt_last_00000001.pt"]
