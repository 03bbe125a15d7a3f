"""Hostile files: a checkpoint crafted to run code when unpickled is refused and never runs.

Each payload, if it ever ran, would create a sentinel file; every test asserts it never appears.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground.checkpoint import FORMAT_VERSION, CheckpointManager, LocalStore, decode
from ml_playground.checkpoint.format import FORMAT_MAGIC, integrity_record
from ml_playground.errors import CheckpointCorruptError, CheckpointError, CheckpointSchemaError, UnsafeCheckpointError
from tests.conftest import make_checkpoint


class TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(sentinel)``: code execution, if a loader allowed it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.sentinel),))


class SystemOnUnpickle:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (os.system, (f"touch {self.sentinel}",))


@dataclasses.dataclass
class UserClass:
    """A harmless class of the user's own: still not plain data, still refused."""

    value: int


def _body(config_value: object) -> dict[str, Any]:
    """A checkpoint payload that looks like ours, with ``config_value`` in its metadata."""
    return {
        "format": FORMAT_MAGIC,
        "format_version": FORMAT_VERSION,
        "meta": {
            "iter_num": 5,
            "best_val_loss": 1.0,
            "model_args": {},
            "config": {"x": config_value},
            "data_state": {},
            "world_size": 1,
        },
        "model": {"w": torch.ones(4)},
        "optimizer": {},
        "ema": None,
        "rng_state": {},
    }


def _hostile_files(sentinel: Path) -> dict[str, bytes]:
    def saved(obj: object) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    return {
        "reduce-at-top": saved(TouchOnUnpickle(sentinel)),
        "reduce-in-metadata": saved(_body(TouchOnUnpickle(sentinel))),
        "os-system-in-model": saved({**_body(1), "model": {"w": SystemOnUnpickle(sentinel)}}),
        "raw-pickle": pickle.dumps({"format": FORMAT_MAGIC, "x": TouchOnUnpickle(sentinel)}, protocol=2),
        "raw-pickle-protocol-5": pickle.dumps(TouchOnUnpickle(sentinel), protocol=5),
        "callable-in-metadata": saved(_body(print)),
        "custom-class-in-metadata": saved(_body(UserClass(1))),
    }


HOSTILE_KINDS = sorted(_hostile_files(Path("/x")))
# A bare pickle is not a torch.save (zip) archive: it is refused as not a checkpoint before any
# unpickling. Either way nothing ran.
REFUSED_AS = {
    kind: CheckpointCorruptError if kind.startswith("raw-") else UnsafeCheckpointError for kind in HOSTILE_KINDS
}


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "SENTINEL-code-ran"


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_a_hostile_checkpoint_is_refused_by_every_loading_path(run_dir: Path, sentinel: Path, kind: str) -> None:
    manager = CheckpointManager(LocalStore(run_dir, create=True))
    manager.save_last(make_checkpoint(1))
    name = "ckpt_last_00000005.pt"
    (run_dir / name).write_bytes(_hostile_files(sentinel)[kind])

    attempts: list[Callable[[], object]] = [
        manager.load_latest,
        lambda: manager.load(name),
        lambda: manager.load(name, verify=False),
    ]
    for attempt in attempts:
        with pytest.raises(REFUSED_AS[kind], match=name):
            attempt()
    for verify in (True, False):
        with (run_dir / name).open("rb") as stream, pytest.raises(REFUSED_AS[kind], match="hostile.pt"):
            decode(stream, source="hostile.pt", verify=verify)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("value", "verified_error"),
    [
        (torch.float32, UnsafeCheckpointError),
        (torch.device("cpu"), UnsafeCheckpointError),
        ({1, 2}, UnsafeCheckpointError),
        (1j, UnsafeCheckpointError),
        (b"bytes", UnsafeCheckpointError),
        (torch.nn.Parameter(torch.ones(1)), CheckpointSchemaError),  # a tensor, where metadata allows none
    ],
    ids=["dtype", "device", "set", "complex", "bytes", "parameter"],
)
def test_metadata_that_unpickles_but_is_not_plain_data_is_refused(
    run_dir: Path, value: object, verified_error: type[CheckpointError]
) -> None:
    # torch's weights-only unpickler allows these types, and the integrity record is even valid:
    # our own plain-data check must refuse them.
    body = _body(value)
    body["integrity"] = integrity_record(body)
    run_dir.mkdir()
    with (run_dir / "ckpt_last_00000005.pt").open("wb") as handle:
        torch.save(body, handle)
    manager = CheckpointManager(LocalStore(run_dir))
    with pytest.raises(verified_error, match=r"ckpt_last_00000005\.pt: .*config\.x holds a"):
        manager.load_latest()
    with pytest.raises(CheckpointSchemaError, match=r"config\.x holds a"):
        manager.load_latest(verify=False)


_SUBPROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ml_playground.checkpoint import CheckpointManager, LocalStore
    from ml_playground.errors import CheckpointError
    try:
        CheckpointManager(LocalStore(Path(sys.argv[1]))).load_latest()
    except CheckpointError as exc:
        print(type(exc).__name__)
    else:
        print("LOADED")
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variable", ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD"])
def test_torch_environment_variables_do_not_loosen_our_loading(run_dir: Path, sentinel: Path, variable: str) -> None:
    run_dir.mkdir()
    (run_dir / "ckpt_last_00000005.pt").write_bytes(_hostile_files(sentinel)["reduce-in-metadata"])
    env = {**os.environ, variable: "1", "AWS_EC2_METADATA_DISABLED": "true"}
    result = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, str(run_dir)], capture_output=True, text=True, env=env, timeout=100
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "UnsafeCheckpointError"
    assert not sentinel.exists()


def test_the_error_for_a_hostile_file_says_what_to_do(run_dir: Path, sentinel: Path) -> None:
    run_dir.mkdir()
    (run_dir / "ckpt_last_00000005.pt").write_bytes(_hostile_files(sentinel)["reduce-in-metadata"])
    with pytest.raises(CheckpointError) as caught:
        CheckpointManager(LocalStore(run_dir)).load_latest()
    message = str(caught.value)
    assert "refused without running any of its code" in message
    assert "Only load checkpoints written by ml_playground" in message
    assert not sentinel.exists()
