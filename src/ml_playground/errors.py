"""The one exception tree of ml_playground.

    MLPlaygroundError
    ├── ConfigError                      bad configuration: unknown key, wrong type, bad URL (CLI exit 2)
    │   └── MissingExtraError            a URL scheme whose fsspec backend is not installed
    ├── DistributedError                 the ranks of a torchrun run cannot work together (a rank is gone,
    │                                    a collective timed out) (CLI exit 1)
    └── CheckpointError                  anything about a checkpoint or its storage (CLI exit 1)
        ├── CheckpointNotFoundError      (also FileNotFoundError) no such checkpoint / no checkpoint of a kind
        │   └── CheckpointRotatedAwayError   the named checkpoint was deleted by rotation
        ├── CheckpointExistsError        (also FileExistsError) a checkpoint name is never overwritten
        ├── CheckpointCorruptError       checksum mismatch, truncated or unreadable file
        ├── CheckpointSchemaError        readable, but a field is missing, of a wrong type, or disagrees
        ├── CheckpointVersionError       written by a newer format version than this package reads
        ├── UnsafeCheckpointError        the file holds something other than tensors and plain data
        ├── CheckpointNameError          (also ValueError) a ``ckpt_`` name that does not parse, a name that
        │                                cannot be made, an invalid object name
        ├── StorageError                 the store failed (I/O error, network fault, denied access)
        │   └── StorageUnavailableError  the location cannot be used at all (missing bucket, no credentials)
        └── LocationLockedError          another live writer holds the run location

Every error carries the path or URL it is about in its message, and says what to do where there is
something to do.
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNameError",
    "CheckpointNotFoundError",
    "CheckpointRotatedAwayError",
    "CheckpointSchemaError",
    "CheckpointVersionError",
    "ConfigError",
    "DistributedError",
    "LocationLockedError",
    "MLPlaygroundError",
    "MissingExtraError",
    "StorageError",
    "StorageUnavailableError",
    "UnsafeCheckpointError",
]


class MLPlaygroundError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(MLPlaygroundError, ValueError):
    """The configuration (files, ``--set`` overrides or a location string) is invalid."""


class MissingExtraError(ConfigError):
    """A location needs an optional dependency that is not installed."""


class DistributedError(MLPlaygroundError):
    """The processes of a torchrun run could not work together: a rank is gone, or a collective timed out."""


class CheckpointError(MLPlaygroundError):
    """A checkpoint could not be written, found, read or trusted."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint (or any checkpoint of the asked kind) does not exist."""


class CheckpointRotatedAwayError(CheckpointNotFoundError):
    """The checkpoint existed when it was listed but rotation deleted it before it was read."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint with this name is already committed; names are never overwritten."""


class CheckpointCorruptError(CheckpointError):
    """The bytes are damaged: truncated, unreadable, or a checksum does not match."""


class CheckpointSchemaError(CheckpointError):
    """The file reads, but its content is not a valid checkpoint (missing field, wrong type, mismatch)."""


class CheckpointVersionError(CheckpointError):
    """The file was written by a newer format version than this package can read."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds objects other than tensors and plain data; it is refused, never unpickled."""


class CheckpointNameError(CheckpointError, ValueError):
    """A file name looks like a checkpoint but does not parse, a valid name cannot be formed, or an
    object name is not one a store can hold."""


class StorageError(CheckpointError):
    """The storage backend failed an operation."""


class StorageUnavailableError(StorageError):
    """The location cannot be used: missing bucket, denied access, unreachable endpoint, read-only."""


class LocationLockedError(CheckpointError):
    """Another live writer holds the run location."""
