"""Helpers for the torchrun tests: launch ``ml-playground train`` under torchrun (gloo, CPU), read each rank.

Every launch sets ``OMP_NUM_THREADS=1`` and the same launcher arguments, and so does every single-process
run compared bitwise with one (``single``): the two sides of a comparison run the same arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.cli_support import cli_env

LAUNCH_TIMEOUT = 240.0


def launcher_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def torchrun_command(args: Sequence[str], *, nproc: int = 2, launcher: Sequence[str] = ()) -> list[str]:
    rendezvous = list(launcher) or ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={nproc}",
        "--tee=3",
        "--monitor-interval=0.1",
        "-m",
        "ml_playground",
        *args,
    ]


def torchrun(
    args: Sequence[str],
    cwd: Path,
    *,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    launcher: Sequence[str] = (),
    timeout: float = LAUNCH_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node N -m ml_playground ARGS`` in ``cwd``; every rank's output tee'd."""
    return subprocess.run(
        torchrun_command(args, nproc=nproc, launcher=launcher),
        cwd=cwd,
        env=launcher_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def single(args: Sequence[str], cwd: Path, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m ml_playground ARGS`` with the environment torchrun's workers get (one OMP thread)."""
    return subprocess.run(
        [sys.executable, "-m", "ml_playground", *args],
        cwd=cwd,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def rank_lines(result: subprocess.CompletedProcess[str], rank: int) -> list[str]:
    """What rank ``rank`` printed (stdout and stderr), from torchrun's ``--tee`` prefixes."""
    prefix = f"[default{rank}]:"
    text = result.stdout + result.stderr
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


def rank_text(result: subprocess.CompletedProcess[str], rank: int) -> str:
    """Rank ``rank``'s output with wrapped lines joined (error messages are wrapped at 100 columns)."""
    return " ".join(rank_lines(result, rank))


def exit_codes(result: subprocess.CompletedProcess[str]) -> dict[int, int]:
    """Each failed rank's exit code, from torchrun's failure report (ranks that exited 0 are absent)."""
    report = result.stdout + result.stderr
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", report)
    return {int(rank): int(code) for rank, code in found}


def worker_pids(agent_pid: int) -> dict[int, int]:
    """The rank -> pid of the workers the torchrun agent ``agent_pid`` started (read from /proc)."""
    workers: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) != agent_pid:
            continue
        values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in values and b"TORCHELASTIC_RUN_ID" in values:
            workers[int(values[b"RANK"])] = int(entry.name)
    return workers


def cleanup(process: subprocess.Popen[str]) -> None:
    """Kill a launched torchrun and its workers, whatever state they are in."""
    for pid in worker_pids(process.pid).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.wait(30)
