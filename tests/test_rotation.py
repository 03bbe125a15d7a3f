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


_UNSORTED_BESTS = [B(10, 3.0), B(20, 1.0), B(30, 2.0), B(40, 0.5), B(50, 1.5)]
"""Metrics that do not improve monotonically: the newest bests are not the best ones."""


@pytest.mark.parametrize(
    ("mode", "protect", "kept"),
    [
        pytest.param("min", None, [B(40, 0.5), B(20, 1.0)], id="min-lowest-two"),
        pytest.param("min", B(50, 1.5), [B(50, 1.5), B(40, 0.5)], id="min-just-written-and-the-lowest"),
        pytest.param("max", None, [B(10, 3.0), B(30, 2.0)], id="max-highest-two"),
        pytest.param("max", B(40, 0.5), [B(40, 0.5), B(10, 3.0)], id="max-just-written-and-the-highest"),
    ],
)
def test_best_rotation_keeps_the_best_metrics_not_the_newest(
    mode: str, protect: CheckpointName | None, kept: list[CheckpointName]
) -> None:
    doomed = to_delete(_UNSORTED_BESTS, KeepPolicy(last=1, best=2), mode, protect)  # type: ignore[arg-type]
    assert sorted(set(_UNSORTED_BESTS) - set(doomed), key=lambda n: n.iter_num) == sorted(
        kept, key=lambda n: n.iter_num
    )
