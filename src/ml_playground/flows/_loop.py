"""The steps of a training run, between its setup and its result (:mod:`.training`): evaluate, save, step.

At each iteration that may evaluate or save, rank 0's plan is every rank's; the metric is rank 0's
value; a save holds every rank's generator states and its outcome reaches every rank. The run's
:class:`Saves` write it: a single file written by rank 0 (:class:`SingleFileSaves`), or the parts every rank
writes and rank 0's manifest (:class:`ml_playground.flows.fsdp.ShardedSaver`).

A SIGTERM (:mod:`.preemption`) stops the run at an iteration boundary ``s`` every rank agrees on (a vote
started before each step, answered at the next boundary): ``s``'s evaluation and best save run if due, a
``last`` save at ``s`` is forced (unless one was just written there, or ``keep.last`` is 0), and the loop
ends. A SIGTERM at the final boundary (``max_iters``) or later lets the run complete.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from ml_playground.checkpoint import Checkpoint, CheckpointKind, CheckpointSaver, improves
from ml_playground.config import ExperimentConfig, TrainConfig
from ml_playground.errors import DistributedError
from ml_playground.flows.distributed import Ranks, collective_failure
from ml_playground.flows.evaluation import eval_batches, evaluate
from ml_playground.flows.events import EventSink, Note, Stepped
from ml_playground.flows.preemption import Preempted, Preemption
from ml_playground.flows.train_state import TrainState, plain_config
from ml_playground.workload.data import Splits

__all__ = ["Saves", "SingleFileSaves", "Stop", "TrainingLoop"]


class Saves(Protocol):
    """How a run's checkpoints are written; every rank calls each method together."""

    def save(self, kind: CheckpointKind, describe: Callable[..., Checkpoint], state: TrainState) -> str | None:
        """Save ``state`` as ``kind``; ``describe(tensors=...)`` gives (on rank 0) the checkpoint to write.
        The file name on rank 0 (None: that kind's keep is 0)."""
        ...

    def close(self, *, failed: bool = False) -> None:
        """Settle a save in flight (its outcome raised on every rank); ``failed``: no collectives (a rank may
        be gone)."""
        ...


class SingleFileSaves:
    """Rank 0 writes each checkpoint through its saver (sync or async); every rank learns the outcome."""

    def __init__(self, saver: CheckpointSaver | None, ranks: Ranks) -> None:
        self.saver = saver  # rank 0's; None on the other ranks
        self.ranks = ranks

    def save(self, kind: CheckpointKind, describe: Callable[..., Checkpoint], state: TrainState) -> str | None:
        def save() -> str | None:
            assert self.saver is not None
            last = kind is CheckpointKind.LAST
            saved = self.saver.save_last(describe()) if last else self.saver.save_best(describe())
            return None if saved is None else saved.filename

        return self.ranks.on_main(save)

    def close(self, *, failed: bool = False) -> None:
        if failed:
            if self.saver is not None:
                self.saver.close()
            return
        self.ranks.on_main(lambda: self.saver.close() if self.saver is not None else None)


@dataclass(frozen=True)
class Stop:
    """How the loop ended: the last metrics, and the iteration a SIGTERM stopped it at (None: it completed)."""

    metrics: dict[str, float]
    stopped_at: int | None = None


@dataclass(frozen=True)
class _Plan:
    """What happens at an iteration that may evaluate or save; rank 0's plan is every rank's."""

    evaluate: bool
    save_last: bool


class TrainingLoop:
    def __init__(
        self,
        config: ExperimentConfig,
        splits: Splits,
        state: TrainState,
        saves: Saves,
        url: str,
        ranks: Ranks,
        emit: EventSink,
        preemption: Preemption,
    ) -> None:
        self.tc: TrainConfig = config.train
        self.preemption = preemption
        self.last_saved_at: int | None = None
        self.splits = splits
        self.state = state
        self.saves = saves
        self.url = url
        self.ranks = ranks
        self.emit = emit
        self.diverged = False  # a non-finite loss is reported once
        self.saved = "saving (in the background)" if self.tc.runtime.checkpointing.async_save else "saved"
        self.plain_config = plain_config(config)
        rt, data, model = self.tc.runtime, self.tc.data, self.tc.model
        # fixed evaluation batches: every evaluation measures the same text, so metrics compare across iterations
        self.eval_batches = eval_batches(splits, model.block_size, data.batch_size, rt.eval_iters, rt.seed)

    def run(self, *, resumed: bool, resumed_last: bool) -> Stop:
        """Iterate from the state's iteration to ``max_iters``. ``resumed``: the first iteration's evaluation and
        saves happened before the checkpoint it resumed from (never repeated); ``resumed_last``: that checkpoint
        is a last one."""
        try:
            return self._run(resumed, resumed_last)
        except Exception as exc:
            gone = isinstance(exc, DistributedError) or (self.ranks.distributed and collective_failure(exc))
            if not gone:
                raise
            if self.preemption.requested:  # the SIGTERM came with (or after) a rank's end: no save
                raise Preempted(f"stopped by SIGTERM; another rank is gone, so nothing was saved ({exc})") from None
            if isinstance(exc, DistributedError):
                raise
            raise DistributedError(f"a training step failed: another rank is gone or stuck ({exc})") from None

    def _run(self, resumed: bool, resumed_last: bool) -> Stop:
        rt = self.tc.runtime
        ck = rt.checkpointing
        metrics: dict[str, float] = {}
        start = self.state.start_iter
        if resumed_last:
            self.last_saved_at = start
        vote = self.ranks.vote(lambda: self.preemption.requested)
        for i in range(self.state.iter_num, rt.max_iters + 1):
            self.state.iter_num = i
            stop = self._agreed(vote) and i < rt.max_iters  # the final boundary completes the run anyway
            evaluate, save_last = i % rt.eval_interval == 0, i % ck.interval == 0 or i == 0 or i == rt.max_iters
            if (evaluate or save_last) and not (resumed and i == start):
                plan = self.ranks.decide(self.ranks.observed(_Plan(evaluate, save_last)))
                if plan.evaluate:
                    metrics = self._evaluate_and_save_best(i)
                if plan.save_last:
                    self._save(CheckpointKind.LAST)
            if stop:
                self._save_at_stop(i)
                return Stop(metrics, i)
            if i < rt.max_iters:
                vote = self.ranks.vote(lambda: self.preemption.requested)  # runs during the step
                loss = self.state.step(self.tc.optim.grad_clip, rt.ema_decay)
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
        return Stop(metrics)

    def _agreed(self, vote: Callable[[float], bool]) -> bool:
        """Whether any rank got a SIGTERM by the previous boundary; every rank gets the same answer."""
        return vote(self.tc.runtime.distributed.preempt_timeout_s)

    def _save_at_stop(self, i: int) -> None:
        keep_last = self.tc.runtime.checkpointing.keep.last
        if keep_last == 0:
            self.emit(Note(f"stopped at iteration {i} on SIGTERM; keep.last = 0, so no checkpoint was saved there"))
        elif self.last_saved_at != i:
            self._save(CheckpointKind.LAST)
        if keep_last:
            self.emit(Note(f"stopped at iteration {i} on SIGTERM; resume by running the same command again"))

    def _evaluate_and_save_best(self, i: int) -> dict[str, float]:
        ck = self.tc.runtime.checkpointing
        # every rank evaluates the batches a single process would; rank 0's value is the metric
        metrics = evaluate(self.state.model, self.eval_batches, self.state.device)
        value = self.ranks.decide(self.ranks.observed(metrics[ck.metric]))
        improved = improves(value, self.state.best, ck.mode)
        mark = " (best so far)" if improved else ""
        train_loss, val_loss = metrics["train_loss"], metrics["val_loss"]
        self.emit(Note(f"eval at iter {i}: train loss {train_loss:.4f}, val loss {val_loss:.4f}{mark}"))
        if improved:
            self.state.best = value
            self._save(CheckpointKind.BEST)
        elif not math.isfinite(value):
            self.emit(Note(f"warning: {ck.metric} is {value} at iter {i}; it never counts as an improvement"))
        return metrics

    def _save(self, kind: CheckpointKind) -> None:
        randomness = self.ranks.gather(self.state.randomness())  # every rank's generators, on rank 0
        describe = partial(self.state.to_checkpoint, self.plain_config, self.splits, randomness)
        filename = self.saves.save(kind, describe, self.state)
        if kind is CheckpointKind.LAST:
            self.last_saved_at = self.state.iter_num
        if filename is not None:
            self.emit(Note(f"{self.saved} {self.url}/{filename}"))
