"""Real object-store servers on loopback for the tests: a moto S3 server and a GCS emulator.

Each server runs in its own subprocess (its memory is separate from the tests'), on 127.0.0.1 and a
free port, once per session; every test gets a fresh bucket. No test talks to anything but loopback.
Registered from ``conftest.py`` with ``pytest_plugins``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ml_playground.locations import RemoteLocation, StorageOptions

# gcsfs reads this at import: without it every bucket operation first waits 60 s on a gRPC probe
# that the emulator does not answer.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

TEST_REGION = "us-east-1"
_BUCKETS = itertools.count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_port()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def _spawn(argv: list[str], tmp: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the dev extra (pip install -e '.[dev]')")
    return found


@dataclass
class MotoServer:
    endpoint: str
    process: subprocess.Popen[bytes]

    def admin(self) -> Any:
        """A plain boto3 client for checks the store under test must not be trusted with."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name=TEST_REGION,
        )


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    port = free_port()
    process = _spawn([_script("moto_server"), "-H", "127.0.0.1", "-p", str(port)], tmp_path_factory.mktemp("moto"))
    try:
        _wait_for_port(port, process, "moto_server")
        yield MotoServer(f"http://127.0.0.1:{port}", process)
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def s3_admin(moto_server: MotoServer) -> Any:
    return moto_server.admin()


@pytest.fixture
def aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials through the standard chain (environment variables), as a user would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", TEST_REGION)


@pytest.fixture
def s3_bucket(s3_admin: Any, aws_test_credentials: None) -> Iterator[str]:
    name = f"test-{next(_BUCKETS)}-{secrets.token_hex(4)}"
    s3_admin.create_bucket(Bucket=name)
    yield name
    _empty_bucket(s3_admin, name)  # moto keeps everything in RAM for the whole session


def _empty_bucket(admin: Any, bucket: str) -> None:
    for upload in admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        admin.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            admin.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    admin.delete_bucket(Bucket=bucket)


S3LocationFactory = Callable[..., RemoteLocation]


@pytest.fixture
def s3_location(moto_server: MotoServer, s3_bucket: str) -> S3LocationFactory:
    """``s3_location(prefix="run", **storage_options)``: a location in this test's bucket on moto."""

    def make(prefix: str = "run", *, bucket: str | None = None, **options: Any) -> RemoteLocation:
        options.setdefault("endpoint_url", moto_server.endpoint)
        options.setdefault("max_attempts", 2)
        return RemoteLocation(
            scheme="s3", root=f"{bucket or s3_bucket}/{prefix}", storage_options=StorageOptions(**options)
        )

    return make


@dataclass
class GcsEmulator:
    endpoint: str
    process: subprocess.Popen[bytes]

    def filesystem(self) -> Any:
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon", endpoint_url=self.endpoint, skip_instance_cache=True)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    port = free_port()
    argv = [_script("gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    process = _spawn(argv, tmp_path_factory.mktemp("gcs"))
    try:
        _wait_for_port(port, process, "gcp-storage-emulator")
        yield GcsEmulator(f"http://127.0.0.1:{port}", process)
    finally:
        _stop(process)


@pytest.fixture
def gcs_location(gcs_emulator: GcsEmulator) -> Callable[..., RemoteLocation]:
    """``gcs_location(prefix="run")``: a location in a fresh bucket on the emulator."""
    bucket = f"test-{next(_BUCKETS)}-{secrets.token_hex(4)}"
    gcs_emulator.filesystem().mkdir(bucket)

    def make(prefix: str = "run", **options: Any) -> RemoteLocation:
        options.setdefault("endpoint_url", gcs_emulator.endpoint)
        options.setdefault("anon", True)
        return RemoteLocation(scheme="gs", root=f"{bucket}/{prefix}", storage_options=StorageOptions(**options))

    return make


@dataclass
class AuthMotoServer:
    """A moto server that enforces IAM: bucket ``locked`` and a user allowed only to list and read it."""

    endpoint: str
    reader_key: str
    reader_secret: str
    bucket: str = "locked"


@pytest.fixture(scope="session")
def moto_with_iam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMotoServer]:
    import json

    import boto3

    port = free_port()
    tmp = tmp_path_factory.mktemp("moto-iam")
    argv = [_script("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", TMPDIR=str(tmp), INITIAL_NO_AUTH_ACTION_COUNT="4")
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, "moto_server (IAM enforced)")
        endpoint = f"http://127.0.0.1:{port}"
        setup: dict[str, Any] = {
            "endpoint_url": endpoint,
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
            "region_name": TEST_REGION,
        }
        iam, s3 = boto3.client("iam", **setup), boto3.client("s3", **setup)
        # exactly four unauthenticated actions; every later request must be signed by a known user
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        s3.create_bucket(Bucket="locked")
        # read-only; wildcards because moto 5.2.6 checks ListObjectsV2 against an action of its own name where
        # AWS (and moto 5.2.5) check s3:ListBucket
        policy = {"Effect": "Allow", "Action": ["s3:List*", "s3:Get*"], "Resource": "*"}
        iam.put_user_policy(
            UserName="reader",
            PolicyName="read-only",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
        )
        yield AuthMotoServer(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        _stop(process)
