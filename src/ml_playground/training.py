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
from ml_playground.data import Splits, fixed_batches, load_splits
from ml_playground.errors import CheckpointError, ConfigError
from ml_playground.model import runtime_device
from ml_playground.progress import Progress
from ml_playground.train_state import METRICS, TrainState, estimate_loss, plain_config

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


def train(config: ExperimentConfig, *, progress_bar: bool | None = None, take_over: bool = False) -> TrainResult:
    """Train (or resume) the run in ``config.train.runtime.out_dir``; progress is printed as it goes.

    A local or ``s3://`` run location is held under the manager's writer lease for the whole run, so a
    second ``train`` on the same location stops with LocationLockedError instead of interleaving saves.
    ``take_over=True`` takes a live writer's lease (an explicit user action; that writer stops at its next save).
    """
    tc = config.train
    rt = tc.runtime
    ck = rt.checkpointing
    if ck.metric not in METRICS:
        raise ConfigError(
            f"train.runtime.checkpointing.metric = {ck.metric!r} is not computed by the trainer; "
            f"use one of: {', '.join(METRICS)}"
        )
    device = runtime_device("train.runtime.device", rt.device)
    splits = load_splits(tc.data.corpus_chars, tc.data.val_fraction, tc.model.block_size)
    store = open_store(rt.out_dir, create=True)
    manager = CheckpointManager(store, KeepPolicy(last=ck.keep.last, best=ck.keep.best), mode=ck.mode)
    lease = manager.acquire_writer(force=take_over) if manager.supports_writer_lease else None
    if lease is None:
        print(f"note: {store.url} has no writer lease; never run two trainers on this location at once")
    try:
        return _train(config, splits, manager, device, progress_bar)
    finally:
        if lease is not None:
            lease.release()


def _train(
    config: ExperimentConfig,
    splits: Splits,
    manager: CheckpointManager,
    device: torch.device,
    progress_bar: bool | None,
) -> TrainResult:
    tc = config.train
    rt = tc.runtime
    ck = rt.checkpointing
    store = manager.store
    resumed = _resume_point(manager, ck.read_policy)
    out = Progress(rt.max_iters, 0, bar=False)
    if ck.keep.last == 0 and ck.keep.best == 0:
        out.line("keep.last = 0 and keep.best = 0: this run writes no checkpoints")
    if resumed is not None and resumed.iter_num >= rt.max_iters:
        out.line(
            f"nothing to do: {store.url} is already at iteration {resumed.iter_num} "
            f"and train.runtime.max_iters is {rt.max_iters}; raise max_iters to train further"
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
    out.line(f"{what} in {store.url} ({state.param_count():,} parameters, vocabulary of {splits.tokenizer.size})")
    saver = open_saver(manager, async_save=ck.async_save)
    loop = _Loop(config, splits, state, saver, store.url, Progress(rt.max_iters, start, bar=progress_bar))
    try:
        metrics = loop.run(skip_first=resumed is not None)
    except BaseException as exc:
        try:
            saver.close()
        except BaseException as background:  # the training error wins; the background one is attached
            exc.add_note(f"and the background checkpoint save failed too: {background!r}")
        raise
    finally:
        loop.progress.close()
    saver.close()  # an asynchronous save still in flight commits (or raises) before we report
    return TrainResult(store.url, start, rt.max_iters, False, metrics, state.best, _names(manager))


def _resume_point(manager: CheckpointManager, policy: str) -> Checkpoint | None:
    """The checkpoint to continue from, or None for a fresh start (an empty location)."""
    infos = manager.checkpoints()
    if not infos:
        return None
    chosen = manager.choose("best" if policy == "best" else "latest")
    if chosen.iter_num < infos[0].iter_num:
        raise CheckpointError(
            f"train.runtime.checkpointing.read_policy = {policy!r} picks {chosen.filename} (iteration "
            f"{chosen.iter_num}), but {manager.store.url} holds {infos[0].filename} (iteration "
            f"{infos[0].iter_num}); a run never goes back in time. Use read_policy = 'latest', or a new out_dir"
        )
    return manager.load(chosen.filename)


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
        progress: Progress,
    ) -> None:
        self.config = config
        self.tc: TrainConfig = config.train
        self.splits = splits
        self.state = state
        self.saver = saver
        self.url = url
        self.saved = "saving (in the background)" if self.tc.runtime.checkpointing.async_save else "saved"
        self.progress = progress
        self.plain_config = plain_config(config)
        rt, data, model = self.tc.runtime, self.tc.data, self.tc.model
        # fixed evaluation batches: every evaluation measures the same text, so metrics compare across iterations
        self.eval_batches = {
            name: fixed_batches(split, model.block_size, data.batch_size, rt.eval_iters, rt.seed + 1)
            for name, split in (("train_loss", splits.train), ("val_loss", splits.val))
        }

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
                self.progress.step(loss)
                if (i + 1) % rt.log_interval == 0 or i + 1 == rt.max_iters:
                    self.progress.line(f"iter {i + 1}/{rt.max_iters}: train batch loss {loss:.4f}")
        return metrics

    def _evaluate_and_save_best(self, i: int) -> dict[str, float]:
        ck = self.tc.runtime.checkpointing
        metrics = {
            name: estimate_loss(self.state.model, batches, self.state.device)
            for name, batches in self.eval_batches.items()
        }
        value = metrics[ck.metric]
        improved = improves(value, self.state.best, ck.mode)
        mark = " (best so far)" if improved else ""
        self.progress.line(
            f"eval at iter {i}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}{mark}"
        )
        if improved:
            self.state.best = value
            name = self.saver.save_best(self._checkpoint())
            if name is not None:
                self.progress.line(f"{self.saved} {self.url}/{name.filename}")
        elif not math.isfinite(value):
            self.progress.line(f"warning: {ck.metric} is {value} at iter {i}; it never counts as an improvement")
        return metrics

    def _save_last(self) -> None:
        name = self.saver.save_last(self._checkpoint())
        if name is not None:
            self.progress.line(f"{self.saved} {self.url}/{name.filename}")

    def _checkpoint(self) -> Checkpoint:
        return self.state.to_checkpoint(self.plain_config, self.splits)
