"""Real file-system faults on small tmpfs mounts: a full disk and a read-only location.

Tests run as root, so ``chmod`` proves nothing about read-only locations; a read-only mount does. The
mounts need CAP_SYS_ADMIN; where ``mount`` is refused the tests skip and say so.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore, open_store
from ml_playground.errors import StorageError, StorageUnavailableError
from ml_playground.locations import LocalLocation
from tests.conftest import assert_same_checkpoint, make_checkpoint
from tests.faults._support import big_checkpoint, temporaries


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test only."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = _run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount_point))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if _run("umount", str(mount_point)).returncode != 0:
            _run("umount", "-l", str(mount_point))


def _remount_read_only(mount_point: Path) -> None:
    result = _run("mount", "-o", "remount,ro", str(mount_point))
    if result.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {result.stderr.strip()}")


def test_a_save_that_fills_the_disk_fails_cleanly_and_the_next_small_save_works(tmpfs: Path) -> None:
    run = tmpfs / "run"
    manager = CheckpointManager(LocalStore(run, create=True), KeepPolicy(last=2, best=1))
    small = make_checkpoint(0, width=16)
    manager.save_last(small)

    with pytest.raises(StorageError, match="no space left") as caught:
        manager.save_last(big_checkpoint(1))  # 4.5 MiB into a 4 MiB file system: a real ENOSPC
    assert str(run / "ckpt_last_00000001.pt") in str(caught.value)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_last_00000000.pt"]
    assert temporaries(run) == []
    assert_same_checkpoint(manager.load_latest(), small)

    manager.save_last(make_checkpoint(2, width=16))  # the failed save's space was given back
    assert [info.filename for info in manager.checkpoints()] == ["ckpt_last_00000002.pt", "ckpt_last_00000000.pt"]


@pytest.mark.parametrize("which", ["existing", "missing"])
def test_a_read_only_location_fails_when_the_store_is_opened_for_writing(tmpfs: Path, which: str) -> None:
    existing = tmpfs / "existing"
    CheckpointManager(LocalStore(existing, create=True)).save_last(make_checkpoint(0))
    _remount_read_only(tmpfs)
    location = LocalLocation(path=tmpfs / which)

    with pytest.raises(StorageUnavailableError, match="Read-only file system") as caught:
        open_store(location, create=True)
    assert str(location.path) in str(caught.value)


def test_a_read_only_location_can_still_be_read(tmpfs: Path) -> None:
    run = tmpfs / "run"
    saved = make_checkpoint(5)
    CheckpointManager(LocalStore(run, create=True)).save_last(saved)
    _remount_read_only(tmpfs)

    reader = CheckpointManager(open_store(LocalLocation(path=run)))
    assert_same_checkpoint(reader.load_latest(), saved)
