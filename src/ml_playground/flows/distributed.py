"""The processes of one training run: one, or the ranks ``torchrun`` started. Rank 0 decides; every rank follows.

torch.distributed is the engine (docs/distributed.md): the process group comes from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) and ``train.runtime.distributed``. Every
collective here is bounded by ``timeout_s`` (the process group's timeout). Without torchrun (or with one
process) there is no process group and each call is the plain local operation.

- :meth:`Ranks.decide` gives every rank rank 0's value (a save, best, stop or resume choice);
- :meth:`Ranks.on_main` runs an action on rank 0 (a save) and gives every rank its outcome: the result, or
  the same error, raised on every rank;
- :meth:`Ranks.everywhere` runs an action on every rank and fails every rank if any failed;
- :meth:`Ranks.gather` brings a value of every rank to rank 0 (the RNG states a checkpoint holds).

A test seam (``ML_PLAYGROUND_TEST_SKEW_RANK``) makes one rank see different local values
(:meth:`Ranks.observed`), so a test can show that every rank still follows rank 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ml_playground import errors
from ml_playground.config import DistributedConfig
from ml_playground.errors import CheckpointError, ConfigError, DistributedError, MLPlaygroundError

__all__ = ["SKEW_RANK_VARIABLE", "Ranks", "collective_failure"]

_T = TypeVar("_T")
SKEW_RANK_VARIABLE = "ML_PLAYGROUND_TEST_SKEW_RANK"
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class _Outcome:
    """What an action gave: nothing to say, or an error of a given class and message."""

    error: str | None = None
    message: str = ""


class Ranks:
    """This process's place in its run: ``rank`` of ``world_size``, its ``device``; ``close()`` at the end."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, grouped: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self._grouped = grouped
        skew = os.environ.get(SKEW_RANK_VARIABLE, "")
        self._skewed = grouped and skew.isdigit() and int(skew) == rank

    @classmethod
    def start(cls, settings: DistributedConfig, device: str) -> Ranks:
        """Join the run torchrun started (if it did); the device of this rank (``cuda:LOCAL_RANK`` on CUDA).

        Strategy ``"fsdp"`` always has a process group: without torchrun, one of a single rank."""
        launch = _launch()
        sharded = settings.strategy == "fsdp"
        if (launch is None or launch[1] == 1) and not sharded:
            return cls(0, 1, 0, torch.device(device), grouped=False)
        rank, world_size, local_rank = launch or (0, 1, 0)
        backend = settings.backend if settings.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
        placed = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
        if placed.type == "cuda":
            torch.cuda.set_device(placed)
        timeout = timedelta(seconds=settings.timeout_s)
        if launch is None:  # no torchrun: a group of this process alone, with nothing to rendezvous over
            store = dist.HashStore()  # type: ignore[attr-defined]  # exported at runtime, not in torch's stubs
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        return cls(rank, world_size, local_rank, placed, grouped=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self._grouped

    def close(self, *, together: bool = True) -> None:
        """Leave the process group. ``together`` (the run ended normally): every rank first waits for the
        others, so no rank tears its group down while a peer still talks to it.

        Leaving a failed run, the rank ignores SIGTERM from then on: every rank raised the same error and
        exits 1, and torchrun's teardown of the ranks still exiting must not turn that into a kill.
        """
        if not self._grouped:
            return
        if not together and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if dist.is_initialized():
            if together:
                with _collective("finish together"):
                    dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------ agreement

    def observed(self, value: _T) -> _T:
        """A value this rank observed locally; on the test seam's rank, a different one."""
        if not self._skewed:
            return value
        if isinstance(value, bool):
            return not value  # type: ignore[return-value]
        if isinstance(value, (int, float)):
            return value + 1.0  # type: ignore[return-value]
        return None  # type: ignore[return-value]

    def decide(self, value: _T) -> _T:
        """Rank 0's ``value``, on every rank."""
        if not self._grouped:
            return value
        box: list[Any] = [value]
        with _collective("agree on rank 0's decision"):
            dist.broadcast_object_list(box, src=0)
        decided: _T = box[0]
        return decided

    def on_main(self, action: Callable[[], _T]) -> _T | None:
        """Run ``action`` on rank 0 and return its result there (None on the other ranks); if it raised,
        every rank raises it (same class, same message) before going on."""
        if not self._grouped:
            return action()
        own: BaseException | None = None
        result: _T | None = None
        outcome = _Outcome()
        if self.is_main:
            try:
                result = action()
            except BaseException as exc:  # every rank must learn it; rank 0 re-raises its own below
                own = exc
                outcome = _Outcome(type(exc).__name__, str(exc))
        outcome = self.decide(outcome)
        if own is not None:
            raise own
        if outcome.error is not None:
            raise _rebuilt(outcome)
        return result

    def everywhere(self, action: Callable[[], _T]) -> _T:
        """Run ``action`` on every rank; if it failed on any, raise on every rank (naming the rank)."""
        if not self._grouped:
            return action()
        own: BaseException | None = None
        result: _T | None = None
        try:
            result = action()
        except Exception as exc:
            own = exc
        failures: list[Any] = [None] * self.world_size
        with _collective("share their outcomes"):
            dist.all_gather_object(failures, None if own is None else (type(own).__name__, str(own)))
        if own is not None:
            raise own
        for rank, failure in enumerate(failures):
            if failure is not None:
                error = _rebuilt(_Outcome(failure[0], failure[1]))
                raise type(error)(f"rank {rank} failed: {error}")
        return result  # type: ignore[return-value]

    def vote(self, flag: Callable[[], bool]) -> Callable[[float], bool]:
        """Start agreeing whether any rank raises ``flag()`` now (an all-reduce that runs while the caller goes
        on); the returned call waits at most its argument in seconds and gives the answer, the same on every
        rank. A single process just asks ``flag()`` when answering."""
        if not self._grouped:
            return lambda timeout: flag()
        tensor = torch.tensor([int(flag())], dtype=torch.int32, device=self.device)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)

        def result(timeout: float) -> bool:
            with _collective("vote"):
                work.wait(timeout=timedelta(seconds=timeout))
            return bool(tensor.item())

        return result

    def gather(self, value: _T) -> list[_T] | None:
        """Every rank's ``value`` on rank 0 (in rank order); None on the others."""
        if not self._grouped:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        with _collective("gather their states on rank 0"):
            dist.gather_object(value, gathered, dst=0)
        return gathered


_COLLECTIVE_FAILURES = (
    "gloo",
    "NCCL",
    "nccl",
    "Connection closed by peer",
    "Timed out",
    "timed out",
    "Application timeout",  # gloo, a collective past the group's timeout: "Application timeout caused pair closure"
)


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.distributed's report of a failed collective (a peer gone, a timeout)."""
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _COLLECTIVE_FAILURES)


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A failed collective as a DistributedError saying what the ranks were doing."""
    try:
        yield
    except RuntimeError as exc:
        if not collective_failure(exc):
            raise
        reason = str(exc).strip().splitlines()[0][:200]
        raise DistributedError(
            f"the ranks could not {what}: another rank is gone or stuck ({reason}); "
            "train.runtime.distributed.timeout_s bounds how long a rank waits"
        ) from None


def _launch() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment; None when not launched by torchrun."""
    if not all(name in os.environ for name in _LAUNCH_VARIABLES):
        return None
    values = [os.environ[name] for name in _LAUNCH_VARIABLES]
    if not all(value.isdigit() for value in values):
        raise ConfigError(f"torchrun's environment is not usable: {dict(zip(_LAUNCH_VARIABLES, values, strict=True))}")
    rank, world_size, local_rank = (int(value) for value in values)
    if world_size < 1 or rank >= world_size:
        raise ConfigError(f"torchrun's environment is not usable: RANK={rank}, WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def _rebuilt(outcome: _Outcome) -> MLPlaygroundError:
    """Rank 0's error, as this rank raises it: the package's class of that name, else a CheckpointError."""
    cls = getattr(errors, outcome.error or "", None)
    if isinstance(cls, type) and issubclass(cls, MLPlaygroundError):
        return cls(outcome.message)
    return CheckpointError(f"rank 0 failed: {outcome.error}: {outcome.message}")
