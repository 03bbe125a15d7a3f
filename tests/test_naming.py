"""Checkpoint names are made and parsed exactly."""

from __future__ import annotations

import math

import pytest

from ml_playground.checkpoint import CheckpointKind, CheckpointName
from ml_playground.errors import CheckpointNameError


@pytest.mark.parametrize(
    ("name", "filename"),
    [
        (CheckpointName.last(0), "ckpt_last_00000000.pt"),
        (CheckpointName.last(1200), "ckpt_last_00001200.pt"),
        (CheckpointName.last(123_456_789), "ckpt_last_123456789.pt"),
        (CheckpointName.best(1200, 1.234567), "ckpt_best_00001200_1.234567.pt"),
        (CheckpointName.best(5, -0.5), "ckpt_best_00000005_-0.500000.pt"),
        (CheckpointName.best(7, 12.3456789), "ckpt_best_00000007_12.345679.pt"),
    ],
)
def test_format_and_parse_round_trip(name: CheckpointName, filename: str) -> None:
    assert name.filename == filename
    parsed = CheckpointName.parse(filename)
    assert parsed.filename == filename
    assert parsed.kind is name.kind
    assert parsed.iter_num == name.iter_num


@pytest.mark.parametrize(
    "filename",
    [
        "ckpt_last_abc.pt",
        "ckpt_last_1234567.pt",  # 7 digits
        "ckpt_last_000000001.pt",  # 9 digits with a leading zero: not canonical
        "ckpt_last_00000001.pth",
        "ckpt_best_00000001.pt",
        "ckpt_best_00000001_1.5.pt",  # metric not at fixed precision
        "ckpt_best_00000001_nan.pt",
        "ckpt_best_00000001_inf.pt",
        "ckpt_other_00000001.pt",
        "ckpt_last_00000001.pt.bak",
    ],
)
def test_malformed_checkpoint_names_raise(filename: str) -> None:
    with pytest.raises(CheckpointNameError, match="ckpt_"):
        CheckpointName.parse(filename)


def test_nine_digit_iteration_parses_and_orders_after_eight() -> None:
    nine = CheckpointName.parse("ckpt_last_123456789.pt")
    eight = CheckpointName.parse("ckpt_last_99999999.pt")
    assert nine.kind is CheckpointKind.LAST
    assert nine.iter_num > eight.iter_num
    assert "ckpt_last_123456789.pt" < "ckpt_last_99999999.pt"  # why string order is never used


@pytest.mark.parametrize("metric", [math.nan, math.inf, -math.inf])
def test_best_name_needs_a_finite_metric(metric: float) -> None:
    with pytest.raises(CheckpointNameError, match="finite"):
        CheckpointName.best(1, metric)


def test_metric_making_a_name_over_255_bytes_is_refused() -> None:
    with pytest.raises(CheckpointNameError, match="255 bytes"):
        CheckpointName.best(1, 1e250)


@pytest.mark.parametrize("iteration", [-1, True, 1.0])
def test_iteration_must_be_a_natural_number(iteration: object) -> None:
    with pytest.raises(CheckpointNameError):
        CheckpointName.last(iteration)  # type: ignore[arg-type]
