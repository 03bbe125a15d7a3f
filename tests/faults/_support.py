"""Shared pieces of the fault suites: deterministic multi-MB checkpoints and run-location audits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ml_playground.checkpoint import Checkpoint, CheckpointManager, CheckpointName, KeepPolicy, LocalStore
from ml_playground.checkpoint._lease import LEASE_NAME
from ml_playground.checkpoint._store import TEMP_PREFIX
from ml_playground.errors import CheckpointError

ROWS, COLS = 1024, 384  # 1.5 MiB per float32 tensor; model + two AdamW moments = 4.5 MiB per file

_BASE = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(1234))


def metric_for(iter_num: int) -> float:
    """A metric that strictly improves with every iteration (as save_best is only called on improvement)."""
    return round(100.0 - iter_num * 0.001, 6)


def big_checkpoint(iter_num: int) -> Checkpoint:
    """A ~4.5 MiB checkpoint whose every tensor is a function of ``iter_num``, so its content can be re-derived."""
    weight = _BASE + float(iter_num)
    return Checkpoint(
        model={"weight": weight, "bias": torch.full((COLS,), float(iter_num))},
        optimizer={
            "state": {0: {"step": torch.tensor(float(iter_num)), "exp_avg": weight * 0.5, "exp_avg_sq": weight * 0.25}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}],
        },
        model_args={"rows": ROWS, "cols": COLS},
        iter_num=iter_num,
        best_val_loss=metric_for(iter_num),
        config={"train": {"runtime": {"out_dir": "/tmp/run"}}},
        rng_state={"torch": torch.arange(16, dtype=torch.uint8) + iter_num % 200},
        data_state={"position": iter_num},
    )


def content_problem(checkpoint: Checkpoint, iter_num: int) -> str | None:
    """Why ``checkpoint`` is not exactly what ``big_checkpoint(iter_num)`` saved, or None."""
    want = big_checkpoint(iter_num)
    if checkpoint.iter_num != iter_num or checkpoint.best_val_loss != want.best_val_loss:
        return f"iteration/metric {checkpoint.iter_num}/{checkpoint.best_val_loss} != {iter_num}/{want.best_val_loss}"
    for key in want.model:
        if not torch.equal(checkpoint.model[key], want.model[key]):
            return f"model.{key} differs"
    state, want_state = checkpoint.optimizer["state"][0], want.optimizer["state"][0]
    for key in want_state:
        if not torch.equal(state[key], want_state[key]):
            return f"optimizer.state.0.{key} differs"
    if dict(checkpoint.data_state) != dict(want.data_state):
        return "data_state differs"
    return None


def temporaries(run: Path) -> list[str]:
    return sorted(name for name in os.listdir(run) if name.startswith(TEMP_PREFIX))


def audit_all_load(run: Path) -> tuple[list[CheckpointName], list[str]]:
    """Load and verify every checkpoint-named file; return the names and every problem found."""
    problems: list[str] = []
    manager = CheckpointManager(LocalStore(run))
    listed = [obj.name for obj in manager.store.list()]
    problems += [f"temporary {name} was listed" for name in listed if name.startswith(TEMP_PREFIX)]
    try:
        infos = manager.checkpoints()
    except CheckpointError as exc:
        return [], [*problems, f"discovery failed: {exc}"]
    for info in infos:
        try:
            problem = content_problem(manager.load(info.filename), info.iter_num)
        except CheckpointError as exc:
            problem = f"does not load: {exc}"
        if problem is not None:
            problems.append(f"{info.filename}: {problem}")
    lease_files = {name for name in os.listdir(run) if name.startswith(LEASE_NAME)}  # a writer's, not checkpoints
    stray = set(os.listdir(run)) - {i.filename for i in infos} - set(temporaries(run)) - lease_files
    problems += [f"unexpected file {name}" for name in sorted(stray)]
    return [info.name for info in infos], problems


def expected_kept(seen: Iterable[CheckpointName], keep: KeepPolicy) -> set[CheckpointName]:
    """What rotation must leave after a successful save, given every checkpoint ever committed."""
    seen = set(seen)
    lasts = sorted((n for n in seen if n.kind.value == "last"), key=lambda n: n.iter_num, reverse=True)
    bests = sorted((n for n in seen if n.kind.value == "best"), key=lambda n: (n.metric, -n.iter_num))
    return set(lasts[: keep.last]) | set(bests[: keep.best])


def fork_with_pipe(body: Callable[[int], None]) -> tuple[int, int]:
    """Fork a child (from this process, torch already imported) running ``body(write_fd)``; return
    (pid, read_fd). The child exits 0 when ``body`` returns, 1 when it raises."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(read_fd)
            body(write_fd)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd
