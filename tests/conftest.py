"""Shared fixtures: small real checkpoints, and an isolated environment for every test."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

import pytest
import torch

from ml_playground.checkpoint import Capabilities, Checkpoint, CheckpointStore, StoredObject

pytest_plugins = ["tests.servers"]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads the developer's AWS config or probes the instance-metadata address."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
    ):
        monkeypatch.delenv(name, raising=False)


def make_checkpoint(
    iter_num: int = 0,
    best_val_loss: float = 1.0,
    *,
    width: int = 8,
    seed: int = 0,
    ema: bool = False,
) -> Checkpoint:
    """A real model + AdamW state after one step, deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, width, generator=generator)).sum().backward()
    optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return Checkpoint(
        model=state,
        optimizer=optimizer.state_dict(),
        model_args={"width": width},
        iter_num=iter_num,
        best_val_loss=best_val_loss,
        config={"train": {"runtime": {"out_dir": "/tmp/run"}}},
        ema={k: v * 0.5 for k, v in state.items()} if ema else None,
        rng_state={"torch": torch.get_rng_state()},
        data_state={"position": iter_num},
    )


def awkward_checkpoint(base: Checkpoint) -> Checkpoint:
    """Tensors whose storages are shared, larger than the tensor, strided, empty, or of odd dtypes."""
    grid = torch.arange(24.0).reshape(4, 6)
    model = {
        **base.model,
        "tied": base.model["0.weight"],
        "grid": grid,
        "row_view": grid[2],  # a view into grid's storage at an offset
        "transposed": grid.t(),
        "column": grid[:, 1],  # strided, inside a shared storage
        "tail": grid[3, 2:],  # contiguous, ends where the storage does
        "scalar": torch.tensor(3.5),
        "strided": torch.arange(10, dtype=torch.int64)[::3],
        "empty": torch.empty(0, 4),
        "half": torch.linspace(-1, 1, 7).to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
    }
    return Checkpoint(
        model=model,
        optimizer=base.optimizer,
        model_args={},
        iter_num=3,
        best_val_loss=0.5,
        ema={**{key: value * 2 for key, value in base.model.items()}, "grid_rows": grid[1:3]},  # across sections
        rng_state=base.rng_state,
    )


@pytest.fixture
def checkpoint_factory() -> Callable[..., Checkpoint]:
    return make_checkpoint


def assert_same_checkpoint(a: Checkpoint, b: Checkpoint) -> None:
    assert a.iter_num == b.iter_num
    assert a.best_val_loss == b.best_val_loss
    assert dict(a.model_args) == dict(b.model_args)
    assert dict(a.config) == dict(b.config)
    assert dict(a.data_state) == dict(b.data_state)
    assert a.world_size == b.world_size
    assert a.shards == b.shards
    assert a.model.keys() == b.model.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    assert (a.ema is None) == (b.ema is None)
    if a.ema is not None and b.ema is not None:
        for key in a.ema:
            assert torch.equal(a.ema[key], b.ema[key]), key
    assert a.rng_state.keys() == b.rng_state.keys()
    for key in a.rng_state:
        assert torch.equal(a.rng_state[key], b.rng_state[key])
    state_a, state_b = a.optimizer["state"], b.optimizer["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key, value in state_a[index].items():
            assert torch.equal(value, state_b[index][key])
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def ctrl_c_enabled() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in this test even when the runner was started with SIGINT ignored.

    A shell starts background jobs (and so a CI script's pytest, possibly) with SIGINT ignored; Python
    then installs no handler and ``_thread.interrupt_main()`` does nothing.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def with_default_sigint() -> None:
    """``preexec_fn`` for a child that must see Ctrl-C: undo an inherited SIG_IGN before Python starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ProtocolOnlyStore:
    """A store with only the protocol's four verbs (like a remote one without local files or partial
    reads), over another store: it declares no capabilities."""

    def __init__(self, store: CheckpointStore) -> None:
        self._store = store

    @property
    def url(self) -> str:
        return self._store.url

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return self._store.write(name)

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return self._store.open(name)

    def list(self) -> list[StoredObject]:
        return self._store.list()

    def delete(self, name: str) -> None:
        self._store.delete(name)


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh TMPDIR for this test (temporary local copies land there)."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    return directory
