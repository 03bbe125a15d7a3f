"""Rotation as tables: stored names + policy -> names to delete. No I/O."""

from __future__ import annotations

import pytest

from ml_playground.checkpoint import CheckpointName, KeepPolicy, to_delete

L = CheckpointName.last


def B(iter_num: int, metric: float) -> CheckpointName:
    return CheckpointName.best(iter_num, metric)


@pytest.mark.parametrize(
    ("stored", "keep", "mode", "protect", "expected"),
    [
        pytest.param([], KeepPolicy(1, 1), "min", None, [], id="empty"),
        pytest.param([L(0)], KeepPolicy(1, 1), "min", L(0), [], id="one-last-kept"),
        pytest.param([L(0), L(10)], KeepPolicy(1, 1), "min", L(10), [L(0)], id="older-last-goes"),
        pytest.param([L(0), L(10), L(20)], KeepPolicy(2, 1), "min", L(20), [L(0)], id="keep-two-last"),
        pytest.param([L(10), L(0), L(20)], KeepPolicy(5, 1), "min", L(20), [], id="fewer-than-keep"),
        pytest.param(
            [L(99_999_999), L(123_456_789)],
            KeepPolicy(1, 1),
            "min",
            L(123_456_789),
            [L(99_999_999)],
            id="nine-digits-order-numerically",
        ),
        pytest.param([L(0), L(10)], KeepPolicy(0, 1), "min", None, [L(0), L(10)], id="keep-zero-deletes-all-last"),
        pytest.param([B(0, 2.0), B(10, 1.0)], KeepPolicy(1, 1), "min", B(10, 1.0), [B(0, 2.0)], id="best-min"),
        pytest.param([B(0, 0.2), B(10, 0.5)], KeepPolicy(1, 1), "max", B(10, 0.5), [B(0, 0.2)], id="best-max"),
        pytest.param([B(0, 1.0), B(10, 1.0)], KeepPolicy(1, 1), "min", None, [B(0, 1.0)], id="equal-metric-newer-wins"),
        pytest.param(
            [B(0, 1.0), B(10, 2.0)],
            KeepPolicy(1, 1),
            "min",
            B(10, 2.0),
            [B(0, 1.0)],
            id="just-written-never-deleted-even-if-worse",
        ),
        pytest.param(
            [B(0, 3.0), B(10, 2.0), B(20, 1.0)], KeepPolicy(1, 2), "min", B(20, 1.0), [B(0, 3.0)], id="keep-two-best"
        ),
        pytest.param(
            [L(0), B(0, 3.0), L(10), B(10, 2.0)],
            KeepPolicy(1, 1),
            "min",
            L(10),
            [B(0, 3.0), L(0)],
            id="kinds-rotate-independently",
        ),
        pytest.param([L(0), L(10)], KeepPolicy(0, 1), "min", L(10), [L(0)], id="protect-beats-zero-quota"),
    ],
)
def test_to_delete(
    stored: list[CheckpointName],
    keep: KeepPolicy,
    mode: str,
    protect: CheckpointName | None,
    expected: list[CheckpointName],
) -> None:
    assert to_delete(stored, keep, mode, protect) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1"])
def test_keep_policy_rejects_non_natural_numbers(bad: object) -> None:
    with pytest.raises(ValueError, match="keep.last"):
        KeepPolicy(last=bad)  # type: ignore[arg-type]
