"""Validated storage locations (where a run's checkpoints live) and the typed storage options of each scheme.

Only :mod:`ml_playground.config_loader` builds locations from user text (it resolves relative paths,
parses URLs and checks the options against :mod:`ml_playground.schemes`); everything else receives
them validated. They are plain immutable values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = [
    "GcsOptions",
    "HttpOptions",
    "LocalLocation",
    "Location",
    "NoStorageOptions",
    "RemoteLocation",
    "S3Options",
    "StorageOptions",
]

_STRICT = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class NoStorageOptions(BaseModel):
    """The options of a scheme that takes none (local paths, ``memory://``)."""

    model_config = _STRICT


class GcsOptions(BaseModel):
    """What ``gs://`` takes. ``None`` means the backend's own default; credentials never come from here."""

    model_config = _STRICT

    endpoint_url: str | None = None
    anon: bool = False
    requester_pays: bool = False
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    read_timeout: Annotated[float, Field(gt=0)] = 60.0
    part_size_mib: Annotated[int, Field(ge=5, le=5120)] = 50


class HttpOptions(BaseModel):
    """What ``http(s)://`` takes: how long a connection or a read may wait (urllib's one socket timeout)."""

    model_config = _STRICT

    read_timeout: Annotated[float, Field(gt=0)] = 60.0


class _S3Fields(GcsOptions):
    region: str | None = None
    profile: str | None = None
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: SecretStr | None = None
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    max_concurrency: Annotated[int, Field(ge=1, le=64)] = 4


class S3Options(_S3Fields):
    """What ``s3://`` takes: GCS's options, plus region, profile, encryption, retries and concurrency."""

    @model_validator(mode="after")
    def _kms_key_needs_kms(self) -> S3Options:
        if self.sse_kms_key_id is not None and self.server_side_encryption != "aws:kms":
            raise ValueError("sse_kms_key_id needs server_side_encryption = 'aws:kms'")
        return self


class StorageOptions(_S3Fields):
    """Every option any scheme takes: the type of a config's ``storage_options`` table.

    Which of them a location may set depends on its scheme (:data:`ml_playground.schemes.SCHEMES`);
    the configuration loader refuses the others, so an option is never silently ignored.
    """

    def redacted(self) -> dict[str, object]:
        """The options as plain data with secrets masked: safe for logs and checkpoint configs."""
        data = self.model_dump(mode="python")
        if self.sse_kms_key_id is not None:
            data["sse_kms_key_id"] = "***"
        return data


class LocalLocation(BaseModel):
    """A directory on a local (or locally mounted) filesystem; the path is absolute."""

    model_config = _STRICT

    kind: Literal["local"] = "local"
    path: Path

    @property
    def scheme(self) -> str:
        return "file"

    @property
    def url(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


class RemoteLocation(BaseModel):
    """A prefix in an object store, e.g. ``s3://bucket/runs/a``: ``root`` is ``bucket/runs/a`` (no scheme).

    ``bucket`` is the root's first segment and ``prefix`` the rest; an object ``name`` of the location
    has the key ``key(name)`` in that bucket.

    A URL that names one file (``http(s)://host/dir/file.pt?query``) is the location ``http(s)://host/dir``
    holding the one object ``object_name`` (``file.pt``), read with ``query`` appended. The query is a
    credential (e.g. a presigned URL's signature): it is in no ``url``, no message and no dump.
    """

    model_config = _STRICT

    kind: Literal["remote"] = "remote"
    scheme: str
    root: str
    storage_options: StorageOptions = StorageOptions()
    object_name: str | None = Field(default=None, exclude=True)
    query: SecretStr | None = Field(default=None, exclude=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.root}"

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        return self.root.partition("/")[2]

    def key(self, name: str) -> str:
        """The key of object ``name`` of this location in its bucket."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, name: str) -> str:
        """The URL of object ``name`` of this location."""
        return f"{self.url}/{name}"

    def __str__(self) -> str:
        return self.url


Location = Annotated[LocalLocation | RemoteLocation, Field(discriminator="kind")]
