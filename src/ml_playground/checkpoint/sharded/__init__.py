"""Sharded checkpoints (FSDP2) through torch.distributed.checkpoint (DCP), over any CheckpointStore.

torch.distributed.checkpoint plans, gathers and reshards; our StorageWriter and StorageReader put the bytes
in the store (docs/distributed.md, "Sharded checkpoints"):

- :func:`save` (every rank): each rank's parts, each an atomic object of its own, then on rank 0 the manifest,
  atomic and never replacing a name: the checkpoint exists if and only if its manifest does. A save that
  fails on any rank fails on every rank (the same error), and every rank deletes the parts it committed
  (unless the manifest did commit: then the checkpoint is whole).
- :func:`save_async`: the same in DCP's background thread, on a process group of its own; the returned
  :class:`PendingSave` gives the outcome (and cleans up after a failure) when waited for.
- :func:`load_into` (every rank): the state of a checkpoint, resharded to this run's world size, every item
  verified against its digest.
- :func:`assembled` / :func:`assembled_weights` / :func:`verify_parts` (one process, no torch.distributed):
  what the manager's loads and ``verify`` return for a sharded checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.api import CheckpointException

from ml_playground import errors
from ml_playground.checkpoint._store import CheckpointStore
from ml_playground.checkpoint.sharded._assemble import (
    assemble,
    assembled,
    assembled_weights,
    torch_optimizer_state,
    verify_parts,
)
from ml_playground.checkpoint.sharded._index import STRATEGY, ShardIndex
from ml_playground.checkpoint.sharded._reader import SafeLoadPlanner, StoreReader
from ml_playground.checkpoint.sharded._writer import ManifestFactory, StoreWriter
from ml_playground.errors import CheckpointError, MLPlaygroundError

__all__ = [
    "STRATEGY",
    "ManifestFactory",
    "PendingSave",
    "ShardIndex",
    "assemble",
    "assembled",
    "assembled_weights",
    "load_into",
    "save",
    "save_async",
    "torch_optimizer_state",
    "verify_parts",
]

logger = logging.getLogger(__name__)


def save(
    store: CheckpointStore,
    name: str,
    state: dict[str, Any],
    *,
    manifest: ManifestFactory | None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[str, ...]:
    """Save ``state`` (``{"model": ..., "optim": ..., "ema": ...}``, sharded DTensors) as checkpoint ``name``.

    Every rank calls it; rank 0 passes ``manifest`` (what the manifest records besides the shards) and gets
    back the names of the checkpoint's parts (other ranks: an empty tuple).
    """
    writer = StoreWriter(store, name, manifest)
    with _failures(store, name, writer), _quiet():
        state_dict_saver.save(state, storage_writer=writer, process_group=process_group)
    return writer.committed


class PendingSave:
    """An asynchronous sharded save in flight; :meth:`wait` gives its outcome, :meth:`after_commit` what the
    ``on_commit`` action (e.g. rotation, on the coordinator) run right after the manifest committed gave."""

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        store: CheckpointStore,
        name: str,
        writer: StoreWriter,
        on_commit: Callable[[tuple[str, ...]], object] | None,
    ) -> None:
        self._future = future
        self._store = store
        self.name = name
        self._writer = writer
        self._on_commit = on_commit
        self._after: concurrent.futures.Future[None] = concurrent.futures.Future()
        future.add_done_callback(self._then)  # in DCP's background thread: the action stays in the background

    def wait(self, timeout: float | None = None) -> tuple[str, ...]:
        """Block until the save has committed (then: as :func:`save` returns) or failed (then raise, the same
        error on every rank, once the failed save's parts are deleted)."""
        with _failures(self._store, self.name, self._writer):
            self._future.result(timeout=timeout)
        return self._writer.committed

    def after_commit(self, timeout: float | None = None) -> None:
        """Wait for the ``on_commit`` action; raise its error (None when the save failed or there was none)."""
        self._after.result(timeout=timeout)

    def _then(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            if self._on_commit is not None and not future.cancelled() and future.exception() is None:
                self._on_commit(self._writer.committed)
        except BaseException as exc:  # raised by after_commit(): never lost in this thread
            self._after.set_exception(exc)
        else:
            self._after.set_result(None)


def save_async(
    store: CheckpointStore,
    name: str,
    state: dict[str, Any],
    *,
    manifest: ManifestFactory | None,
    process_group: dist.ProcessGroup,
    on_commit: Callable[[tuple[str, ...]], object] | None = None,
) -> PendingSave:
    """Stage ``state`` (a copy in CPU memory: the only stall) and save it in DCP's background thread.

    ``process_group`` must be one of its own: the background collectives would otherwise interleave with
    training's. ``on_commit`` (the coordinator's) runs in the background once the manifest has committed,
    with the parts' names.
    """
    writer = StoreWriter(store, name, manifest)
    with _failures(store, name, writer), _quiet():
        future = state_dict_saver.async_save(state, storage_writer=writer, process_group=process_group)
    assert isinstance(future, concurrent.futures.Future)
    return PendingSave(future, store, name, writer, on_commit)


def load_into(
    store: CheckpointStore,
    filename: str,
    index: ShardIndex,
    state: dict[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Fill ``state`` (this run's sharded templates) from checkpoint ``filename``, whose manifest gave ``index``."""
    reader = StoreReader(store, index)
    with _failures(store, filename, None), _quiet():
        state_dict_loader.load(state, storage_reader=reader, planner=SafeLoadPlanner(), process_group=process_group)


@contextlib.contextmanager
def _failures(store: CheckpointStore, name: str, writer: StoreWriter | None) -> Iterator[None]:
    """DCP's CheckpointException (a BaseException, raised on every rank) as the failing rank's own error;
    a failed save's committed parts deleted."""
    try:
        yield
    except BaseException as exc:
        if writer is not None:
            _delete_parts(store, name, writer.written)
        if not isinstance(exc, CheckpointException):
            raise
        rank, (cause, _) = sorted(exc.failures.items())[0]
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise _rebuilt(cause, rank, f"{store.url}/{name}") from None


def _rebuilt(cause: BaseException, rank: int, where: str) -> MLPlaygroundError:
    """The error rank ``rank`` raised, as that rank raised it (the same class and message on every rank)."""
    if isinstance(cause, MLPlaygroundError):
        return cause
    named = getattr(errors, type(cause).__name__, None)
    if isinstance(named, type) and issubclass(named, MLPlaygroundError):
        return named(str(cause))
    return CheckpointError(f"the sharded checkpoint {where} failed on rank {rank}: {type(cause).__name__}: {cause}")


def _delete_parts(store: CheckpointStore, name: str, parts: list[str]) -> None:
    """After a failed save: this rank's parts, unless the manifest committed after all (then they are its)."""
    if not parts or _exists(store, name):
        return
    for part in parts:
        try:
            store.delete(part)
        except errors.CheckpointNotFoundError:
            pass
        except CheckpointError as exc:  # a leftover: the next writer removes it (docs/distributed.md)
            logger.warning("could not delete %s/%s after the failed save: %s", store.url, part, exc)


def _exists(store: CheckpointStore, name: str) -> bool:
    try:
        return any(obj.name == name for obj in store.list())
    except CheckpointError:
        return True  # unknown: keep the parts (a leftover at worst, removed by the next writer)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP's warnings about what we do on purpose never reach the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint\.")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint\.")
        yield
