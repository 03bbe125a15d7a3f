"""Loads from S3 through a temporary local copy (concurrent ranged GETs): fallbacks, errors, clean-up."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, open_store
from ml_playground.checkpoint.stores import FsspecStore
from ml_playground.errors import CheckpointNotFoundError, StorageError
from tests.conftest import assert_same_checkpoint, make_checkpoint
from tests.servers import S3LocationFactory

pytestmark = pytest.mark.s3


def _saved(s3_location: S3LocationFactory) -> tuple[CheckpointManager, str, Any]:
    location = s3_location(part_size_mib=5, max_concurrency=3)
    manager = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=0))
    checkpoint = make_checkpoint(3, width=1100)  # ~14 MiB: three ranges of 5 MiB
    name = manager.save_last(checkpoint)
    assert name is not None
    return manager, name.filename, checkpoint


def test_a_load_fetches_ranges_into_a_temporary_file_and_deletes_it(
    s3_location: S3LocationFactory, temp_dir: Path
) -> None:
    manager, filename, checkpoint = _saved(s3_location)
    ranges: list[str] = []
    manager.store.filesystem.connect().meta.events.register(  # type: ignore[attr-defined]
        "before-call.s3.GetObject", lambda params, **_: ranges.append(params["headers"].get("Range", ""))
    )
    assert_same_checkpoint(manager.load(filename), checkpoint)
    info = manager.latest()
    assert info is not None
    part = 5 * 2**20
    expected = [f"bytes={start}-{min(start + part, info.size) - 1}" for start in range(0, info.size, part)]
    assert len(expected) >= 3  # several ranges, fetched concurrently
    assert sorted(ranges, key=lambda r: int(r[6:].split("-")[0])) == expected
    assert list(temp_dir.glob("ml_playground-load-*")) == []


def test_too_little_temporary_space_streams_instead(
    s3_location: S3LocationFactory, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, filename, checkpoint = _saved(s3_location)
    monkeypatch.setattr(
        "ml_playground.checkpoint.stores.s3._download.shutil.disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0)
    )
    assert isinstance(manager.store, FsspecStore)
    local_copy = manager.store.capabilities.local_copy
    assert local_copy is not None
    with local_copy(filename) as copy:
        assert copy is None
    assert_same_checkpoint(manager.load(filename), checkpoint)


def test_a_missing_object_is_not_found(s3_location: S3LocationFactory, temp_dir: Path) -> None:
    manager, _, _ = _saved(s3_location)
    with pytest.raises(CheckpointNotFoundError, match="ckpt_last_00000009.pt"):
        manager.load("ckpt_last_00000009.pt")
    assert list(temp_dir.glob("ml_playground-load-*")) == []


def test_a_failing_range_raises_storage_error_and_leaves_no_temporary_file(
    s3_location: S3LocationFactory, temp_dir: Path
) -> None:
    manager, filename, _ = _saved(s3_location)

    def fail(params: Any, **_: Any) -> None:
        if params["headers"].get("Range", "").startswith("bytes=10485760-"):
            raise ConnectionClosedError(endpoint_url="injected GetObject fault")

    manager.store.filesystem.connect().meta.events.register("before-call.s3.GetObject", fail)  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match=f"{filename}.*injected GetObject fault"):
        manager.load(filename)
    assert list(temp_dir.glob("ml_playground-load-*")) == []


def test_an_object_replaced_during_the_load_fails_instead_of_mixing_bytes(
    s3_location: S3LocationFactory, s3_admin: Any, s3_bucket: str, temp_dir: Path
) -> None:
    manager, filename, _ = _saved(s3_location)

    def replace_once(**_: Any) -> None:
        if not replaced:
            replaced.append(True)
            s3_admin.put_object(Bucket=s3_bucket, Key=f"run/{filename}", Body=b"not the checkpoint")

    replaced: list[bool] = []
    manager.store.filesystem.connect().meta.events.register("before-call.s3.GetObject", replace_once)  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match=f"{filename} was replaced while being loaded"):
        manager.load(filename)
    assert list(temp_dir.glob("ml_playground-load-*")) == []


@pytest.mark.parametrize("load", ["load", "load_weights"])
def test_a_temporary_directory_that_is_gone_is_a_storage_error_naming_it(
    s3_location: S3LocationFactory, temp_dir: Path, monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    # a raw FileNotFoundError escaped (and translated as the object's, it would read "no such object")
    manager, filename, _ = _saved(s3_location)
    monkeypatch.setattr("tempfile.tempdir", str(temp_dir))  # as a running job has it, found once
    shutil.rmtree(temp_dir)  # TMPDIR removed under the job
    with pytest.raises(StorageError, match=rf"loading .*{filename}: the local temporary copy in {temp_dir}") as caught:
        getattr(manager, load)(filename)
    assert not isinstance(caught.value, CheckpointNotFoundError)
