"""``ml-playground ckpt``: ls, show, verify, cp, export on a real local run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import CheckpointManager, LocalStore
from ml_playground.config_loader import load_experiment, parse_override
from ml_playground.flows.training import train
from tests.cli_support import TINY, assert_clean_failure, ckpt_names, flip_tensor_byte, run_cli, run_main, sets


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small run with EMA: two last checkpoints and one best; tests copy it before changing anything."""
    cwd = tmp_path_factory.mktemp("trained")
    overrides = dict(
        parse_override(text)
        for text in [*TINY, *sets(max_iters=10, checkpointing__interval=5, ema_decay=0.9)]
        if text != "--set"
    )
    result = train(load_experiment("tiny_chars", overrides=overrides, cwd=cwd))
    return Path(result.location)


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    copy.mkdir()
    for path in trained_run.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def flip_one_bit(path: Path) -> None:
    flip_tensor_byte(path)


def test_ls_lists_kind_iteration_metric_size_and_time(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(["ckpt", "ls", str(run)], run.parent, capsys)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"3 checkpoints in {run}"
    assert lines[1].split()[:4] == ["kind", "iteration", "metric", "size"]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("last", "10"), ("last", "5"), ("best", "0")]
    best = next(n for n in ckpt_names(run) if n.startswith("ckpt_best"))
    assert rows[2][2] == best.removesuffix(".pt").rsplit("_", 1)[1]
    assert rows[0][-1] == "ckpt_last_00000010.pt"


def test_ls_of_an_empty_location_says_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(["ckpt", "ls", str(tmp_path)], tmp_path, capsys)
    assert result.returncode == 0
    assert result.stdout.strip() == f"0 checkpoints in {tmp_path}"


def test_show_prints_metadata_including_ema(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(["ckpt", "show", str(run / "ckpt_last_00000010.pt")], run, capsys)
    assert result.returncode == 0, result.stderr
    assert "iteration:        10" in result.stdout
    assert "EMA weights:      yes" in result.stdout
    assert "'n_embd': 16" in result.stdout
    assert "'batches_drawn': 10" in result.stdout


def test_verify_passes_a_good_run_and_a_single_file(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(["ckpt", "verify", str(run)], run, capsys)
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == f"3 checkpoints in {run}: 3 ok, 0 bad"
    one = run_main(["ckpt", "verify", "ckpt_last_00000005.pt"], run, capsys)
    assert one.returncode == 0
    assert "1 checkpoint in" in one.stdout


def test_verify_of_an_empty_location_is_zero_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(["ckpt", "verify", str(tmp_path)], tmp_path, capsys)
    assert result.returncode == 0
    assert f"0 checkpoints in {tmp_path}" in result.stdout


def test_verify_catches_a_flipped_bit_in_a_fresh_process(run: Path) -> None:
    flip_one_bit(run / "ckpt_last_00000005.pt")
    result = run_cli(["ckpt", "verify", str(run)], run)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "BAD  ckpt_last_00000005.pt" in result.stdout
    assert "ok   ckpt_last_00000010.pt" in result.stdout
    assert result.stdout.splitlines()[-1] == f"3 checkpoints in {run}: 2 ok, 1 bad"


def test_verify_reports_a_misnamed_checkpoint(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "ckpt_last_00000010.pt").rename(run / "ckpt_last_00000011.pt")
    result = run_main(["ckpt", "verify", str(run)], run, capsys)
    assert result.returncode == 1
    assert "BAD  ckpt_last_00000011.pt" in result.stdout
    assert "holds iteration 10" in result.stdout


def test_cp_copies_a_run_and_verifies_it(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "copy" / "of" / "run"
    result = run_main(["ckpt", "cp", str(run), str(dst)], tmp_path, capsys)
    assert result.returncode == 0, result.stderr
    assert ckpt_names(dst) == ckpt_names(run)
    for name in ckpt_names(run):
        assert (dst / name).read_bytes() == (run / name).read_bytes()
    assert "3 checkpoints copied" in result.stdout
    again = run_main(["ckpt", "cp", str(run), str(dst)], tmp_path, capsys)
    assert_clean_failure(again, 1, "already holds", "nothing was copied")


def test_cp_copies_one_checkpoint_into_a_directory_or_to_a_name(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = run_main(["ckpt", "cp", str(run / "ckpt_last_00000005.pt"), "backup"], tmp_path, capsys)
    assert one.returncode == 0, one.stderr
    assert ckpt_names(tmp_path / "backup") == ["ckpt_last_00000005.pt"]
    renamed = run_main(["ckpt", "cp", str(run / "ckpt_last_00000005.pt"), "elsewhere/model.pt"], tmp_path, capsys)
    assert renamed.returncode == 0, renamed.stderr
    assert (tmp_path / "elsewhere" / "model.pt").read_bytes() == (run / "ckpt_last_00000005.pt").read_bytes()
    # a copy under any name still verifies and samples
    assert run_main(["ckpt", "verify", "elsewhere/model.pt"], tmp_path, capsys).returncode == 0


def test_cp_of_a_run_onto_a_clashing_name_copies_nothing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it copied the earlier files, then failed on the clash: half a run
    names = ckpt_names(run)
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / names[-1]).write_bytes((run / names[-1]).read_bytes())
    result = run_main(["ckpt", "cp", str(run), "part"], tmp_path, capsys)
    assert_clean_failure(result, 1, "already holds", names[-1], "nothing was copied")
    assert ckpt_names(tmp_path / "part") == [names[-1]]


def test_export_onto_an_existing_file_and_a_malformed_option_say_what_they_are(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(run / "ckpt_last_00000010.pt")
    (tmp_path / "w.safetensors").write_bytes(b"mine")
    result = run_main(["ckpt", "export", source, "w.safetensors"], tmp_path, capsys)
    assert_clean_failure(result, 1, "w.safetensors already exists; it was not overwritten")
    assert (tmp_path / "w.safetensors").read_bytes() == b"mine"
    assert_clean_failure(run_main(["ckpt", "ls", str(run), "-o", "=x"], tmp_path, capsys), 2, "-o expects KEY=VALUE")


def test_cp_of_a_corrupt_checkpoint_fails_and_leaves_no_copy(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_one_bit(run / "ckpt_last_00000005.pt")
    result = run_main(["ckpt", "cp", str(run / "ckpt_last_00000005.pt"), "backup"], tmp_path, capsys)
    assert_clean_failure(result, 1, "failed verification", "ckpt_last_00000005.pt")
    assert ckpt_names(tmp_path / "backup") == []


def test_export_writes_the_ema_weights_by_default(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open

    source = run / "ckpt_last_00000010.pt"
    checkpoint = CheckpointManager(LocalStore(run)).load(source.name)
    assert checkpoint.ema is not None
    for flag, expected, weights in (([], checkpoint.ema, "ema"), (["--raw-weights"], checkpoint.model, "raw")):
        out = tmp_path / f"{weights}.safetensors"
        result = run_main(["ckpt", "export", str(source), str(out), *flag], tmp_path, capsys)
        assert result.returncode == 0, result.stderr
        assert f"exported the {weights} weights" in result.stdout
        with safe_open(str(out), framework="pt") as handle:
            assert set(handle.keys()) == set(expected)
            for key in expected:
                assert torch.equal(handle.get_tensor(key), expected[key]), key
            metadata = handle.metadata()
        assert metadata["weights"] == weights
        assert json.loads(metadata["model_args"])["n_embd"] == 16
    assert not torch.equal(checkpoint.ema["wte.weight"], checkpoint.model["wte.weight"])


def test_export_refuses_a_checkpoint_name_that_would_break_the_run(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it wrote safetensors bytes as ckpt_last_00000099.pt into the run, which then failed to resume
    source = run / "ckpt_last_00000010.pt"
    result = run_main(["ckpt", "export", str(source), str(run / "ckpt_last_00000099.pt")], tmp_path, capsys)
    assert_clean_failure(result, 2, "cannot export to 'ckpt_last_00000099.pt'")
    assert "ckpt_last_00000099.pt" not in ckpt_names(run)


def test_export_without_safetensors_names_the_extra(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    result = run_main(["ckpt", "export", str(run / "ckpt_last_00000010.pt"), "w.safetensors"], tmp_path, capsys)
    assert_clean_failure(result, 2, "pip install 'ml_playground[export]'")


def test_ckpt_tools_on_a_missing_location_fail_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clean_failure(run_main(["ckpt", "ls", "nowhere"], tmp_path, capsys), 1, "nowhere", "does not exist")
    assert_clean_failure(run_main(["ckpt", "show", "nowhere/x.pt"], tmp_path, capsys), 1, "nowhere")


def test_an_unknown_storage_option_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(["ckpt", "ls", str(tmp_path), "-o", "endpoint=http://x"], tmp_path, capsys)
    assert_clean_failure(result, 2, "endpoint", "endpoint_url")
