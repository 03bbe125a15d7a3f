"""SIGTERM at chosen points of a run (tests/preempt_driver.py sends it from inside, where the point is):
exit 143 with a ``last`` checkpoint where the run stopped (0 when the signal lands in the final evaluation or
save), and the resumed run ends with the state an uninterrupted run ends with, bit for bit.

CI runs 11 points; ``pytest -m sweep`` runs 50 more, chosen at random, and docs/reliability.md quotes its counts.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointManager, LocalStore
from tests.cli_support import TINY, assert_same_state, ckpt_names, cli_env, run_cli, sets
from tests.distributed_support import cleanup, launcher_env, rank_text, torchrun, torchrun_command, worker_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_ITERS = 16
BASE = [*TINY, *sets(out_dir="run", max_iters=MAX_ITERS, eval_interval=4, checkpointing__interval=4)]
BASE += sets(ema_decay=0.9, train__model__dropout=0.1, checkpointing__keep__last=2, checkpointing__keep__best=2)
SAVES = [0, 4, 8, 12, 16]  # every evaluation and last save; a best save when the metric improves
SWEEP_POINTS = 50


def _args(async_save: bool, *extra: str) -> list[str]:
    return ["train", *BASE, *sets(checkpointing__async_save=async_save), *extra]


def _driven(cwd: Path, point: str, iteration: int, args: list[str], *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.preempt_driver", point, str(iteration), *flags, "--", *args]
    root = Path(__file__).resolve().parents[2]
    env = {**cli_env(), "PYTHONPATH": f"{root}:{cli_env().get('PYTHONPATH', '')}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """An uninterrupted run, synchronous and asynchronous saves."""
    runs = {}
    for async_save in (False, True):
        cwd = tmp_path_factory.mktemp("async" if async_save else "sync")
        done = run_cli(_args(async_save), cwd)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[async_save] = cwd / "run"
    return runs


def _expected_stop(point: str, iteration: int) -> int:
    """A single process stops at the first iteration boundary after the signal (at it, for ``boundary``)."""
    return iteration if point == "boundary" else iteration + 1


def _check_point(cwd: Path, reference: Path, point: str, iteration: int, async_save: bool) -> str:
    stopped = _driven(cwd, point, iteration, _args(async_save))
    output = stopped.stdout + stopped.stderr
    assert "Traceback" not in output, output
    stop = _expected_stop(point, iteration)
    if stop > MAX_ITERS or (iteration == MAX_ITERS and point in ("evaluation", "save", "async-save")):
        assert stopped.returncode == 0, output  # the final evaluation or save: the run completes
        outcome = "completed"
    else:
        assert stopped.returncode == 143, output
        found = re.search(r"stopped at iteration (\d+) on SIGTERM", stopped.stdout)
        assert found is not None, output
        assert int(found.group(1)) == stop, output
        assert f"ckpt_last_{stop:08d}.pt" in ckpt_names(cwd / "run"), ckpt_names(cwd / "run")
        resumed = run_cli(_args(async_save), cwd)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"resuming from iteration {stop} " in resumed.stdout
        outcome = "stopped"
    names, wanted = ckpt_names(cwd / "run"), ckpt_names(reference)
    # the same best checkpoints and the same newest last one (a forced last at the stop counts against keep.last)
    assert [n for n in names if "best" in n] == [n for n in wanted if "best" in n]
    assert [n for n in names if "last" in n][-1] == [n for n in wanted if "last" in n][-1]
    latest = CheckpointManager(LocalStore(cwd / "run")).load_latest()
    assert_same_state(latest, CheckpointManager(LocalStore(reference)).load_latest())
    return outcome


CI_POINTS = [
    ("boundary", 0, False),
    ("boundary", 6, False),
    ("step", 9, False),
    ("step", 3, True),
    ("evaluation", 8, False),
    ("save", 4, False),
    ("async-save", 8, True),
    ("async-save", 12, True),
    ("evaluation", 16, False),
    ("save", 16, False),
    ("async-save", 16, True),
]


@pytest.mark.parametrize(("point", "iteration", "async_save"), CI_POINTS)
def test_sigterm_stops_saves_where_it_stopped_and_the_resume_is_bitwise_identical(
    tmp_path: Path, reference: dict[bool, Path], point: str, iteration: int, async_save: bool
) -> None:
    _check_point(tmp_path, reference[async_save], point, iteration, async_save)


def test_a_real_sigterm_at_a_random_moment_behaves_the_same(tmp_path: Path, reference: dict[bool, Path]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_playground", *_args(False, *sets(max_iters=2000))],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # the handler is in place by the first save (a SIGTERM during start-up kills the process, as for any program)
    deadline = time.monotonic() + 120
    while "ckpt_last_00000000.pt" not in (ckpt_names(tmp_path / "run") if (tmp_path / "run").exists() else []):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "the run made no first checkpoint in 120 s"
        time.sleep(0.05)
    time.sleep(random.Random(15).uniform(0.5, 2.0))
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, out + err
    stop = int(re.search(r"stopped at iteration (\d+) on SIGTERM", out).group(1))  # type: ignore[union-attr]
    assert f"ckpt_last_{stop:08d}.pt" in ckpt_names(tmp_path / "run")
    resumed = run_cli(_args(False, *sets(max_iters=stop + 4)), tmp_path, timeout=300)
    assert f"resuming from iteration {stop} " in resumed.stdout
    assert resumed.returncode == 0


def test_a_second_sigterm_aborts_the_save_cleanly(tmp_path: Path) -> None:
    CheckpointManager(LocalStore(tmp_path / "run", create=True))  # so the run's files can be listed
    stopped = _driven(tmp_path, "save", 8, _args(False), "second")
    assert stopped.returncode == 143, stopped.stdout + stopped.stderr
    assert "stopped by a second SIGTERM; every checkpoint written so far is intact" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    names = ckpt_names(tmp_path / "run")
    assert not any(name.startswith(("ckpt_last_00000008", "ckpt_last_00000009")) for name in names)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".ckpt-partial.")]
    manager = CheckpointManager(LocalStore(tmp_path / "run"))
    for info in manager.checkpoints():
        manager.verify(info.filename)
    resumed = run_cli(_args(False), tmp_path)
    assert resumed.returncode == 0


def test_without_save_on_sigterm_the_run_stops_at_once_with_exit_143(tmp_path: Path) -> None:
    stopped = _driven(tmp_path, "step", 6, _args(False, *sets(checkpointing__save_on_sigterm=False)))
    assert stopped.returncode == 143, stopped.stdout + stopped.stderr
    assert "stopped by SIGTERM (save_on_sigterm = false)" in stopped.stderr
    assert ckpt_names(tmp_path / "run")[-1] == "ckpt_last_00000004.pt"


def test_keep_last_zero_stops_without_a_save_and_says_so(tmp_path: Path) -> None:
    stopped = _driven(tmp_path, "step", 6, _args(False, *sets(checkpointing__keep__last=0)))
    assert stopped.returncode == 143, stopped.stdout + stopped.stderr
    assert "stopped at iteration 7 on SIGTERM; keep.last = 0, so no checkpoint was saved there" in stopped.stdout
    assert not [name for name in ckpt_names(tmp_path / "run") if name.startswith("ckpt_last_")]


@pytest.mark.sweep
def test_sigterm_sweep_at_random_points(tmp_path: Path, reference: dict[bool, Path], record_property: object) -> None:
    rng = random.Random(20261205)
    outcomes: dict[str, int] = {}
    for index in range(SWEEP_POINTS):
        point = rng.choice(["boundary", "step", "evaluation", "save", "async-save"])
        # "save" is the synchronous save's write (in the main thread): an async run never reaches it
        async_save = point == "async-save" or (rng.random() < 0.3 and point != "save")
        if point in ("evaluation", "save", "async-save"):
            iteration = rng.choice(SAVES if point != "evaluation" else [0, 4, 8, 12, 16])
        else:
            iteration = rng.randrange(0, MAX_ITERS)
        case = tmp_path / f"point{index}"
        case.mkdir()
        outcome = _check_point(case, reference[async_save], point, iteration, async_save)
        key = f"{point} {'async' if async_save else 'sync'} {outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
    record_property("sigterm_sweep", outcomes)  # type: ignore[operator]
    assert sum(outcomes.values()) == SWEEP_POINTS


def _driver_command(point: str, iteration: int, args: list[str]) -> list[str]:
    """torchrun running tests.preempt_driver (which runs ``ml-playground ARGS``) on every rank."""
    command = torchrun_command([], nproc=2)
    at = command.index("ml_playground")
    command[at : at + 1] = ["tests.preempt_driver", point, str(iteration), "--", *args]
    return command


def _driven_torchrun(
    cwd: Path, point: str, iteration: int, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    full_env = launcher_env({**env, "PYTHONPATH": f"{root}:{cli_env().get('PYTHONPATH', '')}"})
    command = _driver_command(point, iteration, args)
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.distributed
def test_under_torchrun_the_ranks_agree_where_to_stop_and_every_worker_exits_143(tmp_path: Path) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir()
    stopped.mkdir()
    done = torchrun(_args(False), straight)
    assert done.returncode == 0, done.stdout + done.stderr
    # only rank 1 gets the signal (in its step 9); both must stop at the same boundary
    signalled = _driven_torchrun(stopped, "step", 9, _args(False), {"SIGTERM_RANK": "1", "EXIT_DIR": str(stopped)})
    output = signalled.stdout + signalled.stderr
    assert (stopped / "exit-0").read_text() == "143", output
    assert (stopped / "exit-1").read_text() == "143", output
    found = re.search(r"stopped at iteration (\d+) on SIGTERM", rank_text(signalled, 0))
    assert found is not None, output
    stop = int(found.group(1))
    assert 10 <= stop <= 11  # the vote started before step 10 carries rank 1's signal
    assert f"ckpt_last_{stop:08d}.pt" in ckpt_names(stopped / "run")
    resumed = torchrun(_args(False), stopped)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    latest = CheckpointManager(LocalStore(stopped / "run")).load_latest()
    assert_same_state(latest, CheckpointManager(LocalStore(straight / "run")).load_latest())


def _settled_names(run: Path, quiet_s: float = 2.0) -> list[str]:
    """The names once nothing changed for ``quiet_s``: a save rank 0 began before rank 1 stopped may still finish."""
    names, since = ckpt_names(run), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        now = ckpt_names(run)
        if now != names:
            names, since = now, time.monotonic()
    return names


@pytest.mark.distributed
def test_under_torchrun_a_rank_gone_at_preemption_means_no_save_and_exit_143(tmp_path: Path) -> None:
    bounded = sets(train__runtime__distributed__timeout_s=15, train__runtime__distributed__preempt_timeout_s=3)
    args = _args(False, *sets(max_iters=100000), *bounded)
    command = _driver_command("none", -1, args)
    root = Path(__file__).resolve().parents[2]
    env = launcher_env({"EXIT_DIR": str(tmp_path), "PYTHONPATH": f"{root}:{cli_env().get('PYTHONPATH', '')}"})
    agent = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run").exists() or len(ckpt_names(tmp_path / "run")) < 2:
            assert time.monotonic() < deadline, "the run saved nothing in 120 s"
            time.sleep(0.05)
        workers = worker_pids(agent.pid)
        os.kill(workers[1], signal.SIGSTOP)  # rank 1 is stuck: it can neither vote nor train
        before = _settled_names(tmp_path / "run")
        os.kill(workers[0], signal.SIGTERM)
        out, _ = agent.communicate(timeout=120)
    finally:
        cleanup(agent)
    rank0 = " ".join(line.split(":", 1)[1] for line in out.splitlines() if line.startswith("[default0]:"))
    assert "stopped by SIGTERM; another rank is gone, so nothing was saved" in rank0, out
    assert "Traceback" not in rank0
    assert (tmp_path / "exit-0").read_text() == "143", out
    assert ckpt_names(tmp_path / "run") == before
