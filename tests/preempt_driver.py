"""Run ``ml-playground ARGS`` in this process and send it SIGTERM at a chosen point of a chosen iteration.

    python -m tests.preempt_driver POINT ITERATION [SECOND] -- ARGS...

POINT is where the signal lands, at iteration ITERATION (the first time the run passes there):

- ``step``: in the middle of the training step (after the forward pass);
- ``evaluation``: in the middle of an evaluation (between two batches);
- ``save``: in the middle of writing a checkpoint file (after its first write);
- ``async-save``: the same, in the asynchronous saver's background thread;
- ``boundary``: at the start of the iteration, before anything of it ran.

SECOND (``second``) sends another SIGTERM 1.5 s later, still in the same place (a save then is aborted).
The hooks only send signals; what the run does with them is the code under test. Exits with the CLI's code.

Under torchrun (``torchrun ... -m tests.preempt_driver ...``): ``SIGTERM_RANK`` (environment) limits the
signal to one rank, and ``EXIT_DIR`` makes every rank write its exit code to ``EXIT_DIR/exit-<RANK>``
(torchrun does not report its workers' codes when it is itself signalled).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ml_playground.checkpoint import FileOps
from ml_playground.checkpoint.stores.local import _store as local_store
from ml_playground.cli import leave, main
from ml_playground.flows import _loop, evaluation, train_state
from ml_playground.flows.preemption import REPEAT_WINDOW


class _Trigger:
    def __init__(self, point: str, iteration: int, second: bool) -> None:
        self.point = point
        self.iteration = iteration
        self.second = second
        self.fired = False
        self.current = -1

    def here(self, point: str) -> None:
        if self.fired or point != self.point or self.current != self.iteration:
            return
        if os.environ.get("SIGTERM_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
            return
        if point == "async-save" and threading.current_thread() is threading.main_thread():
            return
        if point == "save" and threading.current_thread() is not threading.main_thread():
            return
        self.fired = True
        os.kill(os.getpid(), signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.05)  # let the handler run here, inside the point
        if self.second:
            time.sleep(REPEAT_WINDOW + 0.5)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)


def _install(trigger: _Trigger) -> None:
    step = train_state.TrainState.step

    def stepping(self: Any, grad_clip: float, ema_decay: float) -> float:
        trigger.current = self.iter_num
        trigger.here("step")
        return step(self, grad_clip, ema_decay)

    train_state.TrainState.step = stepping  # type: ignore[method-assign]

    estimate = evaluation.estimate_loss

    def estimating(model: Any, batches: Any, device: Any) -> float:
        trigger.here("evaluation")
        return estimate(model, batches, device)

    evaluation.estimate_loss = estimating  # type: ignore[assignment]

    run = _loop.TrainingLoop._evaluate_and_save_best

    def at_evaluation(self: Any, i: int) -> dict[str, float]:
        trigger.current = i
        return run(self, i)

    _loop.TrainingLoop._evaluate_and_save_best = at_evaluation  # type: ignore[method-assign]

    agreed = _loop.TrainingLoop._agreed

    def at_boundary(self: Any, vote: Any) -> bool:
        trigger.current = self.state.iter_num
        trigger.here("boundary")
        return agreed(self, vote)

    _loop.TrainingLoop._agreed = at_boundary  # type: ignore[method-assign]

    write = FileOps.write

    def writing(self: FileOps, fd: int, data: memoryview) -> int:
        written = write(self, fd, data)
        trigger.here("save")
        trigger.here("async-save")
        return written

    local_store.FileOps.write = writing  # type: ignore[method-assign]


def run() -> int:
    separator = sys.argv.index("--")
    point, iteration, *rest = sys.argv[1:separator]
    _install(_Trigger(point, int(iteration), rest == ["second"]))
    code = main(sys.argv[separator + 1 :])
    if "EXIT_DIR" in os.environ:
        Path(os.environ["EXIT_DIR"], f"exit-{os.environ.get('RANK', '0')}").write_text(str(code))
    return code


if __name__ == "__main__":
    leave(run())
