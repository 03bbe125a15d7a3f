"""The s3fs filesystem of an ``s3://`` location, built from its typed storage options.

Each store gets its own filesystem instance (``skip_instance_cache``): fsspec otherwise shares one
instance, its listing cache and its transaction between every user of the same arguments. Listing
caches are off, because discovery and rotation must see other processes' writes and deletes.
Credentials are never passed here: they come from the standard chain.
"""

from __future__ import annotations

from typing import Any

from ml_playground.checkpoint.stores._backend import import_backend
from ml_playground.checkpoint.stores._fsspec import READ_BLOCK_SIZE
from ml_playground.locations import RemoteLocation

__all__ = ["make_filesystem"]


def make_filesystem(location: RemoteLocation, *, quick: bool = False) -> Any:
    """A fresh s3fs filesystem for ``location``.

    ``quick``: a short connect timeout and at most two attempts, for the probe when a store is opened,
    so a dead endpoint fails in seconds; the store's own requests keep the configured retries.
    """
    s3fs = import_backend(location)
    options = location.storage_options
    connect_timeout = min(options.connect_timeout, 5.0) if quick else options.connect_timeout
    max_attempts = min(options.max_attempts, 2) if quick else options.max_attempts
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
            "connect_timeout": connect_timeout,
            "read_timeout": options.read_timeout,
            "retries": {"max_attempts": max_attempts, "mode": "standard"},
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
