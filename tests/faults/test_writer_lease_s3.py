"""The writer lease on S3 (moto server on loopback): conditional puts, expiry, heartbeats, takeover."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, open_store
from ml_playground.checkpoint._lease import LEASE_NAME
from ml_playground.checkpoint.stores.s3._lease import S3WriterLease
from ml_playground.errors import CheckpointError, LocationLockedError
from tests.conftest import make_checkpoint
from tests.servers import MotoServer, S3LocationFactory
from tests.tcp_proxy import CuttingProxy

pytestmark = pytest.mark.s3

KEY = f"run/{LEASE_NAME}"


def _manager(s3_location: S3LocationFactory) -> CheckpointManager:
    return CheckpointManager(open_store(s3_location(), create=True), KeepPolicy(last=2, best=1))


def _foreign_lease(s3_admin: Any, bucket: str, expires_in: float) -> None:
    record = {
        "host": "node-that-died",
        "pid": 4242,
        "process_start": 1,
        "acquired_at": "2026-01-01T00:00:00+00:00",
        "token": "feedface",
        "expires_at": time.time() + expires_in,
    }
    s3_admin.put_object(Bucket=bucket, Key=KEY, Body=json.dumps(record).encode())


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(s3_location: S3LocationFactory) -> None:
    first = _manager(s3_location)
    with first.acquire_writer():
        first.save_last(make_checkpoint(1))
        with pytest.raises(LocationLockedError) as caught:
            _manager(s3_location).acquire_writer()
        message = str(caught.value)
        assert first.store.url in message
        assert "its process on this host is alive" in message
        assert "force=True" in message


def test_a_lease_of_a_dead_node_blocks_only_until_it_expires(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    _foreign_lease(s3_admin, s3_bucket, expires_in=30)
    with pytest.raises(LocationLockedError, match="node-that-died.*expires in"):
        _manager(s3_location).acquire_writer()
    _foreign_lease(s3_admin, s3_bucket, expires_in=-1)
    manager = _manager(s3_location)
    with manager.acquire_writer() as lease:
        manager.save_last(make_checkpoint(1))
        stored = json.loads(s3_admin.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read())
        assert stored["token"] == lease.holder.token
    assert "Contents" not in s3_admin.list_objects_v2(Bucket=s3_bucket, Prefix=KEY)


def test_the_heartbeat_renews_the_lease(s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str) -> None:
    with _manager(s3_location).acquire_writer(ttl=1.0):
        first = json.loads(s3_admin.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read())["expires_at"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            later = json.loads(s3_admin.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read())["expires_at"]
            if later > first:
                break
        assert later > first, "the heartbeat never renewed the lease"


def test_forcing_takes_over_and_the_old_writer_stops(s3_location: S3LocationFactory) -> None:
    old, new = _manager(s3_location), _manager(s3_location)
    old.acquire_writer()
    old.save_last(make_checkpoint(1))
    with new.acquire_writer(force=True):
        new.save_last(make_checkpoint(2))
        with pytest.raises(LocationLockedError, match="was taken over by pid"):
            old.save_last(make_checkpoint(3))
        assert old.lease is not None
        old.lease.release()  # must not delete the new holder's lease
        new.save_last(make_checkpoint(4))
    assert [i.filename for i in new.checkpoints()] == ["ckpt_last_00000004.pt", "ckpt_last_00000002.pt"]


def test_two_takeovers_of_an_expired_lease_never_both_win(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    store = open_store(s3_location(), create=True)
    doubles = 0
    for _ in range(8):
        _foreign_lease(s3_admin, s3_bucket, expires_in=-1)
        results = _race(store, contenders=3)
        doubles += results.count("won") != 1
        s3_admin.delete_object(Bucket=s3_bucket, Key=KEY)
    assert doubles == 0


def _race(store: Any, contenders: int) -> list[str]:
    """``contenders`` threads try to take the lease at the same moment; what each got."""
    results: list[str] = []
    barrier = threading.Barrier(contenders)

    def contend() -> None:
        barrier.wait()
        try:
            S3WriterLease(store.filesystem, store.location, ttl=60)
        except LocationLockedError:
            results.append("refused")
        else:
            results.append("won")

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


@pytest.fixture
def proxied_location(moto_server: MotoServer, s3_location: S3LocationFactory) -> Iterator[tuple[CuttingProxy, Any]]:
    port = int(moto_server.endpoint.rsplit(":", 1)[1])
    with CuttingProxy(port) as proxy:
        yield proxy, s3_location(endpoint_url=proxy.endpoint, read_timeout=5)


def _drop_lease_put_responses(proxy: CuttingProxy, bucket: str, count: int) -> None:
    lease_put = f"PUT /{bucket}/{KEY}".encode()
    proxy.drop_response_when = lambda head: head.startswith(lease_put)
    proxy.drops, proxy.drop_count = count, 0


def test_a_lease_put_whose_response_was_lost_is_still_ours(
    proxied_location: tuple[CuttingProxy, Any], s3_admin: Any, s3_bucket: str
) -> None:
    # botocore retries the PUT; the retry answers 412 because the first attempt landed. That is our own
    # lease: acquiring must succeed (it was refused by itself), and a heartbeat must not call it lost
    proxy, location = proxied_location
    manager = CheckpointManager(open_store(location, create=True), KeepPolicy(last=2, best=1))
    _drop_lease_put_responses(proxy, s3_bucket, 1)
    lease = manager.acquire_writer(ttl=4)
    assert proxy.drop_count == 1
    _drop_lease_put_responses(proxy, s3_bucket, 1)
    deadline = time.monotonic() + 10
    while proxy.drop_count < 1 and time.monotonic() < deadline:  # a heartbeat (every ttl / 4 = 1 s)
        time.sleep(0.1)
    assert proxy.drop_count == 1
    time.sleep(1.5)  # the heartbeat has settled the 412
    manager.save_last(make_checkpoint(1))  # checks the lease: still ours
    lease.release()
    assert s3_admin.list_objects_v2(Bucket=s3_bucket, Prefix=KEY).get("KeyCount", 0) == 0


def test_a_writer_whose_heartbeats_fail_renews_before_saving_or_stops(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str
) -> None:
    # check() used to compare only the token: a writer went on saving on a lease that had expired
    manager = _manager(s3_location)
    lease = manager.acquire_writer(ttl=2)
    client = manager.store.filesystem.connect()  # type: ignore[attr-defined]

    def refuse_lease_writes(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key") == KEY:
            raise RuntimeError("injected: the lease cannot be written")

    client.meta.events.register("before-parameter-build.s3.PutObject", refuse_lease_writes)
    time.sleep(1.5)  # past ttl / 2 without a renewal
    with pytest.raises(CheckpointError, match=r"writer lease"):
        manager.save_last(make_checkpoint(1))
    client.meta.events.unregister("before-parameter-build.s3.PutObject", refuse_lease_writes)
    manager.save_last(make_checkpoint(1))  # renewed, then saved
    record = json.loads(s3_admin.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read())
    assert record["token"] == lease.holder.token
    assert record["expires_at"] > time.time() + 1
    lease.release()
