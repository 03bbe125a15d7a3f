"""S3 faults swept over many points, against a real moto server on loopback.

- A TCP proxy between the client and moto cuts connections at many byte offsets of a multipart
  upload (every connection past the offset, or only the first one, which retries absorb).
- Errors are injected per S3 operation into a save through ``CheckpointManager`` (with rotation due).

After each: no object under a final name unless the save reported success (and then its bytes are
exact), no multipart upload left open, the earlier checkpoint intact, and the error names the URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, open_store
from ml_playground.checkpoint.stores import FsspecStore
from ml_playground.errors import CheckpointError
from tests.conftest import assert_same_checkpoint, make_checkpoint
from tests.servers import MotoServer, S3LocationFactory
from tests.tcp_proxy import CuttingProxy

pytestmark = [pytest.mark.s3, pytest.mark.slow]

MIB = 2**20
DATA = os.urandom(11 * MIB + 4321)  # three parts of 5 MiB, the last one short
OLD, NEW = "ckpt_last_00000001.pt", "ckpt_last_00000002.pt"
PREVIOUS = b"previous" * 5000
# Offsets of the cut in the bytes a connection sends upward: inside the request line and headers,
# early in a body, around the 1 MiB buffer, mid-part, and near the end of a 5 MiB part.
OFFSETS = [40, 300, 1500, 20_000, 262_144, MIB - 1, MIB + 7, 2 * MIB + 333, 3 * MIB, 4 * MIB + 99, 5 * MIB - 10]


@pytest.fixture
def proxied(moto_server: MotoServer, s3_location: S3LocationFactory) -> Iterator[tuple[CuttingProxy, FsspecStore]]:
    port = int(moto_server.endpoint.rsplit(":", 1)[1])
    with CuttingProxy(port) as proxy:
        location = s3_location(endpoint_url=proxy.endpoint, part_size_mib=5, max_concurrency=2, read_timeout=5)
        store = open_store(location, create=True)
        assert isinstance(store, FsspecStore)
        with store.write(OLD) as stream:
            stream.write(PREVIOUS)
        yield proxy, store


def _state(s3_admin: Any, bucket: str) -> tuple[dict[str, bytes], int]:
    listed = s3_admin.list_objects_v2(Bucket=bucket).get("Contents", [])
    objects = {o["Key"]: s3_admin.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}
    return objects, len(s3_admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("cuts", [None, 1], ids=["every-connection", "first-connection-only"])
def test_cutting_the_connection_at_many_offsets_never_commits_a_partial_object(
    proxied: tuple[CuttingProxy, FsspecStore], s3_admin: Any, s3_bucket: str, cuts: int | None
) -> None:
    proxy, store = proxied
    outcomes: dict[str, int] = {}
    for offset in OFFSETS:
        proxy.cut_after_bytes, proxy.cuts, proxy.cut_count = offset, cuts, 0
        try:
            with store.write(NEW) as stream:
                for start in range(0, len(DATA), 1_000_003):
                    stream.write(DATA[start : start + 1_000_003])
        except CheckpointError as exc:
            outcome = "failed cleanly" if f"{store.url}/{NEW}" in str(exc) else f"failed without naming the URL: {exc}"
        else:
            outcome = "succeeded after retry"
        proxy.cut_after_bytes = None
        objects, open_uploads = _state(s3_admin, s3_bucket)
        assert open_uploads == 0, f"cut at {offset}: a multipart upload was left open"
        assert objects[f"run/{OLD}"] == PREVIOUS
        if outcome == "failed cleanly":
            assert f"run/{NEW}" not in objects, f"cut at {offset}: a failed save left an object"
        else:
            assert objects[f"run/{NEW}"] == DATA, f"cut at {offset}: the committed bytes differ"
            store.delete(NEW)
        assert proxy.cut_count >= 1, f"cut at {offset} never happened"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"S3 cuts ({'every' if cuts is None else 'first'} connection): {len(OFFSETS)} offsets -> {outcomes}")
    assert set(outcomes) <= {"failed cleanly", "succeeded after retry"}, outcomes
    if cuts is None:
        assert outcomes == {"failed cleanly": len(OFFSETS)}
    else:  # retries absorb a single cut: 11 of 11 saves succeed (docs/reliability.md)
        assert outcomes == {"succeeded after retry": len(OFFSETS)}


OPERATIONS = ["ListObjectsV2", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "DeleteObject"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_error_in_any_s3_operation_of_a_save_is_clean_and_named(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str, operation: str
) -> None:
    from botocore.exceptions import ConnectionClosedError

    location = s3_location(part_size_mib=5, max_concurrency=2)
    manager = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=1))
    first = make_checkpoint(1, width=8)
    manager.save_last(first)
    big = make_checkpoint(2, width=1024)  # ~12 MiB with its optimizer state: a multipart upload
    store = manager.store
    assert isinstance(store, FsspecStore)

    def fail(**_: Any) -> None:
        raise ConnectionClosedError(endpoint_url=f"injected {operation} fault")

    client = store.filesystem.connect()
    client.meta.events.register(f"before-send.s3.{operation}", fail)
    try:
        with pytest.raises(CheckpointError) as caught:
            manager.save_last(big)
    finally:
        client.meta.events.unregister(f"before-send.s3.{operation}", fail)
    message = str(caught.value)
    assert location.url in message, message
    objects, open_uploads = _state(s3_admin, s3_bucket)
    assert open_uploads == 0
    if operation == "DeleteObject":  # the save committed; the rotation failed and says so
        assert "was saved, but rotation failed" in message
        assert set(objects) == {f"run/{OLD}", f"run/{NEW}"}
        assert manager.load_latest().iter_num == 2
        manager.rotate()  # retried: the policy is met
        assert [i.filename for i in manager.checkpoints()] == [NEW]
    else:
        assert set(objects) == {f"run/{OLD}"}
        assert_same_checkpoint(manager.load_latest(), first)
