"""Remote locations at config time: a scheme whose backend is missing names the pip extra to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ml_playground.checkpoint import open_store
from ml_playground.config_loader import parse_location
from ml_playground.errors import ConfigError, MissingExtraError
from ml_playground.locations import RemoteLocation, StorageOptions


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [("s3://bucket/run", "s3fs", "s3"), ("gs://bucket/run", "gcsfs", "gcs"), ("gcs://bucket/run", "gcsfs", "gcs")],
)
def test_missing_backend_names_the_extra_at_config_load(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package looks like
    with pytest.raises(MissingExtraError, match=rf"pip install 'ml_playground\[{extra}\]'"):
        parse_location(url, base_dir=Path.cwd())


@pytest.mark.parametrize(("scheme", "module", "extra"), [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs")])
def test_missing_backend_names_the_extra_when_a_store_is_opened(
    monkeypatch: pytest.MonkeyPatch, scheme: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=rf"ml_playground\[{extra}\]"):
        open_store(RemoteLocation(scheme=scheme, root="bucket/run"))


@pytest.mark.parametrize("url", ["ftp://host/run", "s3://", "s3:///run", "gs://Bad_Bucket/run"])
def test_invalid_remote_urls_fail_at_config_load(url: str) -> None:
    with pytest.raises(ConfigError, match="://"):
        parse_location(url, base_dir=Path.cwd())


@pytest.mark.parametrize(
    ("scheme", "option", "value"),
    [
        ("gs", "max_attempts", 3),
        ("gs", "region", "eu"),
        ("gs", "server_side_encryption", "AES256"),
        ("memory", "anon", True),
    ],
)
def test_storage_options_a_backend_would_ignore_are_refused(scheme: str, option: str, value: object) -> None:
    location = RemoteLocation(scheme=scheme, root="bucket/run", storage_options=StorageOptions(**{option: value}))
    with pytest.raises(ConfigError, match=option):
        open_store(location)


def test_kms_key_without_kms_encryption_is_refused() -> None:
    options = StorageOptions(sse_kms_key_id="key", server_side_encryption="AES256")
    with pytest.raises(ConfigError, match="sse_kms_key_id"):
        open_store(RemoteLocation(scheme="s3", root="bucket/run", storage_options=options))
