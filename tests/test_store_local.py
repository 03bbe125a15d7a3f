"""LocalStore runs the shared store contract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointStore, LocalStore
from tests.store_contract import StoreContract


class TestLocalStoreContract(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> CheckpointStore:
        return LocalStore(tmp_path / "run", create=True)

    @pytest.fixture
    def reopen(self, store: CheckpointStore, tmp_path: Path) -> Callable[[], CheckpointStore]:
        return lambda: LocalStore(tmp_path / "run")
