"""``ml-playground train`` under torchrun (world size 2, gloo on CPU): names, decisions, resume, shared out_dir.

Every comparison runs both sides with one OMP thread and the same launcher (tests/distributed_support.py).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointKind, CheckpointManager, LocalStore
from ml_playground.flows.distributed import SKEW_RANK_VARIABLE
from tests.cli_support import TINY, assert_same_state, ckpt_names, run_cli, sets
from tests.distributed_support import exit_codes, launcher_env, rank_text, single, torchrun, torchrun_command
from tests.servers import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

RUN = "out/run"
SHORT = [*TINY, *sets(out_dir=RUN, max_iters=8, eval_interval=4, checkpointing__interval=4)]
"""Every second step evaluates or saves: decisions, gathers and saves are exercised often."""
RESUMABLE = [*TINY, *sets(out_dir=RUN, eval_interval=4, checkpointing__interval=4, ema_decay=0.9)]
RESUMABLE += sets(train__model__dropout=0.1)


def _manager(cwd: Path) -> CheckpointManager:
    return CheckpointManager(LocalStore(cwd / RUN))


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in rank_text(result, 0) + rank_text(result, 1)
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One world-size-2 run of ``SHORT``, shared by the tests that only read it."""
    cwd = tmp_path_factory.mktemp("two-ranks")
    return cwd, _ok(torchrun(["train", *SHORT], cwd))


def test_torchrun_trains_and_writes_the_names_a_single_process_writes(
    two_ranks: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    cwd, result = two_ranks
    alone = _ok(single(["train", *SHORT], tmp_path))
    lasts = [n for n in ckpt_names(cwd / RUN) if n.startswith("ckpt_last_")]
    assert lasts == [n for n in ckpt_names(tmp_path / RUN) if n.startswith("ckpt_last_")]
    bests = [i.iter_num for i in _manager(cwd).checkpoints() if i.kind is CheckpointKind.BEST]
    assert bests == [i.iter_num for i in _manager(tmp_path).checkpoints() if i.kind is CheckpointKind.BEST]
    assert "2 processes" in rank_text(result, 0)
    assert rank_text(result, 1) == ""  # logs, progress and the summary come from rank 0 only
    assert "done: trained iterations 0..8" in alone.stdout
    latest = _manager(cwd).load_latest()
    assert latest.world_size == 2
    assert {"torch", "data", "torch.1", "data.1"} <= set(latest.rng_state)
    assert not any(key.startswith("module.") for key in latest.model)  # the unwrapped module's state dict


def test_sample_eval_and_ckpt_tools_read_a_torchrun_runs_checkpoints(
    two_ranks: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    cwd, _ = two_ranks
    best = _manager(cwd).best()
    assert best is not None
    for command in (["sample", "--from", RUN], ["ckpt", "verify", RUN]):
        _ok(run_cli([*command, *sets(sample__sample__max_new_tokens=5)] if command[0] == "sample" else command, cwd))
    evaluated = _ok(run_cli(["eval", "--from", RUN], cwd))
    # evaluation is replicated: rank 0's value is the metric, and eval reproduces it
    assert f"val loss {best.name.metric:.6f}" in evaluated.stdout
    shown = _ok(run_cli(["ckpt", "show", f"{RUN}/{best.filename}"], cwd))
    assert re.search(r"world size:\s+2\n", shown.stdout), shown.stdout


def test_every_rank_follows_rank_0_when_another_rank_sees_other_values(
    two_ranks: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    # the seam makes rank 1 see another metric, another plan at every evaluation and save, no resume point
    baseline, _ = two_ranks
    bounded = sets(train__runtime__distributed__timeout_s=60)
    skewed = _ok(torchrun(["train", *SHORT, *bounded], tmp_path, env={SKEW_RANK_VARIABLE: "1"}))
    assert "Traceback" not in skewed.stderr
    assert ckpt_names(tmp_path / RUN) == ckpt_names(baseline / RUN)
    for name in ckpt_names(baseline / RUN):
        assert_same_state(_manager(tmp_path).load(name), _manager(baseline).load(name))
    resumed = _ok(torchrun(["train", *SHORT, *bounded, *sets(max_iters=10)], tmp_path, env={SKEW_RANK_VARIABLE: "1"}))
    assert "resuming from iteration 8" in rank_text(resumed, 0)
    assert _manager(tmp_path).load_latest().iter_num == 10


def test_a_resume_at_the_same_world_size_is_bitwise_identical(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    _ok(torchrun(["train", *RESUMABLE, *sets(max_iters=12)], straight))
    _ok(torchrun(["train", *RESUMABLE, *sets(max_iters=6)], split))
    resumed = _ok(torchrun(["train", *RESUMABLE, *sets(max_iters=12)], split))
    assert "resuming from iteration 6" in rank_text(resumed, 0)
    assert "data order differs" not in rank_text(resumed, 0)
    assert ckpt_names(split / RUN) == ckpt_names(straight / RUN)
    assert_same_state(_manager(split).load_latest(), _manager(straight).load_latest())


def test_a_resume_at_another_world_size_works_and_says_so_once(tmp_path: Path) -> None:
    _ok(torchrun(["train", *RESUMABLE, *sets(max_iters=6)], tmp_path))
    grown = _ok(torchrun(["train", *RESUMABLE, *sets(max_iters=10)], tmp_path, nproc=3))  # rank 2 is new
    assert rank_text(grown, 0).count("data order differs") == 1
    assert _manager(tmp_path).load_latest().world_size == 3
    shrunk = _ok(single(["train", *RESUMABLE, *sets(max_iters=14)], tmp_path))
    assert shrunk.stdout.count("data order differs") == 1
    latest = _manager(tmp_path).load_latest()
    assert (latest.iter_num, latest.world_size) == (14, 1)


def _two_agents(cwds: tuple[Path, Path], args: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun agents (--nnodes 2, one process each) on loopback, started in ``cwds``."""
    port = free_port()
    logs = [cwd.parent / f"{cwd.name}-{port}.log" for cwd in cwds]
    agents = []
    for node, (cwd, log) in enumerate(zip(cwds, logs, strict=True)):
        rendezvous = ["--nnodes=2", f"--node-rank={node}", "--rdzv-backend=static", "--master-addr=127.0.0.1"]
        command = torchrun_command(args, nproc=1, launcher=[*rendezvous, f"--master-port={port}"])
        with log.open("w") as sink:  # files, not pipes: neither agent can block the other on a full pipe
            agents.append(subprocess.Popen(command, cwd=cwd, env=launcher_env(), stdout=sink, stderr=subprocess.STDOUT))
    try:
        codes = [agent.wait(timeout=180) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    return [
        subprocess.CompletedProcess(agent.args, code, log.read_text(), "")
        for agent, code, log in zip(agents, codes, logs, strict=True)
    ]


def test_a_multi_node_run_needs_one_shared_out_dir(tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    node_a.mkdir()
    node_b.mkdir()
    first, second = _two_agents((node_a, node_b), ["train", *SHORT])  # the same relative out_dir, two places
    text = " ".join([*rank_text(first, 0).split(), *rank_text(second, 0).split()])
    assert first.returncode != 0
    assert second.returncode != 0
    assert f"{node_b / RUN} is not the location rank 0 writes to" in text
    assert exit_codes(first) == {0: 1}
    assert exit_codes(second) == {1: 1}
    assert ckpt_names(node_a / RUN) == []
    assert not (node_b / RUN).exists() or ckpt_names(node_b / RUN) == []
    shared = [*SHORT, *sets(out_dir=str(tmp_path / "shared"))]
    ran = _two_agents((node_a, node_b), ["train", *shared])
    assert [r.returncode for r in ran] == [0, 0], "\n".join(r.stdout + r.stderr for r in ran)
    written = CheckpointManager(LocalStore(tmp_path / "shared")).load_latest()
    assert (written.iter_num, written.world_size) == (8, 2)
