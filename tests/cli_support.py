"""Helpers for the end-to-end tests: run the real ``ml-playground`` CLI in a subprocess, tiny settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground.checkpoint import Checkpoint
from ml_playground.cli import main

# a model and data small enough that a few dozen iterations take well under a second
TINY: tuple[str, ...] = (
    "--set", "train.model.n_layer=1",
    "--set", "train.model.n_head=2",
    "--set", "train.model.n_embd=16",
    "--set", "train.model.block_size=16",
    "--set", "train.data.batch_size=4",
    "--set", "train.data.corpus_chars=20000",
    "--set", "train.runtime.eval_iters=2",
    "--set", "train.runtime.log_interval=1000",
)  # fmt: skip


def sets(**values: object) -> list[str]:
    """``--set`` arguments from ``key__sub=value`` keywords: ``max_iters=5`` -> train.runtime.max_iters=5."""
    out: list[str] = []
    for key, value in values.items():
        dotted = key.replace("__", ".")
        if not dotted.startswith(("train.", "sample.")):
            dotted = f"train.runtime.{dotted}"
        literal = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{dotted}={literal}"]
    return out


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.pop("COLUMNS", None)
    return env


def run_cli(args: Sequence[str], cwd: Path, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m ml_playground ARGS`` in ``cwd``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "ml_playground", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A user error: the exit code, a message naming ``needles``, and never a traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    assert "error:" in result.stderr, output
    flat = " ".join(output.split())  # messages are wrapped into one paragraph
    for needle in needles:
        assert needle in flat, (needle, output)


def assert_quiet_success(result: subprocess.CompletedProcess[str]) -> None:
    """Exit 0 with no traceback and no Python warning (e.g. torch's "Failed to initialize NumPy")."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output, output
    assert re.search(r"\b\w*Warning\b", result.stderr) is None, result.stderr


def run_main(args: Sequence[str], cwd: Path, capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """``main(ARGS)`` in this process (for the quick checks); same result shape as :func:`run_cli`."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(previous)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def ckpt_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("ckpt_"))


def assert_same_state(a: Checkpoint, b: Checkpoint) -> None:
    """Every tensor and training-state field equal, bit for bit (``config`` may differ: e.g. max_iters)."""
    assert a.iter_num == b.iter_num
    assert a.best_val_loss == b.best_val_loss
    assert dict(a.model_args) == dict(b.model_args)
    assert dict(a.data_state) == dict(b.data_state)
    _same_tensors(a.model, b.model)
    _same_tensors(a.rng_state, b.rng_state)
    assert (a.ema is None) == (b.ema is None)
    if a.ema is not None and b.ema is not None:
        _same_tensors(a.ema, b.ema)
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    state_a, state_b = a.optimizer["state"], b.optimizer["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        _same_tensors(state_a[index], state_b[index])


def _same_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        other = b[key]
        assert isinstance(value, torch.Tensor) == isinstance(other, torch.Tensor), key
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype, key
            assert value.shape == other.shape, key
            assert torch.equal(value, other), key
        else:
            assert value == other, key


def flip_tensor_byte(path: Path) -> bytes:
    """Flip one bit inside the stored bytes of the model's embedding: damage that only our checksums see.

    (A flip in the zip's own bookkeeping may leave the loaded content identical; this one never does.)
    Returns the damaged file's bytes and writes them to ``path``.
    """
    payload = torch.load(path, weights_only=True)
    raw = payload["model"]["wte.weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert at >= 0, "the tensor's bytes are stored verbatim in the archive"
    data[at + len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)
