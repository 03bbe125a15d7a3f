"""``ml-playground eval --follow``: evaluate each checkpoint of a live run as it appears.

The flow (:mod:`ml_playground.flows.follow`) reports each checkpoint as an event; this module prints a
line per checkpoint on stdout and, with ``--log FILE``, appends the same report as a JSON line to FILE
(created if missing, flushed after every line, so ``tail -f`` and a crash lose nothing).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from ml_playground.checkpoint import ModelWeights
from ml_playground.cli.common import load_config
from ml_playground.cli.render import Renderer
from ml_playground.config_loader import resolve_path
from ml_playground.errors import ConfigError
from ml_playground.flows import sampling
from ml_playground.flows.events import CheckpointReport, Event
from ml_playground.flows.follow import FollowSettings, follow
from ml_playground.workload.model import runtime_device

__all__ = ["FOLLOW_FLAGS", "add_follow_args", "cmd_follow"]

FOLLOW_FLAGS = ("poll", "until", "idle_timeout", "log")
_DEFAULTS = FollowSettings()
_ENDINGS = {
    "max_iters": "the run reached its max_iters",
    "until": "reached --until",
    "lease": "the writer finished (its lease is released or expired) and every checkpoint is reported",
    "idle": "no new checkpoint within --idle-timeout",
}


def add_follow_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("following a live run")
    group.add_argument(
        "--follow",
        action="store_true",
        help="evaluate every checkpoint of the run location as it appears, once each, in iteration order, "
        "until the run ends (see docs/cli.md); not with --checkpoint",
    )
    group.add_argument(
        "--poll", type=_seconds(positive=True), metavar="SECONDS", help=f"seconds between listings ({_DEFAULTS.poll:g})"
    )
    group.add_argument("--until", type=_iteration, metavar="ITER", help="stop after iteration ITER (inclusive)")
    group.add_argument(
        "--idle-timeout",
        type=_seconds(positive=False),
        metavar="SECONDS",
        help=f"stop after this long without a new checkpoint ({_DEFAULTS.idle_timeout:g}; 0: never)",
    )
    group.add_argument("--log", metavar="FILE", help="also append each report as a JSON line to the local FILE")


def cmd_follow(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        raise ConfigError(
            "--follow evaluates the checkpoints of a run location as they appear; give it "
            "--from LOCATION (or none: the experiment's sample.runtime.out_dir), not --checkpoint FILE"
        )
    config = load_config(args)
    runtime = config.sample.runtime
    if runtime.checkpoint is not None:
        raise ConfigError(
            f"sample.runtime.checkpoint = {runtime.checkpoint!r} names one file; --follow reads every "
            "checkpoint of the location: remove that key"
        )
    runtime_device("sample.runtime.device", runtime.device)
    settings = FollowSettings(
        poll=_DEFAULTS.poll if args.poll is None else args.poll,
        until=args.until,
        idle_timeout=_DEFAULTS.idle_timeout if args.idle_timeout is None else args.idle_timeout,
    )
    use_ema = runtime.use_ema and not args.raw_weights

    def evaluate(weights: ModelWeights, source: str) -> dict[str, float]:
        loaded = sampling.load_model(weights, source, use_ema=use_ema, device=runtime.device)
        return sampling.evaluate(loaded, device=runtime.device)

    log = _open_log(args.log) if args.log is not None else None
    try:
        with Renderer() as render:

            def sink(event: Event) -> None:
                if log is not None and isinstance(event, CheckpointReport):
                    log.write(json.dumps(_plain(event)) + "\n")
                    log.flush()
                render(event)

            mode = config.train.runtime.checkpointing.mode
            result = follow(runtime.out_dir, evaluate, settings=settings, mode=mode, on_event=sink)
    finally:
        if log is not None:
            log.close()
    evaluated = sum(report.status == "evaluated" for report in result.reports)
    rotated = sum(report.status == "rotated_away" for report in result.reports)
    print(
        f"followed {result.url}: {len(result.reports)} checkpoint{'s' if len(result.reports) != 1 else ''} "
        f"reported ({evaluated} evaluated, {rotated} rotated away); {_ENDINGS[result.ending]}"
    )
    return 0


def _plain(report: CheckpointReport) -> dict[str, object]:
    data: dict[str, object] = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **asdict(report)}
    # JSON has no NaN or infinity: a diverged loss is written as null (the line's status stays "evaluated")
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}


def _open_log(text: str) -> IO[str]:
    path: Path = resolve_path(text, Path.cwd(), "--log")
    try:
        return path.open("a", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--log {path}: cannot open it for appending ({exc.strerror or exc})") from None


def _seconds(*, positive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r}: give {'more than 0' if positive else '0 or more'} seconds")
        return value

    return parse


def _iteration(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an iteration number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: iterations start at 0")
    return value
