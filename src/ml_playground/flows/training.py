"""The training loop: a small GPT on the bundled corpus, checkpointed through the manager's public API.

Order at iteration ``i`` (``i = start .. max_iters``, the training step skipped at ``max_iters``)::

    evaluate        if i % eval_interval == 0
    save best       if the metric strictly improved (NaN / inf never do)
    save last       if i % interval == 0, or i == 0, or i == max_iters
    training step i

A checkpoint at ``i`` therefore holds the state after ``i``'s evaluation and before ``i``'s step, and a
resumed run continues with the training step of the checkpoint's iteration (no evaluation or save
repeats), which makes it bitwise identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ml_playground.checkpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointSaver,
    KeepPolicy,
    improves,
    open_saver,
    open_store,
)
from ml_playground.config import ExperimentConfig, TrainConfig
from ml_playground.errors import ConfigError
from ml_playground.flows import limits
from ml_playground.flows.evaluation import eval_batches, evaluate
from ml_playground.flows.events import EventSink, Note, Started, Stepped, log_events
from ml_playground.flows.train_state import TrainState, model_args_for, plain_config
from ml_playground.workload.data import Splits, load_splits
from ml_playground.workload.model import runtime_device

__all__ = ["TrainResult", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What a ``train`` call did: where, up to which iteration, and which checkpoints the location holds."""

    location: str
    start_iter: int
    end_iter: int
    nothing_to_do: bool
    last_metrics: dict[str, float]
    best_metric: float
    checkpoints: list[str]


def train(config: ExperimentConfig, *, on_event: EventSink | None = None, take_over: bool = False) -> TrainResult:
    """Train (or resume) the run in ``config.train.runtime.out_dir``, reporting to ``on_event`` as it goes
    (default: the run's logger, ``config.context.logger``).

    A local or ``s3://`` run location is held under the manager's writer lease for the whole run, so a
    second ``train`` on the same location stops with LocationLockedError instead of interleaving saves.
    ``take_over=True`` takes a live writer's lease (an explicit user action; that writer stops at its next save).
    """
    emit = on_event or log_events(config.context.logger)
    tc = config.train
    rt = tc.runtime
    ck = rt.checkpointing
    device = runtime_device("train.runtime.device", rt.device)
    splits = load_splits(tc.data.corpus_chars, tc.data.val_fraction, tc.model.block_size)
    _require_training_memory(tc, splits)
    store = open_store(rt.out_dir, create=True)
    manager = CheckpointManager(store, KeepPolicy(last=ck.keep.last, best=ck.keep.best), mode=ck.mode)
    lease = manager.acquire_writer(force=take_over) if manager.supports_writer_lease else None
    if lease is None:
        emit(Note(f"note: {store.url} has no writer lease; never run two trainers on this location at once"))
    try:
        return _train(config, splits, manager, device, emit)
    finally:
        if lease is not None:
            lease.release()


def _train(
    config: ExperimentConfig, splits: Splits, manager: CheckpointManager, device: torch.device, emit: EventSink
) -> TrainResult:
    tc = config.train
    rt = tc.runtime
    ck = rt.checkpointing
    store = manager.store
    chosen = manager.resume_point(ck.read_policy)
    resumed = manager.load(chosen.filename) if chosen is not None else None
    if ck.keep.last == 0 and ck.keep.best == 0:
        emit(Note("keep.last = 0 and keep.best = 0: this run writes no checkpoints"))
    if resumed is not None and resumed.iter_num >= rt.max_iters:
        emit(
            Note(
                f"nothing to do: {store.url} is already at iteration {resumed.iter_num} "
                f"and train.runtime.max_iters is {rt.max_iters}; raise max_iters to train further"
            )
        )
        return TrainResult(
            store.url, resumed.iter_num, resumed.iter_num, True, {}, resumed.best_val_loss, _names(manager)
        )
    state = (
        TrainState.fresh(tc, splits, device)
        if resumed is None
        else TrainState.restore(tc, splits, device, resumed, source=store.url)
    )
    start = state.iter_num
    what = f"resuming from iteration {start}" if resumed is not None else "starting a fresh run"
    emit(Note(f"{what} in {store.url} ({state.param_count():,} parameters, vocabulary of {splits.tokenizer.size})"))
    saver = open_saver(manager, async_save=ck.async_save)
    loop = _Loop(config, splits, state, saver, store.url, emit)
    emit(Started(rt.max_iters, start))
    try:
        metrics = loop.run(skip_first=resumed is not None)
    except BaseException as exc:
        try:
            saver.close()
        except BaseException as background:  # the training error wins; the background one is attached
            exc.add_note(f"and the background checkpoint save failed too: {background!r}")
        raise
    saver.close()  # an asynchronous save still in flight commits (or raises) before we report
    return TrainResult(store.url, start, rt.max_iters, False, metrics, state.best, _names(manager))


def _require_training_memory(tc: TrainConfig, splits: Splits) -> None:
    """A model or batch this machine cannot hold is a ConfigError naming the setting, before it is built."""
    m = tc.model
    params, activations = limits.training_bytes(
        model_args_for(tc, splits), tc.data.batch_size, ema=tc.runtime.ema_decay > 0
    )
    if params >= activations:
        what = f"train.model.n_embd = {m.n_embd} (with train.model.n_layer = {m.n_layer}): training that model"
    else:
        what = f"train.data.batch_size = {tc.data.batch_size} (with train.model.block_size = {m.block_size}): a batch"
    limits.require_memory(params + activations, what, ConfigError)


def _names(manager: CheckpointManager) -> list[str]:
    return sorted(info.filename for info in manager.checkpoints())


class _Loop:
    def __init__(
        self,
        config: ExperimentConfig,
        splits: Splits,
        state: TrainState,
        saver: CheckpointSaver,
        url: str,
        emit: EventSink,
    ) -> None:
        self.config = config
        self.tc: TrainConfig = config.train
        self.splits = splits
        self.state = state
        self.saver = saver
        self.url = url
        self.saved = "saving (in the background)" if self.tc.runtime.checkpointing.async_save else "saved"
        self.emit = emit
        self.diverged = False  # a non-finite loss is reported once
        self.plain_config = plain_config(config)
        rt, data, model = self.tc.runtime, self.tc.data, self.tc.model
        # fixed evaluation batches: every evaluation measures the same text, so metrics compare across iterations
        self.eval_batches = eval_batches(splits, model.block_size, data.batch_size, rt.eval_iters, rt.seed)

    def run(self, *, skip_first: bool) -> dict[str, float]:
        rt = self.tc.runtime
        metrics: dict[str, float] = {}
        for i in range(self.state.iter_num, rt.max_iters + 1):
            self.state.iter_num = i
            if not (skip_first and i == self.state.start_iter):
                if i % rt.eval_interval == 0:
                    metrics = self._evaluate_and_save_best(i)
                if i % rt.checkpointing.interval == 0 or i == 0 or i == rt.max_iters:
                    self._save_last()
            if i < rt.max_iters:
                loss = self.state.step(self.tc.optim.grad_clip, self.tc.runtime.ema_decay)
                self.emit(Stepped(i + 1, loss))
                if not math.isfinite(loss) and not self.diverged:
                    self.diverged = True
                    self.emit(
                        Note(
                            f"warning: the training loss is {loss} at iteration {i + 1}: the run has diverged"
                            "; its later checkpoints hold unusable weights. Lower train.optim.learning_rate "
                            "and train again from an earlier checkpoint or a new out_dir"
                        )
                    )
                if (i + 1) % rt.log_interval == 0 or i + 1 == rt.max_iters:
                    self.emit(Note(f"iter {i + 1}/{rt.max_iters}: train batch loss {loss:.4f}"))
        return metrics

    def _evaluate_and_save_best(self, i: int) -> dict[str, float]:
        ck = self.tc.runtime.checkpointing
        metrics = evaluate(self.state.model, self.eval_batches, self.state.device)
        value = metrics[ck.metric]
        improved = improves(value, self.state.best, ck.mode)
        mark = " (best so far)" if improved else ""
        self.emit(
            Note(f"eval at iter {i}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}{mark}")
        )
        if improved:
            self.state.best = value
            name = self.saver.save_best(self._checkpoint())
            if name is not None:
                self.emit(Note(f"{self.saved} {self.url}/{name.filename}"))
        elif not math.isfinite(value):
            self.emit(Note(f"warning: {ck.metric} is {value} at iter {i}; it never counts as an improvement"))
        return metrics

    def _save_last(self) -> None:
        name = self.saver.save_last(self._checkpoint())
        if name is not None:
            self.emit(Note(f"{self.saved} {self.url}/{name.filename}"))

    def _checkpoint(self) -> Checkpoint:
        return self.state.to_checkpoint(self.plain_config, self.splits)
