"""The manager contract (tests/manager_contract.py) on every store: local, memory://, S3 (moto), GCS (emulator)."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ml_playground.locations import LocalLocation, RemoteLocation
from tests.manager_contract import LocationFactory, ManagerContract
from tests.servers import S3LocationFactory

_COUNT = itertools.count()


class TestLocalManagerContract(ManagerContract):
    lease_expected = True
    machine_settings = settings(
        max_examples=40, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
    )

    @pytest.fixture
    def fresh_location(self, tmp_path: Path) -> LocationFactory:
        return lambda: LocalLocation(path=tmp_path / f"run{next(_COUNT)}")


class TestMemoryManagerContract(ManagerContract):
    @pytest.fixture
    def fresh_location(self) -> LocationFactory:
        return lambda: RemoteLocation(scheme="memory", root=f"manager-{secrets.token_hex(6)}/run")


@pytest.mark.s3
class TestS3ManagerContract(ManagerContract):
    lease_expected = True

    @pytest.fixture
    def fresh_location(self, s3_location: S3LocationFactory) -> LocationFactory:
        return lambda: s3_location(prefix=f"run{next(_COUNT)}", part_size_mib=5)


@pytest.mark.gcs
class TestGcsManagerContract(ManagerContract):
    @pytest.fixture
    def fresh_location(self, gcs_location: Callable[..., RemoteLocation]) -> LocationFactory:
        return lambda: gcs_location(prefix=f"run{next(_COUNT)}")
