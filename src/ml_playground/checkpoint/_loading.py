"""Reading one named checkpoint from a store: the whole state, its weights only, or a check of its digests.

Each function picks the fastest way the store's capabilities offer (a local file by path or
memory-mapped, a remote store's local copy or sparse partial copy, else a stream), decodes through the
format, and checks that the content matches the file's name. A missing file raises
CheckpointNotFoundError; the manager turns that into "rotated away" where a newer checkpoint of the kind
exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from ml_playground.checkpoint._checkpoint import Checkpoint, ModelWeights
from ml_playground.checkpoint._naming import CheckpointName, format_metric
from ml_playground.checkpoint._store import CheckpointStore, PartialCopy
from ml_playground.checkpoint.format import MapLocation, Source, decode, read_weights
from ml_playground.checkpoint.format import verify as verify_source
from ml_playground.errors import CheckpointError, CheckpointNotFoundError, CheckpointSchemaError, StorageError

__all__ = ["load_checkpoint", "load_manifest", "load_weights", "verify_checkpoint"]


def load_checkpoint(
    store: CheckpointStore,
    filename: str,
    name: CheckpointName | None,
    *,
    map_location: MapLocation,
    verify: bool,
    mmap: bool,
) -> Checkpoint:
    """Load ``filename``; with ``name`` (its parsed checkpoint name) its content must match that name."""
    source = f"{store.url}/{filename}"
    with _source(store, filename, mmap) as data:
        checkpoint = decode(data, source=source, map_location=map_location, verify=verify, mmap=mmap)
    _check_matches_name(checkpoint, name, source)
    if checkpoint.shards is None:
        return checkpoint
    # imported here: torch.distributed.checkpoint costs half a second, and only sharded checkpoints need it
    from ml_playground.checkpoint.sharded import assembled

    return assembled(store, checkpoint, filename, map_location)


def load_manifest(store: CheckpointStore, filename: str, name: CheckpointName | None) -> Checkpoint:
    """The manifest of a sharded checkpoint as stored (no tensors); a single file raises."""
    source = f"{store.url}/{filename}"
    with _source(store, filename, False) as data:
        checkpoint = decode(data, source=source)
    _check_matches_name(checkpoint, name, source)
    if checkpoint.shards is None:
        raise CheckpointSchemaError(f"{source} is a single-file checkpoint, not a sharded one")
    return checkpoint


def load_weights(
    store: CheckpointStore, filename: str, name: CheckpointName | None, *, map_location: MapLocation, verify: bool
) -> ModelWeights:
    """The model and EMA weights of ``filename``; from a remote store only their bytes are fetched."""
    source = f"{store.url}/{filename}"
    try:
        with _weights_source(store, filename) as copy:
            if copy is None:  # no partial reads here: the whole file it is
                checkpoint = load_checkpoint(
                    store, filename, name, map_location=map_location, verify=verify, mmap=False
                )
                return ModelWeights.of(checkpoint)
            weights = read_weights(copy, source=source, map_location=map_location, verify=verify)
    except FileNotFoundError:  # a local file rotated away while it was being read
        raise CheckpointNotFoundError(f"no checkpoint {source}") from None
    except CheckpointError:
        raise
    except OSError as exc:  # reading the local file: permissions, I/O errors
        raise StorageError(f"cannot read {source}: {exc.strerror or exc}") from None
    _check_matches_name(weights, name, source)
    if weights.shards is None:
        return weights
    from ml_playground.checkpoint.sharded import assembled_weights  # see load_checkpoint

    return assembled_weights(store, weights, filename, map_location)


def verify_checkpoint(store: CheckpointStore, filename: str) -> None:
    source = f"{store.url}/{filename}"
    with _source(store, filename, False) as data:
        shards = verify_source(data, source=source)
    if shards is not None:
        from ml_playground.checkpoint.sharded import verify_parts  # see load_checkpoint

        verify_parts(store, shards, filename)


@contextlib.contextmanager
def _source(store: CheckpointStore, filename: str, mmap: bool) -> Iterator[Source]:
    # torch.load reads a path with its own reader, faster than through a Python stream.
    capabilities = store.capabilities
    if capabilities.local_path is not None:
        yield capabilities.local_path(filename)
    elif mmap:
        raise CheckpointError(f"{store.url} is not a local location; mmap loading needs local files")
    else:
        # A remote store's local copy (concurrent ranged GETs, deleted after the load) beats
        # torch.load over a remote stream; the tensors are still read into anonymous memory.
        with contextlib.ExitStack() as stack:
            local_copy = capabilities.local_copy
            copy = stack.enter_context(local_copy(filename)) if local_copy is not None else None
            yield copy if copy is not None else stack.enter_context(store.open(filename))


class _LocalFile:
    """A local store's committed file: every byte is already there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size

    def fetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        pass


@contextlib.contextmanager
def _weights_source(store: CheckpointStore, filename: str) -> Iterator[PartialCopy | None]:
    """The file a weights-only load reads: a local store's own file, or a remote store's sparse copy.

    None when the store has neither (or no room for a copy): the caller then loads the whole checkpoint.
    """
    capabilities = store.capabilities
    if capabilities.local_path is not None:
        yield _LocalFile(capabilities.local_path(filename))
    elif capabilities.partial_copy is not None:
        with capabilities.partial_copy(filename) as copy:
            yield copy
    else:
        yield None


def _check_matches_name(checkpoint: Checkpoint | ModelWeights, name: CheckpointName | None, source: str) -> None:
    if name is None:  # a copy under another name (e.g. model.pt): its digests are all there is to check
        return
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
