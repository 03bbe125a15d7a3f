"""S3 requests per steady-state save (issue 6, target 6), counted on the store's own client.

With the writer lease held the manager is the location's only writer: it lists the prefix once and
then keeps its view of the stored checkpoints in memory. Without a lease every save lists afresh.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, open_store
from ml_playground.locations import RemoteLocation
from tests.conftest import make_checkpoint
from tests.servers import S3LocationFactory

pytestmark = pytest.mark.s3


def _manager(location: RemoteLocation) -> CheckpointManager:
    return CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=1))


def _counting(manager: CheckpointManager) -> Counter[str]:
    counts: Counter[str] = Counter()

    def seen(model: Any, **_: Any) -> None:
        counts[model.name] += 1

    client = manager.store.filesystem.connect()  # type: ignore[attr-defined]
    client.meta.events.register("before-call.s3", seen)
    return counts


def _steady_state_saves(manager: CheckpointManager, counts: Counter[str]) -> list[Counter[str]]:
    """Requests of each of three saves after a first one, each rotating the previous checkpoint away."""
    manager.save_last(make_checkpoint(0))
    per_save = []
    for step in (10, 20, 30):
        counts.clear()
        manager.save_last(make_checkpoint(step))
        per_save.append(Counter(counts))
    return per_save


def test_with_the_lease_held_a_steady_state_save_lists_nothing(s3_location: S3LocationFactory) -> None:
    manager = _manager(s3_location())
    counts = _counting(manager)
    with manager.acquire_writer(ttl=3600):  # no heartbeat PutObject inside the counted saves
        per_save = _steady_state_saves(manager, counts)
    # two reads of the lease (before the write, and before rotating, as a long upload may have lost it),
    # the store's HEAD before writing, the write (one PutObject below the part size), and the rotated
    # file's HEAD + DeleteObject: no listing, whatever the location holds
    expected = {"GetObject": 2, "HeadObject": 2, "PutObject": 1, "DeleteObject": 1}
    assert [dict(requests) for requests in per_save] == [expected] * 3


def test_without_a_lease_every_save_lists_afresh(s3_location: S3LocationFactory) -> None:
    manager = _manager(s3_location())
    counts = _counting(manager)
    for requests in _steady_state_saves(manager, counts):
        assert requests["ListObjectsV2"] >= 2, requests
