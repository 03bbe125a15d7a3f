"""Pieces every ``ml-playground`` command shares: config loading, location arguments, error output."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from pydantic import ValidationError

from ml_playground.config import ExperimentConfig
from ml_playground.config_loader import load_experiment, parse_checkpoint_ref, parse_location, parse_override
from ml_playground.errors import ConfigError, MLPlaygroundError
from ml_playground.locations import Location, StorageOptions

__all__ = [
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_HELP",
    "SET_HELP",
    "Formatter",
    "fail",
    "is_file_ref",
    "load_config",
    "location_of_ref",
    "parse_any_location",
    "storage_options_from",
]

DEFAULT_EXPERIMENT = "tiny_chars"
EXPERIMENT_HELP = f"a bundled experiment (default: {DEFAULT_EXPERIMENT})"
SET_HELP = (
    'override one config key (repeatable); VALUE is a TOML literal (50, 0.5, true, "text"), '
    "anything else is taken as a plain string"
)
_CHECKPOINT_SUFFIX = ".pt"


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
    """The experiment named by the positional EXPERIMENT or --config PATH (default: tiny_chars), with --set."""
    overrides: dict[str, object] = {}
    for text in args.set:
        key, value = parse_override(text)
        overrides[key] = value
    experiment = args.experiment
    config_path = Path(args.config) if args.config is not None else None
    if experiment is None and config_path is None:
        experiment = DEFAULT_EXPERIMENT
    return load_experiment(experiment, config_path, overrides=overrides)


def is_file_ref(text: str) -> bool:
    """Whether a command-line location names one checkpoint file rather than a run location."""
    return text.strip().rstrip("/").endswith(_CHECKPOINT_SUFFIX)


def location_of_ref(text: str, options: StorageOptions) -> tuple[Location, str]:
    """A checkpoint file's run location and name, relative paths against the current directory."""
    return parse_checkpoint_ref(text, base_dir=Path.cwd(), storage_options=options)


def parse_any_location(text: str, options: StorageOptions, what: str) -> Location:
    return parse_location(text, base_dir=Path.cwd(), storage_options=options, what=what)


def storage_options_from(pairs: list[str]) -> StorageOptions:
    """``-o KEY=VALUE`` pairs as typed storage options (same literal rules as --set)."""
    raw: dict[str, object] = {}
    for text in pairs:
        key, value = parse_override(text, "-o")
        raw[key] = value
    try:
        return StorageOptions.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: "
            + ("unknown storage option" if err["type"] == "extra_forbidden" else err["msg"])
            for err in exc.errors(include_url=False)
        )
        allowed = ", ".join(StorageOptions.model_fields)
        raise ConfigError(f"invalid --storage-option ({problems}); options are: {allowed}") from None
