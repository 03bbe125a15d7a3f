"""The exported names are the public contract: changing them is a deliberate, visible act."""

from __future__ import annotations

import ml_playground
import ml_playground.checkpoint
import ml_playground.errors


def test_checkpoint_exports() -> None:
    assert sorted(ml_playground.checkpoint.__all__) == [
        "AsyncCheckpointSaver",
        "CHECKPOINT_PREFIX",
        "Capabilities",
        "Checkpoint",
        "CheckpointInfo",
        "CheckpointKind",
        "CheckpointManager",
        "CheckpointName",
        "CheckpointSaver",
        "CheckpointStore",
        "Discovered",
        "FORMAT_VERSION",
        "FileOps",
        "KeepPolicy",
        "Lease",
        "LeaseState",
        "LocalStore",
        "MetricMode",
        "ModelWeights",
        "StoredObject",
        "SyncCheckpointSaver",
        "WriterLease",
        "decode",
        "discover",
        "encode",
        "improves",
        "open_saver",
        "open_store",
        "to_delete",
    ]
    for name in ml_playground.checkpoint.__all__:
        assert hasattr(ml_playground.checkpoint, name), name


def test_one_exception_root() -> None:
    for name in ml_playground.errors.__all__:
        error = getattr(ml_playground.errors, name)
        assert issubclass(error, ml_playground.MLPlaygroundError), name


def test_not_found_and_exists_are_also_builtin_kinds() -> None:
    assert issubclass(ml_playground.errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(ml_playground.errors.CheckpointExistsError, FileExistsError)
