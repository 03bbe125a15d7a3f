"""LocalStore runs the shared store contract."""

from __future__ import annotations

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
        monkeypatch.setattr("ml_playground.checkpoint.stores._local._RENAMEAT2", None)
    elif sys.platform != "linux":
        pytest.skip("renameat2 is Linux's")
    store = LocalStore(tmp_path / "run", create=True, file_ops=OtherWriterCommitsFirst())
    expected = pytest.raises(CheckpointExistsError, match=r"ckpt_last_00000001\.pt was written by another writer")
    with expected, store.write("ckpt_last_00000001.pt") as stream:
        stream.write(b"ours")
    assert (tmp_path / "run" / "ckpt_last_00000001.pt").read_bytes() == b"the other writer's checkpoint"
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["ckpt_last_00000001.pt"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "hard-link"])
def test_a_commit_leaves_only_the_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr("ml_playground.checkpoint.stores._local._RENAMEAT2", None)
    store = LocalStore(tmp_path / "run", create=True)
    with store.write("ckpt_last_00000001.pt") as stream:
        stream.write(b"ours")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["ckpt_last_00000001.pt"]
    assert (tmp_path / "run" / "ckpt_last_00000001.pt").read_bytes() == b"ours"
