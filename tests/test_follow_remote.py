"""``eval --follow`` on object stores: S3 (moto, with the writer lease) and GCS (emulator, no lease: it ends by
the run's max_iters, ``--until`` or the idle timeout)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, open_store
from ml_playground.checkpoint.stores.s3 import S3Store
from ml_playground.flows.events import CheckpointReport, Event
from ml_playground.flows.follow import FollowSettings, follow
from ml_playground.locations import RemoteLocation
from tests.servers import S3LocationFactory
from tests.test_follow import FAST, Evaluations, in_background, run_checkpoint

LEASE_FILE = ".ml_playground.lease"


def _names(events: list[Event]) -> list[str]:
    return [e.name for e in events if isinstance(e, CheckpointReport)]


@pytest.mark.s3
def test_follow_on_s3_reports_each_checkpoint_and_ends_when_the_writer_releases(
    s3_location: S3LocationFactory,
) -> None:
    location = s3_location()
    writer = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=1))
    lease = writer.acquire_writer()
    writer.save_last(run_checkpoint(0))

    def train() -> None:
        for iteration in (10, 20):
            time.sleep(0.2)
            writer.save_best(run_checkpoint(iteration))
            writer.save_last(run_checkpoint(iteration))
        lease.release()  # stopped before max_iters (100): the lease tells the follower

    events: list[Event] = []
    with in_background(train):
        result = follow(location, Evaluations(), settings=FAST, on_event=events.append)
    assert result.ending == "lease"
    names = _names(events)
    assert names[0] == "ckpt_last_00000000.pt"
    assert set(names[-2:]) == {"ckpt_last_00000020.pt", "ckpt_best_00000020_80.000000.pt"}
    assert len(names) == len(set(names))


@pytest.mark.s3
def test_s3_lease_state_as_a_reader_sees_it(s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str) -> None:
    location = s3_location()
    store = open_store(location, create=True)
    assert isinstance(store, S3Store)
    lease_state = store.capabilities.lease_state
    assert lease_state is not None
    assert lease_state() == "released"
    record = {"host": "node-that-died", "pid": 4242, "process_start": 1, "acquired_at": "2026-01-01T00:00:00+00:00"}
    for expires_in, state in ((30, "held"), (-1, "expired")):
        body = {**record, "token": "feedface", "expires_at": time.time() + expires_in}
        s3_admin.put_object(Bucket=s3_bucket, Key=f"run/{LEASE_FILE}", Body=json.dumps(body).encode())
        assert lease_state() == state
    keys = [o["Key"] for o in s3_admin.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == [f"run/{LEASE_FILE}"]  # the reader wrote nothing


@pytest.mark.gcs
def test_follow_on_gcs_ends_at_max_iters(gcs_location: Callable[..., RemoteLocation]) -> None:
    location = gcs_location()
    writer = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=1))
    assert writer.store.capabilities.lease_state is None  # no writer lease on GCS yet
    writer.save_last(run_checkpoint(0, max_iters=20))

    def train() -> None:
        time.sleep(0.2)
        writer.save_best(run_checkpoint(20, max_iters=20))
        writer.save_last(run_checkpoint(20, max_iters=20))

    events: list[Event] = []
    with in_background(train):
        result = follow(location, Evaluations(), settings=FAST, on_event=events.append)
    assert result.ending == "max_iters"
    assert _names(events)[0] == "ckpt_last_00000000.pt"
    assert set(_names(events)[1:]) == {"ckpt_last_00000020.pt", "ckpt_best_00000020_80.000000.pt"}


@pytest.mark.gcs
def test_follow_on_gcs_without_max_iters_ends_at_until_or_the_idle_timeout(
    gcs_location: Callable[..., RemoteLocation],
) -> None:
    location = gcs_location()
    writer = CheckpointManager(open_store(location, create=True), KeepPolicy(last=5, best=0))
    for iteration in (0, 10, 20):
        writer.save_last(run_checkpoint(iteration))
    until = follow(location, Evaluations(), settings=dataclasses.replace(FAST, until=10))
    assert (until.ending, [r.name for r in until.reports]) == (
        "until",
        ["ckpt_last_00000000.pt", "ckpt_last_00000010.pt"],
    )
    idle = follow(location, Evaluations(), settings=FollowSettings(poll=0.05, idle_timeout=0.5))
    assert idle.ending == "idle"
    assert len(idle.reports) == 3
