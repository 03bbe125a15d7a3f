"""Asynchronous saves: training resumes once the state is copied to CPU memory; the write runs in a thread.

Rules (each tested in tests/test_async_save.py):

- ``save_last``/``save_best`` return once the checkpoint is snapshotted (every tensor copied to CPU, plain
  data deep-copied), so the caller may keep training and mutate its tensors right away.
- At most one save is in flight: the next save first waits for the previous one (also after a Ctrl-C
  interrupted an earlier wait: the save stays recorded as in flight until its thread is done). The saver keeps one
  snapshot (1x the checkpoint) in CPU memory besides the live state, and copies the next save into it
  (same keys, shapes, dtypes), so a save after the first allocates nothing. ``close()`` releases it.
- Write and rotation run in the background through :class:`CheckpointManager`, which rotates only
  after the new file is committed.
- An error in the background is raised by the next call (``save_*``, ``wait``, ``close`` or leaving the
  ``with`` block); it is never dropped. If the process exits without ``close()``, the in-flight save is
  still completed (the writer thread is not a daemon), and a failure is logged at exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar

import torch

from ml_playground.checkpoint._checkpoint import Checkpoint
from ml_playground.checkpoint._manager import CheckpointManager
from ml_playground.checkpoint._naming import CheckpointKind, CheckpointName
from ml_playground.checkpoint._tree import map_tensors, walk
from ml_playground.errors import CheckpointError

__all__ = ["AsyncCheckpointSaver", "CheckpointSaver", "SyncCheckpointSaver", "open_saver", "snapshot"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class CheckpointSaver(Protocol):
    """What a training loop saves through: synchronous or asynchronous, the same calls."""

    def save_last(self, checkpoint: Checkpoint) -> CheckpointName | None: ...

    def save_best(self, checkpoint: Checkpoint) -> CheckpointName | None: ...

    def wait(self) -> None: ...

    def close(self) -> None: ...


class SyncCheckpointSaver:
    """Saves in the caller's thread: a save has committed (and rotated) when the call returns."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager

    def save_last(self, checkpoint: Checkpoint) -> CheckpointName | None:
        return self.manager.save_last(checkpoint)

    def save_best(self, checkpoint: Checkpoint) -> CheckpointName | None:
        return self.manager.save_best(checkpoint)

    def wait(self) -> None:
        """Nothing is ever in flight."""

    def close(self) -> None:
        """Nothing to release."""


def open_saver(manager: CheckpointManager, *, async_save: bool) -> CheckpointSaver:
    """The saver ``train.runtime.checkpointing.async_save`` asks for."""
    return AsyncCheckpointSaver(manager) if async_save else SyncCheckpointSaver(manager)


def snapshot(checkpoint: Checkpoint, *, into: Checkpoint | None = None) -> Checkpoint:
    """A copy of ``checkpoint`` that shares no memory with it: tensors copied to CPU, containers rebuilt.

    ``into``, a previous snapshot nobody uses any more, lends its tensors: where a tensor's key, shape,
    dtype and layout match, the new bytes are copied into it instead of into fresh memory. Fresh memory
    costs a page fault per page on first touch (slow on VMs: docs/performance.md); reused memory does not.
    """
    old = into
    # replace(): every field not named here (iteration, metric, world size...) is carried over as it is
    return dataclasses.replace(
        checkpoint,
        model=_copy(checkpoint.model, old.model if old else None),
        optimizer=_copy(checkpoint.optimizer, old.optimizer if old else None),
        model_args=_copy(checkpoint.model_args, None),
        config=_copy(checkpoint.config, None),
        ema=None if checkpoint.ema is None else _copy(checkpoint.ema, old.ema if old else None),
        rng_state=_copy(checkpoint.rng_state, old.rng_state if old else None),
        data_state=_copy(checkpoint.data_state, None),
        shards=_copy(checkpoint.shards, None),
    )


def _copy(tree: Any, spare: Any) -> Any:
    spares = {node.keys: node.value for node in walk(spare) if isinstance(node.value, torch.Tensor)}

    def copied(tensor: torch.Tensor, keys: tuple[object, ...]) -> torch.Tensor:
        tensor = tensor.detach()
        target = spares.get(keys)
        if (
            target is not None
            and target.shape == tensor.shape
            and target.dtype == tensor.dtype
            and target.stride() == tensor.stride()
            and target.is_contiguous()
        ):
            return target.copy_(tensor)
        return tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu")

    return map_tensors(tree, copied)


class AsyncCheckpointSaver:
    """Wraps a :class:`CheckpointManager`; see the module docstring for the rules. Close it, or use ``with``."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()  # set by the in-flight save's thread when it is done
        self._error: BaseException | None = None
        self._spare: Checkpoint | None = None  # the last snapshot, free once its save is done
        self._closed = False
        atexit.register(self._report_at_exit)

    def save_last(self, checkpoint: Checkpoint) -> CheckpointName | None:
        """Snapshot and save as "last" in the background; the name it will have, or None if ``keep.last`` is 0."""
        return self._save(CheckpointKind.LAST, checkpoint)

    def save_best(self, checkpoint: Checkpoint) -> CheckpointName | None:
        """Snapshot and save as "best" in the background; a non-finite metric raises here, synchronously."""
        return self._save(CheckpointKind.BEST, checkpoint)

    def _save(self, kind: CheckpointKind, checkpoint: Checkpoint) -> CheckpointName | None:
        self._ready()
        name = self.manager.name_for(kind, checkpoint)  # raises here, synchronously, for a non-finite best
        if name is not None:
            self._start(name, lambda state: self.manager.save(kind, state), self._snapshot(checkpoint))
        return name

    def wait(self) -> None:
        """Block until the in-flight save (if any) has committed and rotated; raise its error if it failed."""
        self._join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the in-flight save and stop accepting saves; raises a background error. Idempotent.

        Interrupted (Ctrl-C) while waiting, the saver stays open with its save in flight: the next
        ``close()`` waits again, and a failure is still raised, or logged at exit.
        """
        if self._closed:
            return
        self._join()
        self._closed = True
        atexit.unregister(self._report_at_exit)
        self._spare = None
        self.wait()  # nothing in flight now: raises the background error, if any

    def __enter__(self) -> AsyncCheckpointSaver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as background:  # the caller's exception wins; the background one is attached
            exc.add_note(f"and the background checkpoint save failed too: {background!r}")

    def _ready(self) -> None:
        if self._closed:
            raise CheckpointError(f"this asynchronous saver for {self.manager.store.url} is closed")
        self.wait()

    def _snapshot(self, checkpoint: Checkpoint) -> Checkpoint:
        # Only called after wait(): the previous snapshot's save is over, so its memory is free to reuse.
        self._spare = snapshot(checkpoint, into=self._spare)
        return self._spare

    def _join(self) -> None:
        """Wait for the in-flight save to finish. An interrupt (Ctrl-C) leaves it recorded as in flight, so
        the next save still waits for it instead of snapshotting into the memory it is writing."""
        if self._thread is None:
            return
        # Wait on the event, not on join(): CPython 3.11 can take a thread whose join() was interrupted
        # for finished, and interpreter shutdown would then not wait for the save.
        self._finished.wait()
        self._thread.join()
        self._thread = None

    def _start(self, name: CheckpointName, save: Callable[[Checkpoint], _T], state: Checkpoint) -> None:
        finished = threading.Event()

        def run() -> None:
            try:
                save(state)
            except BaseException as exc:  # kept for the next call: never lost in this thread
                self._error = exc
            finally:
                finished.set()

        # Not a daemon: interpreter shutdown joins it, so a process that exits still completes the save.
        thread = threading.Thread(target=run, name=f"checkpoint-save-{name.filename}", daemon=False)
        self._finished, self._thread = finished, thread  # recorded first: no moment where it runs unrecorded
        try:
            thread.start()
        except BaseException:
            if thread.ident is None:  # it never ran (e.g. the process's thread limit): nothing to wait for
                self._thread = None
                finished.set()
            raise

    def _report_at_exit(self) -> None:
        # Runs after non-daemon threads were joined; nobody is left to raise to, so log it.
        if self._error is not None:
            logger.error("the background save to %s failed: %r", self.manager.store.url, self._error)
