"""Validated storage locations: where a run's checkpoints live.

Only :mod:`ml_playground.config_loader` builds these from user text (it resolves relative paths and
parses URLs); everything else receives them already validated. They are plain immutable values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["LocalLocation", "Location", "RemoteLocation", "StorageOptions"]

_STRICT = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class StorageOptions(BaseModel):
    """Typed options for an object store; credentials come from the standard chain, never from here.

    ``None`` means "the backend's own default" (environment, profile, instance role).
    """

    model_config = _STRICT

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    anon: bool = False
    requester_pays: bool = False
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: SecretStr | None = None
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    read_timeout: Annotated[float, Field(gt=0)] = 60.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    part_size_mib: Annotated[int, Field(ge=5, le=5120)] = 50
    max_concurrency: Annotated[int, Field(ge=1, le=64)] = 4

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

    def __str__(self) -> str:
        return str(self.path)

    def child(self, name: str) -> str:
        return str(self.path / name)


class RemoteLocation(BaseModel):
    """A prefix in an fsspec-backed store, e.g. ``s3://bucket/runs/a``; ``root`` has no scheme."""

    model_config = _STRICT

    kind: Literal["remote"] = "remote"
    scheme: str
    root: str
    storage_options: StorageOptions = StorageOptions()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.root}"

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def __str__(self) -> str:
        return self.url

    def child(self, name: str) -> str:
        return f"{self.url}/{name}"


Location = Annotated[LocalLocation | RemoteLocation, Field(discriminator="kind")]
