"""The checkpoint library: typed checkpoints, atomic stores, strict rotation. Usable without the trainer.

>>> from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, LocalStore
>>> manager = CheckpointManager(LocalStore(path, create=True), KeepPolicy(last=2, best=1))
>>> manager.save_last(checkpoint); manager.load_latest()

Layout: ``format`` (the file format: encode, decode, verify, weights-only reads), ``stores`` (one module
per backend, chosen through :mod:`ml_playground.schemes`), and beside them the typed values, names,
rotation, the manager and the savers.
"""

from ml_playground.checkpoint._async import AsyncCheckpointSaver, CheckpointSaver, SyncCheckpointSaver, open_saver
from ml_playground.checkpoint._checkpoint import Checkpoint, ModelWeights
from ml_playground.checkpoint._discovery import Discovered, discover
from ml_playground.checkpoint._lease import Lease, LeaseState
from ml_playground.checkpoint._manager import CheckpointManager
from ml_playground.checkpoint._naming import CHECKPOINT_PREFIX, CheckpointInfo, CheckpointKind, CheckpointName
from ml_playground.checkpoint._rotation import KeepPolicy, MetricMode, improves, to_delete
from ml_playground.checkpoint._store import Capabilities, CheckpointStore, StoredObject
from ml_playground.checkpoint.format import FORMAT_VERSION, decode, encode
from ml_playground.checkpoint.stores import FileOps, LocalStore, WriterLease, open_store

__all__ = [
    "CHECKPOINT_PREFIX",
    "FORMAT_VERSION",
    "AsyncCheckpointSaver",
    "Capabilities",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointKind",
    "CheckpointManager",
    "CheckpointName",
    "CheckpointSaver",
    "CheckpointStore",
    "Discovered",
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
