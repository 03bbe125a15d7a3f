"""The checkpoint library: typed checkpoints, atomic stores, strict rotation. Usable without the trainer.

>>> from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, LocalStore
>>> manager = CheckpointManager(LocalStore(path, create=True), KeepPolicy(last=2, best=1))
>>> manager.save_last(checkpoint); manager.load_latest()
"""

from ml_playground.checkpoint._async import AsyncCheckpointSaver, CheckpointSaver, SyncCheckpointSaver, open_saver
from ml_playground.checkpoint._checkpoint import FORMAT_VERSION, Checkpoint, ModelWeights
from ml_playground.checkpoint._codec import decode, encode
from ml_playground.checkpoint._lease import WriterLease
from ml_playground.checkpoint._manager import CheckpointInfo, CheckpointManager, MetricMode, improves
from ml_playground.checkpoint._naming import CheckpointKind, CheckpointName
from ml_playground.checkpoint._rotation import KeepPolicy, to_delete
from ml_playground.checkpoint._store import CheckpointStore, StoredObject
from ml_playground.checkpoint.stores import FileOps, LocalStore, open_store

__all__ = [
    "FORMAT_VERSION",
    "AsyncCheckpointSaver",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointKind",
    "CheckpointManager",
    "CheckpointName",
    "CheckpointSaver",
    "CheckpointStore",
    "FileOps",
    "KeepPolicy",
    "LocalStore",
    "MetricMode",
    "ModelWeights",
    "StoredObject",
    "SyncCheckpointSaver",
    "WriterLease",
    "decode",
    "encode",
    "improves",
    "open_saver",
    "open_store",
    "to_delete",
]
