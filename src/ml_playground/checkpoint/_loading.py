"""Reading one named checkpoint from a store: the whole state, its weights only, or a check of its digests.

Each function picks the fastest way the store offers (a local file by path or memory-mapped, a remote
store's local copy or sparse partial copy, else a stream), decodes through the codec, and checks that
the content matches the file's name. A missing file raises CheckpointNotFoundError; the manager turns
that into "rotated away" where a newer checkpoint of the kind exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ml_playground.checkpoint._checkpoint import Checkpoint, ModelWeights
from ml_playground.checkpoint._codec import Source, decode
from ml_playground.checkpoint._codec import verify as verify_source
from ml_playground.checkpoint._naming import CheckpointName, format_metric
from ml_playground.checkpoint._store import CheckpointStore, LocalCopyStore, LocalPathStore
from ml_playground.checkpoint._weights import MapLocation, read_weights, weights_source
from ml_playground.errors import CheckpointError, CheckpointNotFoundError, CheckpointSchemaError, StorageError

__all__ = ["MapLocation", "load_checkpoint", "load_weights", "verify_checkpoint"]


def load_checkpoint(
    store: CheckpointStore, name: CheckpointName, *, map_location: MapLocation, verify: bool, mmap: bool
) -> Checkpoint:
    source = f"{store.url}/{name.filename}"
    with _source(store, name.filename, mmap) as data:
        checkpoint = decode(data, source=source, map_location=map_location, verify=verify, mmap=mmap)
    _check_matches_name(checkpoint, name, source)
    return checkpoint


def load_weights(
    store: CheckpointStore, name: CheckpointName, *, map_location: MapLocation, verify: bool
) -> ModelWeights:
    source = f"{store.url}/{name.filename}"
    try:
        with weights_source(store, name.filename) as copy:
            if copy is None:  # no partial reads here: the whole file it is
                checkpoint = load_checkpoint(store, name, map_location=map_location, verify=verify, mmap=False)
                return ModelWeights.of(checkpoint)
            weights = read_weights(copy, source=source, map_location=map_location, verify=verify)
    except FileNotFoundError:  # a local file rotated away while it was being read
        raise CheckpointNotFoundError(f"no checkpoint {source}") from None
    except CheckpointError:
        raise
    except OSError as exc:  # reading the local file: permissions, I/O errors
        raise StorageError(f"cannot read {source}: {exc.strerror or exc}") from None
    _check_matches_name(weights, name, source)
    return weights


def verify_checkpoint(store: CheckpointStore, name: CheckpointName) -> None:
    with _source(store, name.filename, False) as data:
        verify_source(data, source=f"{store.url}/{name.filename}")


@contextlib.contextmanager
def _source(store: CheckpointStore, filename: str, mmap: bool) -> Iterator[Source]:
    # torch.load reads a path with its own reader, faster than through a Python stream.
    if isinstance(store, LocalPathStore):
        yield store.local_path(filename)
    elif mmap:
        raise CheckpointError(f"{store.url} is not a local location; mmap loading needs local files")
    else:
        # A remote store's local copy (concurrent ranged GETs, deleted after the load) beats
        # torch.load over a remote stream; the tensors are still read into anonymous memory.
        with contextlib.ExitStack() as stack:
            copy = stack.enter_context(store.local_copy(filename)) if isinstance(store, LocalCopyStore) else None
            yield copy if copy is not None else stack.enter_context(store.open(filename))


def _check_matches_name(checkpoint: Checkpoint | ModelWeights, name: CheckpointName, source: str) -> None:
    if checkpoint.iter_num != name.iter_num:
        raise CheckpointSchemaError(
            f"{source} holds iteration {checkpoint.iter_num}, but its name says {name.iter_num}; "
            "it was renamed or damaged"
        )
    if name.metric is not None and format_metric(checkpoint.best_val_loss) != format_metric(name.metric):
        raise CheckpointSchemaError(
            f"{source} holds metric {format_metric(checkpoint.best_val_loss)}, but its name says "
            f"{format_metric(name.metric)}; it was renamed or damaged"
        )
