"""Sharded checkpoints (``strategy = "fsdp"``): training under torchrun and alone, resharding, the tools.

Resharding is checked on the gathered state: a state saved at world size N (tests/sharded_driver.py) and
loaded at world size M equals, gathered in full, the state that was saved, bit for bit; so does the
checkpoint read in one process without torch.distributed (what sample, eval and the ckpt tools read).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground.checkpoint import Checkpoint, CheckpointManager, LocalStore
from tests.cli_support import TINY, assert_same_state, ckpt_names, run_cli, sets
from tests.distributed_support import launcher_env, rank_text, single, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

RUN = "out/run"
DDP = [*TINY, *sets(out_dir=RUN, eval_interval=4, checkpointing__interval=4, ema_decay=0.9)]
DDP += sets(train__model__dropout=0.1, train__model__n_layer=2)
FSDP = [*DDP, *sets(distributed__strategy="fsdp")]
DRIVER = Path(__file__).with_name("sharded_driver.py")


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    assert "Warning" not in text  # no warning of torch.distributed.checkpoint's reaches the user
    return result


def _manager(cwd: Path, run: str = RUN) -> CheckpointManager:
    return CheckpointManager(LocalStore(cwd / run))


def _driver(cwd: Path, nproc: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run(
        [*command, str(DRIVER), *args], cwd=cwd, env=launcher_env(), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for section in ("model", "ema"):
        assert a[section].keys() == b[section].keys()
        for key, value in a[section].items():
            assert torch.equal(value, b[section][key]), (section, key)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    state_a, state_b = a["optim"]["state"], b["optim"]["state"]
    assert state_a.keys() == state_b.keys()
    for index, moments in state_a.items():
        assert moments.keys() == state_b[index].keys()
        for key, value in moments.items():
            assert torch.equal(value, state_b[index][key]), (index, key)


def _as_dump(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"model": checkpoint.model, "ema": checkpoint.ema, "optim": checkpoint.optimizer}


@pytest.mark.parametrize(("saved_at", "loaded_at"), [(2, (1, 2, 3)), (1, (2,))])
def test_a_checkpoint_saved_at_one_world_size_loads_bitwise_at_another(
    tmp_path: Path, saved_at: int, loaded_at: tuple[int, ...]
) -> None:
    _driver(tmp_path, saved_at, "save", "run", "3", "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    name = "ckpt_last_00000003.pt"
    info = _manager(tmp_path, "run").checkpoints()[0]
    assert (info.filename, info.world_size, len(info.parts)) == (name, saved_at, 2 * saved_at)
    for world in loaded_at:
        _driver(tmp_path, world, "load", "run", name, f"loaded{world}.pt")
        _same(torch.load(tmp_path / f"loaded{world}.pt", weights_only=True), saved)
    # read in one process without torch.distributed: what sample, eval and the ckpt tools see
    _same(_as_dump(_manager(tmp_path, "run").load(name)), saved)


def test_an_asynchronous_sharded_save_holds_the_state_it_was_given(tmp_path: Path) -> None:
    _driver(tmp_path, 2, "save", "run", "2", "saved.pt", "async")
    _same(_as_dump(_manager(tmp_path, "run").load("ckpt_last_00000002.pt")), torch.load(tmp_path / "saved.pt"))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_resumed_fsdp_run_is_bitwise_the_uninterrupted_one(tmp_path: Path, async_save: bool) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    args = [*FSDP, *sets(checkpointing__async_save=async_save)]
    result = _ok(torchrun(["train", *args, *sets(max_iters=12)], whole))
    assert "2 processes, sharded (FSDP)" in rank_text(result, 0)
    _ok(torchrun(["train", *args, *sets(max_iters=8)], split))
    resumed = _ok(torchrun(["train", *args, *sets(max_iters=12)], split))
    assert "resuming from iteration 8" in rank_text(resumed, 0)
    assert ckpt_names(whole / RUN) == ckpt_names(split / RUN)
    for name in ("ckpt_last_00000012.pt", "ckpt_last_00000008.pt"):
        assert_same_state(_manager(whole).load(name), _manager(split).load(name))
    info = _manager(split).checkpoints()[0]
    assert info.sharded
    assert info.world_size == 2


def test_an_fsdp_run_at_another_world_size_resumes(tmp_path: Path) -> None:
    _ok(torchrun(["train", *FSDP, *sets(max_iters=4)], tmp_path))
    result = _ok(torchrun(["train", *FSDP, *sets(max_iters=8)], tmp_path, nproc=3))
    assert "written by 2 process(es) and this run has 3" in rank_text(result, 0)
    alone = _ok(single(["train", *FSDP, *sets(max_iters=12)], tmp_path))
    assert "written by 3 process(es) and this run has 1" in alone.stdout
    latest = _manager(tmp_path).checkpoints()[0]
    assert (latest.iter_num, latest.world_size) == (12, 1)


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One single-process FSDP run (a one-rank process group): sharded checkpoints without torchrun."""
    cwd = tmp_path_factory.mktemp("fsdp-alone")
    result = _ok(single(["train", *FSDP, *sets(max_iters=8)], cwd))
    assert "sharded (FSDP)" in result.stdout
    return cwd


def test_one_process_writes_sharded_checkpoints_that_every_reader_reads(alone: Path) -> None:
    names = ckpt_names(alone / RUN)
    assert "ckpt_last_00000008.pt.part-00000-of-00001.model" in names
    listing = run_cli(["ckpt", "ls", RUN], alone)
    assert listing.returncode == 0
    assert "ckpt_last_00000008.pt  (sharded: 1 rank, 2 parts)" in listing.stdout
    assert "part-" not in listing.stdout.replace("2 parts", "")  # parts are never listed as checkpoints
    for command in (["ckpt", "verify", RUN], ["ckpt", "show", f"{RUN}/ckpt_last_00000008.pt"]):
        assert run_cli(command, alone).returncode == 0, command
    for command in (["sample", "--from", RUN], ["eval", "--from", RUN]):
        result = run_cli([*command, *sets(sample__sample__max_new_tokens=8)], alone, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    # plain torch reads a manifest: no tensors of its own, nothing pickled
    manifest = torch.load(alone / RUN / "ckpt_last_00000008.pt", weights_only=True)
    assert manifest["model"] == {}
    assert manifest["shards"]["strategy"] == "fsdp"


def test_consolidate_writes_one_file_a_ddp_run_resumes(alone: Path, tmp_path: Path) -> None:
    name = "ckpt_last_00000008.pt"
    result = run_cli(["ckpt", "consolidate", f"{alone / RUN}/{name}", str(tmp_path / RUN)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert ckpt_names(tmp_path / RUN) == [name]
    single_file = torch.load(tmp_path / RUN / name, weights_only=True)  # plain torch reads it
    assert single_file["shards"] is None
    assert single_file["model"]
    assert_same_state(_manager(tmp_path).load(name), _manager(alone).load(name))
    resumed = run_cli(["train", *DDP, *sets(max_iters=12)], tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from iteration 8" in resumed.stdout
    again = run_cli(["ckpt", "consolidate", f"{alone / RUN}/{name}", str(tmp_path / RUN)], tmp_path)
    assert again.returncode == 1
    assert "not overwritten" in " ".join(again.stderr.split())
    plain = run_cli(["ckpt", "consolidate", f"{tmp_path / RUN}/{name}", str(tmp_path / "other")], tmp_path)
    assert plain.returncode == 2
    assert "single file already" in " ".join(plain.stderr.split())


def test_a_run_keeps_its_strategy(alone: Path, tmp_path: Path) -> None:
    on_sharded = run_cli(["train", *DDP, *sets(max_iters=12)], alone, timeout=120)
    assert on_sharded.returncode == 2
    on_sharded.stderr = " ".join(on_sharded.stderr.split())  # messages wrap at 100 columns
    assert "is a sharded checkpoint" in on_sharded.stderr
    assert "'fsdp'" in on_sharded.stderr
    assert "'ddp'" in on_sharded.stderr
    assert "ckpt consolidate" in on_sharded.stderr
    run_cli(["train", *DDP, *sets(max_iters=4)], tmp_path, timeout=120)
    on_single = run_cli(["train", *FSDP, *sets(max_iters=8)], tmp_path, timeout=120)
    assert on_single.returncode == 2
    on_single.stderr = " ".join(on_single.stderr.split())
    assert "is a single-file checkpoint" in on_single.stderr
    assert "'fsdp'" in on_single.stderr


def test_export_of_a_sharded_checkpoint_writes_the_weights_of_a_single_file(alone: Path, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    name = f"{alone / RUN}/ckpt_last_00000008.pt"
    result = run_cli(["ckpt", "export", name, str(tmp_path / "model.safetensors")], tmp_path)
    assert result.returncode == 0, result.stderr
    exported = load_file(tmp_path / "model.safetensors")
    weights = _manager(alone).load_weights("ckpt_last_00000008.pt")
    assert weights.ema is not None
    assert exported.keys() == weights.ema.keys()
    for key, value in weights.ema.items():
        assert torch.equal(exported[key], value), key
