"""The steps of a training run, between its setup and its result (:mod:`.training`): evaluate, save, step.

At each iteration that may evaluate or save, rank 0's plan is every rank's; the metric is rank 0's
value; a save is rank 0's, with every rank's generator states, and its outcome reaches every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ml_playground.checkpoint import CheckpointKind, CheckpointSaver, improves
from ml_playground.config import ExperimentConfig, TrainConfig
from ml_playground.flows.distributed import Ranks
from ml_playground.flows.evaluation import eval_batches, evaluate
from ml_playground.flows.events import EventSink, Note, Stepped
from ml_playground.flows.train_state import TrainState, plain_config
from ml_playground.workload.data import Splits

__all__ = ["TrainingLoop"]


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
        saver: CheckpointSaver | None,
        url: str,
        ranks: Ranks,
        emit: EventSink,
    ) -> None:
        self.tc: TrainConfig = config.train
        self.splits = splits
        self.state = state
        self.saver = saver  # rank 0's; None on the other ranks
        self.url = url
        self.ranks = ranks
        self.emit = emit
        self.saved = "saving (in the background)" if self.tc.runtime.checkpointing.async_save else "saved"
        self.plain_config = plain_config(config)
        rt, data, model = self.tc.runtime, self.tc.data, self.tc.model
        # fixed evaluation batches: every evaluation measures the same text, so metrics compare across iterations
        self.eval_batches = eval_batches(splits, model.block_size, data.batch_size, rt.eval_iters, rt.seed)

    def run(self, *, skip_first: bool) -> dict[str, float]:
        rt = self.tc.runtime
        ck = rt.checkpointing
        metrics: dict[str, float] = {}
        for i in range(self.state.iter_num, rt.max_iters + 1):
            self.state.iter_num = i
            evaluate, save_last = i % rt.eval_interval == 0, i % ck.interval == 0 or i == 0 or i == rt.max_iters
            if (evaluate or save_last) and not (skip_first and i == self.state.start_iter):
                plan = self.ranks.decide(self.ranks.observed(_Plan(evaluate, save_last)))
                if plan.evaluate:
                    metrics = self._evaluate_and_save_best(i)
                if plan.save_last:
                    self._save(CheckpointKind.LAST)
            if i < rt.max_iters:
                loss = self.state.step(self.tc.optim.grad_clip, rt.ema_decay)
                self.emit(Stepped(i + 1, loss))
                if (i + 1) % rt.log_interval == 0 or i + 1 == rt.max_iters:
                    self.emit(Note(f"iter {i + 1}/{rt.max_iters}: train batch loss {loss:.4f}"))
        return metrics

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

        def save() -> str | None:
            assert self.saver is not None
            assert randomness is not None
            checkpoint = self.state.to_checkpoint(self.plain_config, self.splits, randomness)
            last = kind is CheckpointKind.LAST
            saved = self.saver.save_last(checkpoint) if last else self.saver.save_best(checkpoint)
            return None if saved is None else saved.filename

        filename = self.ranks.on_main(save)
        if filename is not None:
            self.emit(Note(f"{self.saved} {self.url}/{filename}"))
