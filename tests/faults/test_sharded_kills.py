"""SIGKILL at each stage of a sharded save (FSDP, torchrun, world size 2), sync and async, local disk and S3.

The run stops itself at the chosen stage (the ``ML_PLAYGROUND_TEST_STOP_AT`` seam: SIGSTOP, seen in /proc),
and the test SIGKILLs the stopped rank alone, every rank, or the other rank (then the stopped one goes on, and
torchrun stops it: a peer dies while this rank writes). The run saves ``best`` at iteration 0, then
``last`` every 2 iterations keeping one, so the 4th save (``ckpt_last_00000004.pt``) is the one cut at
``parts`` / ``gathered`` / ``manifest``, and the 2nd rotation (of ``ckpt_last_00000002.pt``, right after
``ckpt_last_00000004.pt`` committed) the one cut at ``rotation``. After each kill:

- no half checkpoint is visible: exactly the expected checkpoints are listed, each with its complete set of
  parts, and each loads and verifies; ``ckpt verify`` exits 0 and lists the leftovers (every stage leaves some
  when the stopped rank is killed; when it goes on, the cut save may commit, or its rotation finish);
- a restart (``train`` again) resumes from the newest complete checkpoint and its writer removes the leftovers.

CI runs ``SAMPLE`` (every stage, both victims, sync and async, both stores); ``pytest -m sweep`` the whole
matrix (``MATRIX``), whose counts docs/reliability.md quotes.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ml_playground.checkpoint import CheckpointManager, CheckpointStore, LocalStore, open_store
from ml_playground.checkpoint._stop_seam import STOP_AT_VARIABLE
from ml_playground.checkpoint._store import TEMP_PREFIX
from tests.cli_support import TINY, run_cli, sets
from tests.distributed_support import cleanup, launcher_env, rank_text, torchrun, torchrun_command, worker_pids
from tests.servers import S3LocationFactory

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

RUN = [
    *TINY,
    *sets(eval_interval=1000, checkpointing__interval=2, checkpointing__keep__last=1, checkpointing__keep__best=1),
    *sets(distributed__strategy="fsdp", distributed__timeout_s=60, distributed__preempt_timeout_s=5),
]
CUT = "ckpt_last_00000004.pt"  # the save the first three stages cut (its 4th); rotation's 2nd deletes ..02
STOPS = {"parts": 4, "gathered": 4, "manifest": 4, "rotation": 2}  # the n-th time a stage is reached
STAGE_RANKS = [("parts", 0), ("parts", 1), ("gathered", 0), ("manifest", 0), ("rotation", 0)]
MATRIX = [
    (stage, rank, victims, mode, store)
    for (stage, rank), victims, mode, store in itertools.product(
        STAGE_RANKS, ("stopped", "all", "other"), ("sync", "async"), ("local", "s3")
    )
]
SAMPLE = [
    ("parts", 0, "stopped", "sync", "local"),
    ("parts", 1, "all", "async", "s3"),
    ("gathered", 0, "stopped", "async", "s3"),
    ("manifest", 0, "all", "sync", "local"),
    ("rotation", 0, "all", "async", "local"),
    ("gathered", 0, "other", "sync", "local"),
]


@dataclass
class Target:
    """Where the run writes: its ``out_dir`` and storage options, and a store the test audits it through."""

    out_dir: str
    train_options: list[str]
    ckpt_options: list[str]
    store: Callable[[], CheckpointStore]
    directory: Path | None = None


def _target(kind: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str) -> Target:
    if kind == "local":
        run = tmp_path / "out" / "run"
        return Target("out/run", [], [], lambda: LocalStore(run), run)
    s3_location: S3LocationFactory = request.getfixturevalue("s3_location")
    location = s3_location(prefix)
    endpoint = location.storage_options.endpoint_url
    options = sets(storage_options__endpoint_url=endpoint, storage_options__max_attempts=2)
    return Target(f"s3://{location.root}", options, ["-o", f"endpoint_url={endpoint}"], lambda: open_store(location))


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"
    except OSError:
        return False


def _kill_at(cwd: Path, target: Target, stage: str, rank: int, victims: str, async_save: bool) -> None:
    """Run until rank ``rank`` stops at ``stage``; SIGKILL it (``victims="stopped"``), every rank, or the
    others (``"other"``: then it goes on)."""
    args = ["train", *RUN, *target.train_options]
    args += sets(out_dir=target.out_dir, max_iters=1000, checkpointing__async_save=async_save)
    env = launcher_env({STOP_AT_VARIABLE: f"{stage}:{rank}:{STOPS[stage]}"})
    agent = subprocess.Popen(
        torchrun_command(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        workers: dict[int, int] = {}
        while not (rank in workers and _stopped(workers[rank])):
            assert agent.poll() is None, agent.communicate()[0]
            assert time.monotonic() < deadline, f"rank {rank} never stopped at {stage}"
            time.sleep(0.02)
            workers = worker_pids(agent.pid)
        for victim, pid in workers.items():
            if victims == "all" or (victim == rank) == (victims == "stopped"):
                os.kill(pid, signal.SIGKILL)
        if victims == "other":
            time.sleep(0.5)  # torchrun has seen the death and sent its SIGTERM: the stopped rank gets it on waking
            os.kill(workers[rank], signal.SIGCONT)
        agent.communicate(timeout=90)  # torchrun tears the group down (the survivor gets its SIGTERM)
        assert agent.returncode != 0
    finally:
        cleanup(agent)


def _audit(cwd: Path, target: Target, expected: list[list[str]]) -> tuple[list[str], list[str]]:
    """One of ``expected`` is visible, each complete and sound; ``ckpt verify`` exits 0 listing the leftovers."""
    manager = CheckpointManager(target.store())
    assert not [obj.name for obj in manager.store.list() if obj.name.startswith(TEMP_PREFIX)]
    infos = manager.checkpoints()
    visible = sorted(info.filename for info in infos)
    assert visible in [sorted(names) for names in expected], visible
    for info in infos:
        assert info.world_size == 2, info  # never a manifest without its complete set of parts
        manager.verify(info.filename)
    leftovers = sorted(obj.name for obj in manager.leftovers())
    verified = run_cli(["ckpt", "verify", target.out_dir, *target.ckpt_options], cwd)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for name in leftovers:
        assert f"left {name}:" in verified.stdout
    return visible, leftovers


def _restart(cwd: Path, target: Target, newest: int) -> None:
    args = ["train", *RUN, *target.train_options, *sets(out_dir=target.out_dir, max_iters=newest + 2)]
    resumed = torchrun(args, cwd)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from iteration {newest} " in rank_text(resumed, 0)
    manager = CheckpointManager(target.store())
    assert manager.leftovers() == []  # the writer removed them when it took the lease
    if target.directory is not None:  # and the temporary of the killed rank's half-written part
        assert not [name for name in os.listdir(target.directory) if name.startswith(TEMP_PREFIX)]
    for info in manager.checkpoints():
        manager.verify(info.filename)


def run_case(
    case: tuple[str, int, str, str, str],
    cwd: Path,
    request: pytest.FixtureRequest,
    counts: dict[str, int],
    prefix: str = "run",
) -> None:
    stage, rank, victims, mode, store = case
    target = _target(store, cwd, request, prefix)
    _kill_at(cwd, target, stage, rank, victims, mode == "async")
    best = "ckpt_best_00000000_" + _best_metric(target)
    # the cut save never shows; a cut rotation's new checkpoint does
    expected = [[best, CUT]] if stage == "rotation" else [[best, "ckpt_last_00000002.pt"]]
    if victims == "other" and stage in ("gathered", "manifest"):  # the stopped rank went on: it may commit
        expected += [[best, CUT], [best, "ckpt_last_00000002.pt", CUT]]  # (rotation only when every rank agreed)
    visible, leftovers = _audit(cwd, target, expected)
    gone = "ckpt_last_00000002.pt" if stage == "rotation" else CUT
    assert leftovers or victims == "other"
    assert all(name.startswith(f"{gone}.part-") for name in leftovers), leftovers
    newest = 4 if CUT in visible else 2
    _restart(cwd, target, newest)
    label = f"{stage}@rank{rank} kill {victims} {mode} {store}: resumed from {newest}, {len(leftovers)} leftovers"
    counts[label] = counts.get(label, 0) + 1


def _best_metric(target: Target) -> str:
    """The best checkpoint's name after ``ckpt_best_00000000_`` (its metric depends only on the seed)."""
    names = [info.filename for info in CheckpointManager(target.store()).checkpoints()]
    best = [name for name in names if name.startswith("ckpt_best_00000000_")]
    assert len(best) == 1, names
    return best[0].removeprefix("ckpt_best_00000000_")


def _ids(case: tuple[Any, ...]) -> str:
    return "-".join(str(field) for field in case)


def _param(case: tuple[str, int, str, str, str]) -> Any:
    return pytest.param(case, id=_ids(case), marks=[pytest.mark.s3] if case[4] == "s3" else [])


@pytest.mark.parametrize("case", [_param(case) for case in SAMPLE])
def test_a_kill_at_a_stage_of_a_sharded_save_leaves_no_half_checkpoint(
    case: tuple[str, int, str, str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    counts: dict[str, int] = {}
    run_case(case, tmp_path, request, counts)
    assert sum(counts.values()) == 1


def test_the_ci_sample_covers_every_stage_victim_mode_and_store() -> None:
    assert set(SAMPLE) <= set(MATRIX)
    for field in range(5):
        assert {case[field] for case in SAMPLE} == {case[field] for case in MATRIX}, field
    assert len(MATRIX) == 60


@pytest.mark.sweep
@pytest.mark.s3
@pytest.mark.timeout(3600)  # 60 cases of two torchrun launches each
def test_the_whole_kill_matrix(tmp_path: Path, request: pytest.FixtureRequest, record_property: Any) -> None:
    counts: dict[str, int] = {}
    for index, case in enumerate(MATRIX):
        cwd = tmp_path / f"case{index}"
        cwd.mkdir()
        run_case(case, cwd, request, counts, prefix=f"run{index}")  # one bucket for the sweep: a prefix each
    record_property("sharded_kills", counts)
    assert len(counts) == len(MATRIX) == sum(counts.values()) == 60
