"""CheckpointManager over LocalStore: naming, discovery, save-then-rotate, validated loads."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointManager, CheckpointName, KeepPolicy, LocalStore
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNameError,
    CheckpointNotFoundError,
    CheckpointRotatedAwayError,
    CheckpointSchemaError,
)
from ml_playground.flows import sampling
from ml_playground.locations import LocalLocation
from tests.conftest import assert_same_checkpoint, make_checkpoint


def _manager(path: Path, last: int = 1, best: int = 1, mode: str = "min") -> CheckpointManager:
    return CheckpointManager(LocalStore(path, create=True), KeepPolicy(last=last, best=best), mode)  # type: ignore[arg-type]


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_save_last_rotates_to_keep_last(run_dir: Path) -> None:
    manager = _manager(run_dir, last=2)
    for i in range(0, 50, 10):
        manager.save_last(make_checkpoint(iter_num=i))
    assert _files(run_dir) == ["ckpt_last_00000030.pt", "ckpt_last_00000040.pt"]


def test_save_best_names_by_metric_and_keeps_best(run_dir: Path) -> None:
    manager = _manager(run_dir, best=2)
    for i, loss in enumerate([3.0, 2.5, 2.0]):
        manager.save_best(make_checkpoint(iter_num=i * 10, best_val_loss=loss))
    assert _files(run_dir) == ["ckpt_best_00000010_2.500000.pt", "ckpt_best_00000020_2.000000.pt"]
    assert manager.load_best().best_val_loss == 2.0


def test_max_mode_keeps_the_highest_metric(run_dir: Path) -> None:
    manager = _manager(run_dir, best=1, mode="max")
    manager.save_best(make_checkpoint(iter_num=0, best_val_loss=0.5))
    manager.save_best(make_checkpoint(iter_num=10, best_val_loss=0.75))
    assert _files(run_dir) == ["ckpt_best_00000010_0.750000.pt"]


@pytest.mark.parametrize(("last", "best"), [(0, 1), (1, 0), (0, 0)])
def test_keep_zero_writes_none_of_that_kind(run_dir: Path, last: int, best: int) -> None:
    manager = _manager(run_dir, last=last, best=best)
    written_last = manager.save_last(make_checkpoint(iter_num=0))
    written_best = manager.save_best(make_checkpoint(iter_num=0, best_val_loss=1.0))
    assert (written_last is None) == (last == 0)
    assert (written_best is None) == (best == 0)
    assert len(_files(run_dir)) == last + best


def test_latest_is_highest_iteration_and_last_wins_a_tie(run_dir: Path) -> None:
    manager = _manager(run_dir, last=3, best=3)
    manager.save_best(make_checkpoint(iter_num=10, best_val_loss=1.0))
    manager.save_last(make_checkpoint(iter_num=10, best_val_loss=1.0))
    latest = manager.latest()
    assert latest is not None
    assert latest.filename == "ckpt_last_00000010.pt"
    manager.save_best(make_checkpoint(iter_num=20, best_val_loss=0.5))
    assert manager.load_latest().iter_num == 20


def test_load_round_trips_through_files(run_dir: Path) -> None:
    original = make_checkpoint(iter_num=7, ema=True)
    _manager(run_dir).save_last(original)
    assert_same_checkpoint(original, _manager(run_dir).load("ckpt_last_00000007.pt"))


def test_new_manager_continues_the_same_rotation(run_dir: Path) -> None:
    _manager(run_dir, last=2).save_last(make_checkpoint(iter_num=0))
    _manager(run_dir, last=2).save_last(make_checkpoint(iter_num=10))
    _manager(run_dir, last=2).save_last(make_checkpoint(iter_num=20))
    assert _files(run_dir) == ["ckpt_last_00000010.pt", "ckpt_last_00000020.pt"]


def test_nine_digit_iterations_order_numerically(run_dir: Path) -> None:
    manager = _manager(run_dir, last=1)
    manager.save_last(make_checkpoint(iter_num=99_999_999))
    manager.save_last(make_checkpoint(iter_num=123_456_789))
    assert _files(run_dir) == ["ckpt_last_123456789.pt"]


def test_going_back_in_time_is_refused(run_dir: Path) -> None:
    manager = _manager(run_dir, last=2)
    manager.save_last(make_checkpoint(iter_num=20))
    with pytest.raises(CheckpointError, match="never goes back in time"):
        manager.save_last(make_checkpoint(iter_num=10))
    assert _files(run_dir) == ["ckpt_last_00000020.pt"]


def test_saving_an_existing_name_is_a_conflict(run_dir: Path) -> None:
    manager = _manager(run_dir)
    manager.save_last(make_checkpoint(iter_num=5))
    with pytest.raises(CheckpointExistsError):
        manager.save_last(make_checkpoint(iter_num=5, seed=1))


@pytest.mark.parametrize("metric", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_is_never_best(run_dir: Path, metric: float) -> None:
    with pytest.raises(CheckpointError, match="finite"):
        _manager(run_dir).save_best(make_checkpoint(best_val_loss=metric))
    assert _files(run_dir) == []


def test_unparseable_ckpt_file_is_a_clear_error_and_others_are_left_alone(run_dir: Path) -> None:
    manager = _manager(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "events.out.tfevents").write_bytes(b"x")
    manager.save_last(make_checkpoint(iter_num=0))
    manager.save_last(make_checkpoint(iter_num=1))
    assert _files(run_dir) == ["ckpt_last_00000001.pt", "events.out.tfevents", "notes.txt"]
    (run_dir / "ckpt_last_abc.pt").write_bytes(b"")
    with pytest.raises(CheckpointNameError, match="ckpt_last_abc.pt"):
        manager.save_last(make_checkpoint(iter_num=2))


def test_content_must_match_the_name(run_dir: Path) -> None:
    manager = _manager(run_dir, last=2)
    manager.save_last(make_checkpoint(iter_num=5))
    shutil.copy(run_dir / "ckpt_last_00000005.pt", run_dir / "ckpt_last_00000006.pt")
    with pytest.raises(CheckpointSchemaError, match="iteration 5.*says 6"):
        manager.load("ckpt_last_00000006.pt")
    manager.save_best(make_checkpoint(iter_num=7, best_val_loss=1.5))
    shutil.copy(run_dir / "ckpt_best_00000007_1.500000.pt", run_dir / "ckpt_best_00000007_1.400000.pt")
    with pytest.raises(CheckpointSchemaError, match="metric 1.500000"):
        manager.load("ckpt_best_00000007_1.400000.pt")


def test_empty_location_has_nothing_to_load(run_dir: Path) -> None:
    manager = _manager(run_dir)
    assert manager.latest() is None
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        manager.load_latest()
    with pytest.raises(CheckpointNotFoundError, match="no best checkpoint"):
        manager.choose("best")


def test_reading_a_rotated_checkpoint_says_so(run_dir: Path) -> None:
    manager = _manager(run_dir, last=1)
    manager.save_last(make_checkpoint(iter_num=0))
    manager.save_last(make_checkpoint(iter_num=10))
    with pytest.raises(CheckpointRotatedAwayError, match="rotated away.*ckpt_last_00000010.pt"):
        manager.load("ckpt_last_00000000.pt")


def test_corrupt_latest_is_an_error_naming_it_with_no_fallback(run_dir: Path) -> None:
    manager = _manager(run_dir, last=2)
    manager.save_last(make_checkpoint(iter_num=0))
    manager.save_last(make_checkpoint(iter_num=10))
    path = run_dir / "ckpt_last_00000010.pt"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="ckpt_last_00000010.pt"):
        manager.load_latest()


def test_a_failed_delete_raises_after_the_commit_and_the_next_save_retries(run_dir: Path) -> None:
    from ml_playground.checkpoint import FileOps

    class FailingUnlink(FileOps):
        fail = True

        def unlink(self, path: Path) -> None:
            if self.fail:
                raise PermissionError(13, "Permission denied", str(path))
            super().unlink(path)

    ops = FailingUnlink()
    manager = CheckpointManager(LocalStore(run_dir, create=True, file_ops=ops), KeepPolicy(last=1, best=1))
    manager.save_last(make_checkpoint(iter_num=0))
    with pytest.raises(CheckpointError, match="cannot delete"):
        manager.save_last(make_checkpoint(iter_num=10))
    assert _files(run_dir) == ["ckpt_last_00000000.pt", "ckpt_last_00000010.pt"]
    ops.fail = False
    manager.save_last(make_checkpoint(iter_num=20))
    assert _files(run_dir) == ["ckpt_last_00000020.pt"]


@pytest.mark.parametrize("load", ["load", "load_verify_false", "load_weights"])
def test_a_device_this_machine_lacks_is_named_not_called_damage(tmp_path: Path, load: str) -> None:
    manager = _manager(tmp_path)
    name = manager.save_last(make_checkpoint(3))
    assert name is not None
    calls = {
        "load": lambda: manager.load(name.filename, map_location="cuda:63"),
        "load_verify_false": lambda: manager.load(name.filename, map_location="cuda:63", verify=False),
        "load_weights": lambda: manager.load_weights(name.filename, map_location="cuda:63"),
    }
    with pytest.raises(CheckpointError, match=rf"cannot load .*{name.filename} onto 'cuda:63'") as caught:
        calls[load]()
    assert not isinstance(caught.value, CheckpointCorruptError)  # a healthy file must not look damaged


UNREADABLE_PROBE = """
import sys
from pathlib import Path
from ml_playground.checkpoint import CheckpointManager, LocalStore
manager = CheckpointManager(LocalStore(Path(sys.argv[1])))
for call in ("load", "verify", "load_weights"):
    try:
        getattr(manager, call)(sys.argv[2])
    except Exception as exc:
        print(call, type(exc).__name__, exc)
"""


@pytest.mark.timeout(60)
def test_an_unreadable_file_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    name = manager.save_last(make_checkpoint(3))
    assert name is not None
    (tmp_path / name.filename).chmod(0)
    command = [sys.executable, "-c", UNREADABLE_PROBE, str(tmp_path), name.filename]
    if os.geteuid() == 0:  # root reads any file: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=50, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    path = tmp_path / name.filename
    assert done.stdout.splitlines() == [
        f"{call} StorageError cannot read {path}: Permission denied" for call in ("load", "verify", "load_weights")
    ]


def test_the_best_just_written_is_kept_whatever_digits_its_metric_has(tmp_path: Path) -> None:
    # the name made for the save kept the unrounded metric, the listing the printed one: rotation did not
    # recognise the file it had just written and deleted it
    manager = _manager(tmp_path, last=0, best=1)
    manager.save_best(make_checkpoint(10, best_val_loss=1.0))
    written = manager.save_best(make_checkpoint(20, best_val_loss=2.0000001))
    assert written is not None
    assert written.filename in _files(tmp_path)
    assert written == CheckpointName.parse(written.filename)


def test_sampling_ranks_best_checkpoints_by_the_runs_mode(tmp_path: Path) -> None:
    manager = CheckpointManager(LocalStore(tmp_path, create=True), KeepPolicy(last=0, best=2), "max")
    manager.save_best(make_checkpoint(0, best_val_loss=0.25))
    manager.save_best(make_checkpoint(5, best_val_loss=0.5))
    location = LocalLocation(path=tmp_path)
    assert sampling.load_checkpoint(location, mode="max")[1].endswith("ckpt_best_00000005_0.500000.pt")
    assert sampling.load_checkpoint(location, mode="min")[1].endswith("ckpt_best_00000000_0.250000.pt")


def test_damaged_metadata_errors_never_advise_loading_with_weights_only_false(tmp_path: Path) -> None:
    # torch's refusal opens with "Re-running torch.load with weights_only set to False will likely succeed":
    # advice to run the file's code, which our messages must not pass on
    manager = _manager(tmp_path)
    name = manager.save_last(make_checkpoint(3))
    assert name is not None
    path = tmp_path / name.filename
    blob = path.read_bytes()
    messages = []
    for offset in range(0, 3000, 7):  # across data.pkl, where flips break the pickle
        damaged = bytearray(blob)
        damaged[offset] ^= 0x40
        path.write_bytes(bytes(damaged))
        try:
            manager.load(name.filename)
        except CheckpointError as exc:
            messages.append(str(exc))
    assert any("its metadata cannot be read" in message for message in messages)
    assert not [message for message in messages if "weights_only" in message]
