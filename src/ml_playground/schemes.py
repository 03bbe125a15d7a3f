"""Every kind of location the package reads or writes, in one table of plain data.

Both sides import it and neither imports the other: :mod:`ml_playground.config_loader` parses a path
or URL and validates it (bucket, storage options, installed backend) against its scheme's entry;
:func:`ml_playground.checkpoint.open_store` builds the entry's store class. The class is a dotted path
imported only when a store is opened, so loading a configuration never loads a backend.

Adding a backend is one entry here and one store module (docs/architecture.md, "Adding a backend").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pydantic import BaseModel, ValidationError

from ml_playground.locations import GcsOptions, HttpOptions, NoStorageOptions, S3Options

__all__ = ["LOCAL_SCHEME", "SCHEMES", "BucketRule", "Scheme"]

LOCAL_SCHEME = "file"
"""The scheme of local paths (written as plain paths or ``file://`` URLs)."""


@dataclass(frozen=True)
class BucketRule:
    """The first segment of such a URL's path is a bucket whose name must match ``pattern``."""

    pattern: re.Pattern[str]
    description: str


@dataclass(frozen=True)
class Scheme:
    """One kind of location.

    - ``store``: ``"module:Class"`` of its :class:`~ml_playground.checkpoint.CheckpointStore`, which has a
      ``from_location(location, *, create)`` class method.
    - ``options``: the storage options it takes; setting any other is a configuration error.
    - ``requires`` / ``extra``: the module its store needs, and the pip extra that installs it.
    - ``bucket``: how its URLs name a bucket (None: no bucket, e.g. ``memory://``).
    - ``single_file``: its URLs are read-only and name one checkpoint file (``http(s)://``): never a run
      location, an ``out_dir`` or a destination; the URL's query is kept as a secret of the location.
    """

    name: str
    store: str
    options: type[BaseModel]
    requires: str | None = None
    extra: str | None = None
    bucket: BucketRule | None = None
    single_file: bool = False

    def refuses(self, options: Mapping[str, object]) -> str | None:
        """Why the storage options set (``options``, a raw table) do not suit this scheme; None if they do."""
        try:
            self.options.model_validate(options)
        except ValidationError as exc:
            unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden")
            problems = [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors() if e["loc"] == ()]
            if unknown:
                problems.insert(
                    0, f"storage option(s) {', '.join(unknown)} do not apply to {self.name}:// ({self.takes})"
                )
            return "; ".join(problems) or str(exc)
        return None

    @property
    def takes(self) -> str:
        """Which storage options this scheme takes, for messages."""
        taken = sorted(self.options.model_fields)
        return f"{self.name}:// takes {', '.join(taken) if taken else 'none'}"


_S3_BUCKET = BucketRule(
    re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"), "lowercase letters, digits, '.', '-'; 3 to 63 characters"
)
_GCS_BUCKET = BucketRule(
    re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
    "lowercase letters, digits, '.', '-', '_'; 3 to 222 characters",
)
_STORES = "ml_playground.checkpoint.stores"


def _gcs(name: str) -> Scheme:
    return Scheme(name, f"{_STORES}.gcs:GcsStore", GcsOptions, "gcsfs", "gcs", _GCS_BUCKET)


def _http(name: str) -> Scheme:  # the standard library's urllib: no extra to install
    return Scheme(name, f"{_STORES}.http:HttpStore", HttpOptions, single_file=True)


SCHEMES: Mapping[str, Scheme] = MappingProxyType(
    {
        LOCAL_SCHEME: Scheme(LOCAL_SCHEME, f"{_STORES}.local:LocalStore", NoStorageOptions),
        "s3": Scheme("s3", f"{_STORES}.s3:S3Store", S3Options, "s3fs", "s3", _S3_BUCKET),
        "gs": _gcs("gs"),
        "gcs": _gcs("gcs"),
        "memory": Scheme("memory", f"{_STORES}.memory:MemoryStore", NoStorageOptions),
        "http": _http("http"),
        "https": _http("https"),
    }
)
