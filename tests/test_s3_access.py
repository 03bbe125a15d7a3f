"""Unusable S3 locations fail fast and clearly; credentials come from the standard chain only.

The autouse fixture in conftest isolates AWS config files and disables the instance-metadata probe,
so nothing here leaves loopback. "Unreachable" is a closed loopback port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ml_playground.checkpoint import open_store
from ml_playground.checkpoint.stores import FsspecStore
from ml_playground.checkpoint.stores._translate import translate
from ml_playground.checkpoint.stores.s3 import S3Store
from ml_playground.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from ml_playground.locations import RemoteLocation, StorageOptions
from tests.servers import AuthMotoServer, MotoServer, S3LocationFactory, closed_port

pytestmark = pytest.mark.s3


def _location(url_root: str, **options: Any) -> RemoteLocation:
    return RemoteLocation(scheme="s3", root=url_root, storage_options=StorageOptions(**options))


def test_closed_port_fails_fast_naming_the_url(aws_test_credentials: None) -> None:
    location = _location("some-bucket/run", endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=2)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"s3://some-bucket/run.*unreachable"):
        open_store(location, create=True)
    assert time.monotonic() - started < 10


def test_closed_port_with_default_retries_still_fails_fast_at_open(aws_test_credentials: None) -> None:
    location = _location("some-bucket/run", endpoint_url=f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError):
        open_store(location, create=True)
    assert time.monotonic() - started < 10


def test_missing_bucket_fails_at_open_naming_it(s3_location: S3LocationFactory) -> None:
    with pytest.raises(StorageUnavailableError, match=r"s3://no-such-bucket-here/run.*bucket does not exist"):
        open_store(s3_location(bucket="no-such-bucket-here"), create=True)


def test_reader_of_missing_bucket_fails_at_first_listing(s3_location: S3LocationFactory) -> None:
    store = open_store(s3_location(bucket="no-such-bucket-here"))
    with pytest.raises(StorageUnavailableError, match="no-such-bucket-here"):
        store.list()


def test_missing_credentials_fail_at_open_with_a_hint(moto_server: MotoServer) -> None:
    location = _location("some-bucket/run", endpoint_url=moto_server.endpoint, region="us-east-1")
    started = time.monotonic()
    with pytest.raises(
        StorageUnavailableError, match=r"s3://some-bucket/run.*no usable credentials.*AWS_ACCESS_KEY_ID"
    ):
        open_store(location, create=True)
    assert time.monotonic() - started < 10


def test_unknown_profile_fails_at_open(moto_server: MotoServer) -> None:
    location = _location("some-bucket/run", endpoint_url=moto_server.endpoint, profile="nope")
    with pytest.raises(StorageUnavailableError, match="nope"):
        open_store(location, create=True)


def test_profile_from_the_shared_config_files_is_used(
    moto_server: MotoServer, s3_admin: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
    credentials.write_text("[ci]\naws_access_key_id = fromprofile\naws_secret_access_key = fromprofile\n")
    location = _location(f"{s3_bucket}/run", endpoint_url=moto_server.endpoint, profile="ci", region="us-east-1")
    store = open_store(location, create=True)
    with store.write("a.pt") as stream:
        stream.write(b"a")
    assert s3_admin.get_object(Bucket=s3_bucket, Key="run/a.pt")["Body"].read() == b"a"


def test_endpoint_from_the_environment_is_used(
    moto_server: MotoServer, s3_admin: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    store = open_store(_location(f"{s3_bucket}/run"), create=True)
    with store.write("a.pt") as stream:
        stream.write(b"a")
    assert [obj.name for obj in store.list()] == ["a.pt"]


def test_denied_write_fails_at_open_and_reading_still_works(
    moto_with_iam: AuthMotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_with_iam.reader_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_with_iam.reader_secret)
    location = _location(f"{moto_with_iam.bucket}/run", endpoint_url=moto_with_iam.endpoint, region="us-east-1")
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"s3://locked/run.*access denied"):
        open_store(location, create=True)
    assert time.monotonic() - started < 10
    assert open_store(location).list() == []


def test_unknown_access_key_fails_at_open(moto_with_iam: AuthMotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    location = _location(f"{moto_with_iam.bucket}/run", endpoint_url=moto_with_iam.endpoint, region="us-east-1")
    with pytest.raises(StorageUnavailableError, match=r"s3://locked/run.*access denied.*InvalidAccessKeyId") as caught:
        open_store(location, create=True)
    assert "not-a-secret" not in str(caught.value)


# ---------------------------------------------------------------- nothing escapes untranslated

Scenario = Callable[[S3LocationFactory, MotoServer, pytest.MonkeyPatch], RemoteLocation]


def _unreachable(factory: S3LocationFactory, server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> RemoteLocation:
    return factory(endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)


def _no_bucket(factory: S3LocationFactory, server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> RemoteLocation:
    return factory(bucket="no-such-bucket-here")


def _no_credentials(factory: S3LocationFactory, server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> RemoteLocation:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    return factory()


def _verbs(store: FsspecStore) -> dict[str, Callable[[], object]]:
    def write() -> None:
        with store.write("ckpt_last_00000001.pt") as stream:
            stream.write(b"x" * 100)

    def read() -> None:
        with store.open("ckpt_last_00000001.pt") as stream:
            stream.read()

    return {"list": store.list, "write": write, "read": read, "delete": lambda: store.delete("ckpt_last_00000001.pt")}


@pytest.mark.parametrize("scenario", [_unreachable, _no_bucket, _no_credentials])
def test_no_backend_exception_escapes_any_verb(
    scenario: Scenario, s3_location: S3LocationFactory, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = scenario(s3_location, moto_server, monkeypatch)
    with pytest.raises(StorageUnavailableError, match=location.url):
        S3Store.from_location(location, create=True)
    store = S3Store.from_location(location, create=False)
    for verb, call in _verbs(store).items():
        with pytest.raises(CheckpointError) as caught:
            call()
        assert location.url in str(caught.value), verb
        assert type(caught.value).__module__ == "ml_playground.errors", verb


def _client_error(code: str, status: int, operation: str = "PutObject") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def _if_match_failed() -> Exception:
    from botocore.exceptions import ClientError

    response: Any = {"Error": {"Code": "PreconditionFailed", "Message": "m", "Condition": "If-Match"}}
    return ClientError(response, "GetObject")


def _s3fs_wrapped(code: str, status: int) -> Exception:
    from s3fs.errors import translate_boto_error

    wrapped: Exception = translate_boto_error(_client_error(code, status))
    return wrapped


def _backend_errors() -> list[tuple[str, Callable[[], BaseException], type[CheckpointError]]]:
    import aiohttp
    import botocore.exceptions as be
    from gcsfs.retry import HttpError

    return [
        ("NoSuchKey", lambda: _client_error("NoSuchKey", 404, "GetObject"), CheckpointNotFoundError),
        ("s3fs FileNotFound", lambda: _s3fs_wrapped("NoSuchKey", 404), CheckpointNotFoundError),
        ("NoSuchBucket", lambda: _client_error("NoSuchBucket", 404), StorageUnavailableError),
        ("s3fs NoSuchBucket", lambda: _s3fs_wrapped("NoSuchBucket", 404), StorageUnavailableError),
        ("AccessDenied", lambda: _client_error("AccessDenied", 403), StorageUnavailableError),
        ("s3fs AccessDenied", lambda: _s3fs_wrapped("AccessDenied", 403), StorageUnavailableError),
        ("InvalidAccessKeyId", lambda: _client_error("InvalidAccessKeyId", 403), StorageUnavailableError),
        ("PreconditionFailed", lambda: _client_error("PreconditionFailed", 412), CheckpointExistsError),
        ("If-Match 412", lambda: _if_match_failed(), StorageError),
        ("s3fs FileExists", lambda: FileExistsError("exists"), CheckpointExistsError),
        ("InternalError", lambda: _client_error("InternalError", 500), StorageError),
        ("NoCredentials", be.NoCredentialsError, StorageUnavailableError),
        ("EndpointConnection", lambda: be.EndpointConnectionError(endpoint_url="http://x"), StorageUnavailableError),
        ("ConnectionClosed", lambda: be.ConnectionClosedError(endpoint_url="http://x"), StorageError),
        ("ReadTimeout", lambda: be.ReadTimeoutError(endpoint_url="http://x"), StorageError),
        ("ProfileNotFound", lambda: be.ProfileNotFound(profile="p"), StorageUnavailableError),
        ("aiohttp payload", lambda: aiohttp.ClientPayloadError("cut"), StorageError),
        ("gcs 403", lambda: HttpError({"code": 403, "message": "denied"}), StorageUnavailableError),
        ("gcsfs Forbidden", lambda: OSError("Forbidden: https://storage/b/o\nno access"), StorageUnavailableError),
        ("gcs 412", lambda: HttpError({"code": 412, "message": "precondition"}), CheckpointExistsError),
        ("OSError", lambda: OSError(5, "I/O error"), StorageError),
        ("RuntimeError", lambda: RuntimeError("anything else"), StorageError),
    ]


@pytest.mark.parametrize("case", _backend_errors(), ids=lambda case: case[0])
def test_translate_maps_every_backend_error_into_the_tree(
    case: tuple[str, Callable[[], BaseException], type[CheckpointError]],
) -> None:
    _, make, expected = case
    error = translate(make(), "saving", "s3://bucket/run/ckpt_last_00000001.pt")
    assert type(error) is expected
    assert "saving s3://bucket/run/ckpt_last_00000001.pt failed" in str(error)
