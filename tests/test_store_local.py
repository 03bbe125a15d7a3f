"""LocalStore runs the shared store contract."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointStore, FileOps, LocalStore
from ml_playground.errors import CheckpointExistsError
from tests.store_contract import StoreContract


class TestLocalStoreContract(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> CheckpointStore:
        return LocalStore(tmp_path / "run", create=True)

    @pytest.fixture
    def reopen(self, store: CheckpointStore, tmp_path: Path) -> Callable[[], CheckpointStore]:
        return lambda: LocalStore(tmp_path / "run")


class OtherWriterCommitsFirst(FileOps):
    """Another writer commits the same name after our "is it free?" check, just before our rename."""

    def rename_no_replace(self, src: Path, dst: Path) -> None:
        dst.write_bytes(b"the other writer's checkpoint")
        super().rename_no_replace(src, dst)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "hard-link"])
def test_a_name_committed_by_another_writer_during_the_save_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool
) -> None:
    # the check and the rename were two steps: the other writer's file was silently replaced
    if not renameat2:  # as on macOS, or a libc without renameat2
        monkeypatch.setattr("ml_playground.checkpoint.stores.local._fileops._RENAMEAT2", None)
    elif sys.platform != "linux":
        pytest.skip("renameat2 is Linux's")
    else:
        from ml_playground.checkpoint.stores.local import _fileops

        assert _fileops._RENAMEAT2 is not None  # the path under test is the one taken
    store = LocalStore(tmp_path / "run", create=True, file_ops=OtherWriterCommitsFirst())
    expected = pytest.raises(CheckpointExistsError, match=r"ckpt_last_00000001\.pt was written by another writer")
    with expected, store.write("ckpt_last_00000001.pt") as stream:
        stream.write(b"ours")
    assert (tmp_path / "run" / "ckpt_last_00000001.pt").read_bytes() == b"the other writer's checkpoint"
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["ckpt_last_00000001.pt"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "hard-link"])
def test_a_commit_leaves_only_the_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr("ml_playground.checkpoint.stores.local._fileops._RENAMEAT2", None)
    store = LocalStore(tmp_path / "run", create=True)
    with store.write("ckpt_last_00000001.pt") as stream:
        stream.write(b"ours")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["ckpt_last_00000001.pt"]
    assert (tmp_path / "run" / "ckpt_last_00000001.pt").read_bytes() == b"ours"


def test_a_name_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    # renameat2 takes C strings: "ckpt_last_00000001.pt\0..." would commit as ckpt_last_00000001.pt
    store = LocalStore(tmp_path / "run", create=True)
    with pytest.raises(ValueError, match="not a valid object name"), store.write("ckpt_last_00000001.pt\0" + "a" * 300):
        pass
    assert list((tmp_path / "run").iterdir()) == []


def test_a_linked_commit_whose_temporary_cannot_be_removed_is_still_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # where renameat2 is missing the commit is link + unlink: once linked, the checkpoint is there, and a
    # failed unlink of the temporary must not report the save as failed (nor delete the committed file)
    store = LocalStore(tmp_path / "run", create=True)
    monkeypatch.setattr("ml_playground.checkpoint.stores.local._fileops._RENAMEAT2", None)
    real_unlink = os.unlink

    def failing_unlink(path: object, *args: object, **kwargs: object) -> None:
        if ".ckpt-partial" in str(path):
            raise OSError(errno.EIO, "injected I/O error", str(path))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("ml_playground.checkpoint.stores.local._fileops.os.unlink", failing_unlink)
    with store.write("ckpt_last_00000001.pt") as stream:
        stream.write(b"ours")
    assert (tmp_path / "run" / "ckpt_last_00000001.pt").read_bytes() == b"ours"
    assert "could not remove its temporary" in caplog.text


class InterruptedWrite(FileOps):
    """A Ctrl-C or a second SIGTERM whose handler raises inside a write, as a signal does."""

    def write(self, fd: int, data: memoryview) -> int:
        raise KeyboardInterrupt


def test_an_interrupt_raised_inside_a_write_leaves_no_temporary(tmp_path: Path) -> None:
    # the interrupt was kept by the stream and raised again by the buffer's flush during the cleanup,
    # which then never removed the temporary file
    store = LocalStore(tmp_path / "run", create=True, file_ops=InterruptedWrite())
    with pytest.raises(KeyboardInterrupt), store.write("ckpt_last_00000001.pt") as stream:
        stream.write(b"x" * 100)  # buffered: the flush below fails and leaves it in the buffer
        stream.flush()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
