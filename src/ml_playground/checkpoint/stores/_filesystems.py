"""Build the fsspec filesystem for a validated remote location from its typed ``StorageOptions``.

Each store gets its own filesystem instance (``skip_instance_cache``): fsspec otherwise shares one
instance, its listing cache and its transaction between every user of the same arguments. Listing
caches are off, because discovery and rotation must see other processes' writes and deletes.
Credentials are never passed here: they come from the backend's standard chain.
"""

from __future__ import annotations

import importlib
from typing import Any

from ml_playground.errors import ConfigError, MissingExtraError
from ml_playground.locations import RemoteLocation, StorageOptions

__all__ = ["READ_BLOCK_SIZE", "make_filesystem"]

READ_BLOCK_SIZE = 16 * 2**20
"""Bytes fetched per ranged GET when reading: bounds a reader's memory, amortises request latency."""

# the options each scheme understands; any other explicitly set option is an error, never ignored
_TIMEOUTS = {"connect_timeout", "read_timeout"}
_APPLICABLE: dict[str, set[str]] = {
    "s3": {
        "endpoint_url",
        "region",
        "profile",
        "anon",
        "requester_pays",
        "server_side_encryption",
        "sse_kms_key_id",
        "part_size_mib",
        "max_concurrency",
        "max_attempts",
        *_TIMEOUTS,
    },
    # gcsfs's retry count is fixed (6); it has no per-request concurrency or region
    "gs": {"endpoint_url", "anon", "requester_pays", "part_size_mib", *_TIMEOUTS},
    "memory": set(),
}
_APPLICABLE["gcs"] = _APPLICABLE["gs"]
_EXTRA = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def make_filesystem(location: RemoteLocation) -> Any:
    """A fresh fsspec filesystem for ``location``; unknown schemes and inapplicable options raise ConfigError."""
    scheme = location.scheme
    if scheme not in _APPLICABLE:
        raise ConfigError(f"{location.url}: no checkpoint store for scheme {scheme!r}; use s3://, gs:// or memory://")
    options = location.storage_options
    _check_applicable(location, options)
    if scheme == "s3":
        return _s3(location, options)
    if scheme in ("gs", "gcs"):
        return _gcs(location, options)
    from fsspec.implementations.memory import MemoryFileSystem

    return MemoryFileSystem(skip_instance_cache=True)


def _check_applicable(location: RemoteLocation, options: StorageOptions) -> None:
    allowed = _APPLICABLE[location.scheme]
    wrong = sorted(options.model_fields_set - allowed)
    if wrong:
        raise ConfigError(
            f"{location.url}: storage option(s) {', '.join(wrong)} do not apply to {location.scheme}:// "
            f"(it understands: {', '.join(sorted(allowed)) or 'none'})"
        )
    if options.sse_kms_key_id is not None and options.server_side_encryption != "aws:kms":
        raise ConfigError(f"{location.url}: sse_kms_key_id needs server_side_encryption = 'aws:kms'")


def _import_backend(scheme: str, url: str) -> Any:
    module, extra = _EXTRA[scheme]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{url!r} needs the {module} package, which is not installed; "
            f"install it with: pip install 'ml_playground[{extra}]'"
        ) from None


def _s3(location: RemoteLocation, options: StorageOptions) -> Any:
    s3fs = _import_backend("s3", location.url)
    additional: dict[str, str] = {}
    if options.server_side_encryption is not None:
        additional["ServerSideEncryption"] = options.server_side_encryption
    if options.sse_kms_key_id is not None:
        additional["SSEKMSKeyId"] = options.sse_kms_key_id.get_secret_value()
    kwargs: dict[str, Any] = {}
    if options.profile is not None:
        kwargs["profile"] = options.profile
    fs = s3fs.S3FileSystem(
        anon=options.anon,
        endpoint_url=options.endpoint_url,
        requester_pays=options.requester_pays,
        client_kwargs={"region_name": options.region} if options.region else {},
        config_kwargs={
            "connect_timeout": options.connect_timeout,
            "read_timeout": options.read_timeout,
            "retries": {"max_attempts": options.max_attempts, "mode": "standard"},
        },
        s3_additional_kwargs=additional,
        default_block_size=READ_BLOCK_SIZE,
        max_concurrency=options.max_concurrency,
        skip_instance_cache=True,
        use_listings_cache=False,
        **kwargs,
    )
    # botocore's standard retry mode already retries each request max_attempts times with backoff;
    # s3fs's own loop around it would multiply that, so a dead endpoint would take minutes to report.
    fs.retries = 1
    return fs


def _gcs(location: RemoteLocation, options: StorageOptions) -> Any:
    gcsfs = _import_backend(location.scheme, location.url)
    return gcsfs.GCSFileSystem(
        token="anon" if options.anon else None,
        endpoint_url=options.endpoint_url,
        requester_pays=options.requester_pays,
        requests_timeout=options.connect_timeout + options.read_timeout,
        timeout=options.connect_timeout + options.read_timeout,
        block_size=options.part_size_mib * 2**20,
        skip_instance_cache=True,
        use_listings_cache=False,
    )
