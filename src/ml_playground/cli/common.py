"""Pieces every ``ml-playground`` command shares: config loading, location arguments, error output."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ml_playground.config import ExperimentConfig
from ml_playground.config_loader import (
    is_file_ref,
    load_experiment,
    parse_checkpoint_ref,
    parse_location,
    parse_override,
    parse_storage_options,
    require_options_used,
)
from ml_playground.errors import MLPlaygroundError
from ml_playground.locations import Location

__all__ = [
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_HELP",
    "SET_HELP",
    "Formatter",
    "LocationArgs",
    "fail",
    "load_config",
]

DEFAULT_EXPERIMENT = "tiny_chars"
EXPERIMENT_HELP = f"a bundled experiment (default: {DEFAULT_EXPERIMENT})"
SET_HELP = (
    'override one config key (repeatable); VALUE is a TOML literal (50, 0.5, true, "text"), '
    "anything else is taken as a plain string"
)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-written examples in epilogs as they are."""


def fail(exc: MLPlaygroundError, code: int) -> int:
    """Print an error as one paragraph (no traceback) and return the exit code."""
    head, _, rest = str(exc).partition("\n")
    print(textwrap.fill(f"error: {head}", width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr)
    if rest:
        print(rest, file=sys.stderr)
    return code


def load_config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment named by the positional EXPERIMENT or --config PATH (default: tiny_chars), with --set
    (and, for sample/eval, --from or --checkpoint)."""
    overrides: dict[str, object] = {}
    for text in args.set:
        key, value = parse_override(text)
        overrides[key] = value
    experiment = args.experiment
    config_path = Path(args.config) if args.config is not None else None
    if experiment is None and config_path is None:
        experiment = DEFAULT_EXPERIMENT
    return load_experiment(
        experiment,
        config_path,
        overrides=overrides,
        sample_from=getattr(args, "from_", None),
        sample_checkpoint=getattr(args, "checkpoint", None),
    )


class LocationArgs:
    """A ``ckpt`` command's location arguments, with its ``-o`` storage options.

    Each location takes the options its scheme takes; an option that no location of the command takes
    is an error (:meth:`check_options_used`), so none is silently ignored.
    """

    def __init__(self, pairs: Sequence[str]) -> None:
        self.options = parse_storage_options(pairs)
        self._parsed: list[Location] = []

    def location(self, text: str, what: str) -> Location:
        location = parse_location(
            text, base_dir=Path.cwd(), storage_options=self.options, what=what, only_applicable=True
        )
        self._parsed.append(location)
        return location

    def file(self, text: str, *, for_writing: bool = False) -> tuple[Location, str]:
        location, name = parse_checkpoint_ref(
            text, base_dir=Path.cwd(), storage_options=self.options, only_applicable=True, for_writing=for_writing
        )
        self._parsed.append(location)
        return location, name

    @staticmethod
    def is_file(text: str) -> bool:
        return is_file_ref(text)

    def check_options_used(self) -> None:
        require_options_used(self.options, self._parsed, "-o")
