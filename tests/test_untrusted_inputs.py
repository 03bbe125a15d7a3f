"""Issue 17 beyond the corpus: run directories never lead outside, names, plain tensors, bounds, settings."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, LocalStore, decode, encode
from ml_playground.checkpoint._naming import CheckpointName, format_metric
from ml_playground.errors import CheckpointError, CheckpointNameError
from ml_playground.workload.model import GPT, GPTArgs
from tests.cli_support import TINY, run_main, sets
from tests.conftest import make_checkpoint

HOST_TAG = hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    return outside


def _train(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> int:
    args = ["train", *TINY, *sets(max_iters=2, eval_interval=1), "--set", f"train.runtime.out_dir={run}", *extra]
    return run_main(args, tmp_path, capsys).returncode


def test_symlinks_planted_for_every_name_train_creates_lead_nowhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside, run = _outside(tmp_path), tmp_path / "run"
    run.mkdir()
    planted = {
        ".ml_playground.lease.guard": outside / "guard",
        ".ml_playground.lease": outside / "lease",
        f".ckpt-partial.{HOST_TAG}.{os.getpid()}.probe": outside / "probe",  # the probe's old, predictable name
        f".ml_playground.lease.{os.getpid()}.tmp": outside / "lease-temp",
    }
    for name, target in planted.items():
        (run / name).symlink_to(target)
    assert _train(run, tmp_path, capsys) == 1  # the guard is never opened through a symlink
    (run / ".ml_playground.lease.guard").unlink()
    assert _train(run, tmp_path, capsys) == 1  # a lease that is a symlink is not a lease: named, refused
    assert _train(run, tmp_path, capsys, "--take-over") == 0  # replaced (the link itself, not its target)
    assert not (run / ".ml_playground.lease").exists()  # released at the end
    assert list(outside.iterdir()) == []
    for done in run.glob("ckpt_*"):
        done.unlink()
    for name in ("ckpt_last_00000000.pt", "ckpt_last_00000001.pt", "ckpt_last_00000002.pt"):
        (run / name).symlink_to(outside / name)  # a final name planted as a link: refused, never written through
    assert _train(run, tmp_path, capsys) == 1
    assert list(outside.iterdir()) == []


def test_a_directory_named_like_a_stale_temporary_is_reported_and_never_fails_a_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".ckpt-partial.{HOST_TAG}.{dead.stdout.strip()}.x"
    leftover.mkdir()
    (tmp_path / f".ckpt-partial.{HOST_TAG}.{'9' * 30}.x").write_bytes(b"")  # no pid at all: left alone
    manager = CheckpointManager(LocalStore(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert manager.save_last(make_checkpoint(1)) is not None
    assert leftover.is_dir()
    assert "is not a file; left alone" in caplog.text


def test_negative_zero_is_never_written_and_each_file_is_its_own_checkpoint(tmp_path: Path) -> None:
    assert format_metric(-0.0) == format_metric(-1e-9) == "0.000000"
    assert CheckpointName.best(3, -0.0).filename == "ckpt_best_00000003_0.000000.pt"
    for text in ("-0.000000", "0.000000"):  # an older version wrote the first
        with open(tmp_path / f"ckpt_best_00000000_{text}.pt", "wb") as stream:
            encode(make_checkpoint(0, best_val_loss=float(text)), stream)
    manager = CheckpointManager(LocalStore(tmp_path), KeepPolicy(last=0, best=1), mode="max")
    assert len(manager.checkpoints()) == 2
    manager.save_best(make_checkpoint(1, best_val_loss=1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_best_00000001_1.000000.pt"]


@pytest.mark.timeout(20)
def test_over_long_and_special_names_are_clear_errors(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(CheckpointNameError, match="300 bytes long"):
        store.local_path("x" * 300)
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="a FIFO, not a regular file"):
        decode(tmp_path / "fifo.pt", source="fifo.pt")  # no hang: the open never blocks


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        (torch.zeros(1).expand(10), "stride 0"),
        (torch.sparse_coo_tensor([[0]], [1.0], (4,), check_invariants=True), "sparse"),
        (torch.empty(3, device="meta"), "meta tensor"),
        (torch.zeros(4).as_strided((3, 2), (1, 1)), "overlapping strides"),
    ],
)
def test_a_tensor_that_is_not_plain_is_refused_before_anything_is_written(
    tmp_path: Path, tensor: torch.Tensor, problem: str
) -> None:
    manager = CheckpointManager(LocalStore(tmp_path))
    with pytest.raises(CheckpointError, match=problem):
        manager.save_last(Checkpoint(model={"w": tensor}, optimizer={}, model_args={}, iter_num=1, best_val_loss=1.0))
    assert list(tmp_path.iterdir()) == []


def test_shared_small_tuples_of_a_real_optimizer_stay_within_the_budget(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2000)]
    optimizer = torch.optim.AdamW([{"params": [p]} for p in params], betas=(0.9, 0.95))  # 2,000 groups, one tuple
    checkpoint = Checkpoint(model={}, optimizer=optimizer.state_dict(), model_args={}, iter_num=0, best_val_loss=1.0)
    manager = CheckpointManager(LocalStore(tmp_path))
    manager.save_last(checkpoint)
    loaded = manager.load("ckpt_last_00000000.pt")
    assert loaded.optimizer["param_groups"][1999]["betas"] == (0.9, 0.95)


def test_a_view_with_gaps_is_plain_and_round_trips(tmp_path: Path) -> None:
    gapped = torch.arange(24.0).reshape(4, 6)[:, ::2]
    manager = CheckpointManager(LocalStore(tmp_path))
    manager.save_last(Checkpoint(model={"w": gapped}, optimizer={}, model_args={}, iter_num=1, best_val_loss=1.0))
    assert torch.equal(manager.load("ckpt_last_00000001.pt").model["w"], gapped)


def test_the_parameter_shapes_are_the_models_own() -> None:
    for bias in (True, False):
        args = GPTArgs(7, 3, 2, 8, 5, 0.0, bias)
        assert {k: tuple(v.shape) for k, v in GPT(args).state_dict().items()} == args.parameter_shapes()


def test_a_vanishing_temperature_samples_greedily() -> None:
    torch.manual_seed(0)
    model = GPT(GPTArgs(11, 1, 2, 8, 8, 0.0, True)).eval()
    idx = torch.tensor([[1]])
    greedy = model.generate(idx, 5, temperature=1e-300, generator=torch.Generator().manual_seed(1))
    expected = idx
    for _ in range(5):
        expected = torch.cat([expected, model(expected)[0][:, -1, :].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("train.model.n_embd=1000000", "train.model.n_embd"),
        ("train.data.batch_size=1000000000", "train.data.batch_size"),
    ],
)
def test_a_model_or_batch_too_large_for_this_machine_is_a_settings_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, key: str
) -> None:
    result = run_main(
        ["train", *TINY, "--set", setting, "--set", f"train.runtime.out_dir={tmp_path}"], tmp_path, capsys
    )
    assert result.returncode == 2, result.stderr
    flat = " ".join(result.stderr.split())
    assert "error:" in flat
    assert key in flat
    assert "bytes" in flat
    assert list(tmp_path.glob("ckpt_*")) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("hostile", ["3^16", "5000-deep"])
def test_a_tree_beyond_the_budget_or_depth_is_refused_in_bounded_time(tmp_path: Path, hostile: str) -> None:
    from tests.faults.test_hostile_files import _body
    from tests.hostile_corpus import deep_list, shared_tuples

    value = shared_tuples(16) if hostile == "3^16" else deep_list(5000)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # torch.save's pickler recurses per level
    try:
        torch.save({**_body(value), "integrity": {}}, tmp_path / "f.pt")
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError, match="more than .* values|nests containers more than 100 deep"):
        decode(tmp_path / "f.pt", source="f.pt")
