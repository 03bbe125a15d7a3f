"""What a training run does on SIGTERM: spot instances, Kubernetes and SLURM send it before they kill a job.

With ``train.runtime.checkpointing.save_on_sigterm`` (the default) the first SIGTERM only asks the run to
stop: the loop stops at its next iteration boundary, evaluates and saves as due there, saves ``last`` there,
awaits an asynchronous save and ends; the CLI then exits 143. A save in progress when the signal lands
finishes. A second SIGTERM (or a Ctrl-C) aborts what runs (:class:`Preempted`), a save included, which the
stores undo cleanly. Without ``save_on_sigterm`` the first SIGTERM aborts at once, like Ctrl-C.

torchrun may deliver one SIGTERM to a worker twice within milliseconds (the signal to its process group and
the agent's forwarded copy): a repeat within :data:`REPEAT_WINDOW` seconds counts as the same signal.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

__all__ = ["REPEAT_WINDOW", "Preempted", "Preemption"]

REPEAT_WINDOW = 1.0


class Preempted(BaseException):
    """The run was stopped by SIGTERM without (or in the middle of) its save; like KeyboardInterrupt, not an
    error of the run's, and never caught by ``except Exception``."""


class Preemption:
    """SIGTERM handling for one run (a context manager; the previous handler comes back on exit).

    Handlers belong to the main thread: in another thread (a library user's) the run keeps the process's
    own SIGTERM handling and ``requested`` stays False.
    """

    def __init__(self, save_first: bool) -> None:
        self._save_first = save_first
        self._at: float | None = None
        self._previous: Any = None
        self._installed = False

    @property
    def requested(self) -> bool:
        """Whether a SIGTERM asked the run to stop."""
        return self._at is not None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._at is None:
            self._at = now
            if not self._save_first:
                raise Preempted("stopped by SIGTERM (save_on_sigterm = false)")
            return
        if now - self._at >= REPEAT_WINDOW:
            raise Preempted("stopped by a second SIGTERM")
