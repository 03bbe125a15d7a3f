"""The one boundary between configuration text and validated values.

This package alone reads configuration files, resolves relative paths, expands ``~``, checks which
backends are installed, and turns ``out_dir`` strings and checkpoint URLs into validated
:class:`~ml_playground.locations.Location` values (through :mod:`ml_playground.schemes`, which also
says which storage options each scheme takes). It injects the run's
:class:`~ml_playground.config.RuntimeContext` before validation. Everything downstream receives what it
returns.

Precedence (later wins): the package defaults file, the experiment file, ``overrides`` (``--set``).
Relative paths resolve against the directory of the file that holds them; override values and
``--from``/``--checkpoint`` resolve against the current directory; a bundled experiment's outputs
default to ``./out/<experiment>``.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ml_playground.config import ExperimentConfig, RuntimeContext
from ml_playground.config_loader._locations import (
    is_file_ref,
    parse_checkpoint_ref,
    parse_location,
    require_options_used,
    resolve_path,
)
from ml_playground.config_loader._merge import Merged, describe, table
from ml_playground.errors import ConfigError
from ml_playground.locations import Location, RemoteLocation, StorageOptions
from ml_playground.schemes import SCHEMES

__all__ = [
    "BUNDLED_EXPERIMENTS_DIR",
    "RUN_LOGGER",
    "get_cfg_path",
    "get_default_config_path",
    "is_file_ref",
    "list_experiments",
    "load",
    "load_experiment",
    "parse_checkpoint_ref",
    "parse_location",
    "parse_override",
    "parse_storage_options",
    "read_toml",
    "require_options_used",
    "resolve_path",
]

BUNDLED_EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
RUN_LOGGER = "ml_playground.run"
"""The logger a loaded configuration's runs log to (``config.context.logger``)."""
_DEFAULTS_FILE = "default_config.toml"
_EXPERIMENT_FILE = "config.toml"
_EXPERIMENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_LOCATION_KEYS = (("train", "runtime"), ("sample", "runtime"))
_CONTEXT_KEY = "context"


# ---------------------------------------------------------------- suppliers


def list_experiments() -> list[str]:
    """Names of the experiments bundled with the package."""
    return sorted(p.parent.name for p in BUNDLED_EXPERIMENTS_DIR.glob(f"*/{_EXPERIMENT_FILE}"))


def get_cfg_path(experiment: str | None, exp_config: Path | None) -> Path:
    """The experiment file to load: ``exp_config`` when given, else the bundled ``experiment``'s."""
    if experiment is not None and exp_config is not None:
        raise ConfigError("give either an experiment name or --config PATH, not both")
    if exp_config is not None:
        path = resolve_path(str(exp_config), Path.cwd(), "--config")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass the path of a TOML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass the path of a TOML file")
        return path
    if experiment is None:
        raise ConfigError(f"name an experiment ({', '.join(list_experiments())}) or pass --config PATH")
    if not _EXPERIMENT_NAME_RE.match(experiment) or experiment not in list_experiments():
        raise ConfigError(f"unknown experiment {experiment!r}; bundled experiments: {', '.join(list_experiments())}")
    return BUNDLED_EXPERIMENTS_DIR / experiment / _EXPERIMENT_FILE


def get_default_config_path(config_path: Path) -> Path:
    """The defaults every experiment file is merged over: the package's own ``default_config.toml``.

    ``config_path`` is the experiment file the defaults are for; every experiment, bundled or not,
    shares the package defaults, so that a key's default is documented in exactly one place.
    """
    del config_path
    return BUNDLED_EXPERIMENTS_DIR / _DEFAULTS_FILE


def _is_bundled(config_path: Path) -> bool:
    return config_path.parent.parent == BUNDLED_EXPERIMENTS_DIR


# ---------------------------------------------------------------- TOML and overrides


def read_toml(path: Path) -> dict[str, Any]:
    """Read one TOML file as strict UTF-8; every failure is a ConfigError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def parse_override(text: str, flag: str = "--set") -> tuple[str, object]:
    """Parse ``KEY=VALUE`` from ``--set`` (or ``-o``): a TOML literal is that literal, anything else a plain string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    example = "train.runtime.max_iters=50" if flag == "--set" else "endpoint_url=http://127.0.0.1:9000"
    if not sep or not key:
        raise ConfigError(f"{flag} expects KEY=VALUE, got {text!r} (e.g. {flag} {example})")
    if not all(part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"{flag} key {key!r} is not a dotted key (e.g. {flag} {example})")
    try:
        parsed = tomllib.loads(f"value = {value}")
    except tomllib.TOMLDecodeError:
        return key, value
    if list(parsed) != ["value"]:  # e.g. a value with a newline and another "key = ..." after it
        raise ConfigError(f"{flag} {key}: {value!r} is more than one value; give one TOML literal or plain text")
    return key, parsed["value"]


def parse_storage_options(pairs: Sequence[str], flag: str = "-o") -> StorageOptions:
    """``KEY=VALUE`` pairs (``-o``) as typed storage options (same literal rules as ``--set``)."""
    raw: dict[str, object] = {}
    for text in pairs:
        key, value = parse_override(text, flag)
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
        raise ConfigError(f"invalid {flag} ({problems}); options are: {allowed}") from None


# ---------------------------------------------------------------- loading


def load(
    config_path: Path,
    *,
    overrides: Mapping[str, object] | None = None,
    cwd: Path | None = None,
    experiment_name: str | None = None,
    sample_from: str | None = None,
    sample_checkpoint: str | None = None,
) -> ExperimentConfig:
    """Load ``config_path`` over the package defaults, apply ``overrides``, validate everything.

    ``experiment_name`` names a bundled experiment, whose outputs default to ``<cwd>/out/<name>``.
    ``sample_from`` (a run location) or ``sample_checkpoint`` (one checkpoint file) replace
    ``sample.runtime.out_dir`` (``--from``/``--checkpoint``); ``sample.runtime.storage_options`` must
    then suit that location.
    """
    if sample_from is not None and sample_checkpoint is not None:
        raise ConfigError("give either --from or --checkpoint, not both")
    cwd = (cwd or Path.cwd()).resolve()
    config_path = config_path.resolve()
    defaults_path = get_default_config_path(config_path)
    merged = Merged()
    merged.merge(read_toml(defaults_path), str(defaults_path), defaults_path.parent)
    merged.merge(read_toml(config_path), str(config_path), config_path.parent)
    for key, value in (overrides or {}).items():
        merged.set(key, value, cwd)
    if _CONTEXT_KEY in merged.data:
        raise ConfigError(
            f"{_CONTEXT_KEY} (from {merged.origin_of(_CONTEXT_KEY, str(config_path))}) is not a configuration "
            "key: the run's context is set by ml_playground, never by a file or --set"
        )
    _default_out_dirs(merged, experiment_name, cwd, source=str(config_path))
    parsed = _sample_source(merged, sample_from, sample_checkpoint, cwd)
    _build_locations(merged, str(config_path), parsed)
    merged.data[_CONTEXT_KEY] = RuntimeContext(
        logger=logging.getLogger(RUN_LOGGER), config_file=config_path, experiment=experiment_name
    )
    try:
        return ExperimentConfig.model_validate(merged.data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, merged, str(config_path))) from None


def load_experiment(
    experiment: str | None = None,
    exp_config: Path | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
    cwd: Path | None = None,
    sample_from: str | None = None,
    sample_checkpoint: str | None = None,
) -> ExperimentConfig:
    """Load a bundled experiment by name, or an experiment file by path (see :func:`load`)."""
    path = get_cfg_path(experiment, exp_config)
    return load(
        path,
        overrides=overrides,
        cwd=cwd,
        experiment_name=path.parent.name if _is_bundled(path) else None,
        sample_from=sample_from,
        sample_checkpoint=sample_checkpoint,
    )


def _default_out_dirs(merged: Merged, experiment_name: str | None, cwd: Path, source: str) -> None:
    train_rt = table(merged.data, ("train", "runtime"), source)
    sample_rt = table(merged.data, ("sample", "runtime"), source)
    if "out_dir" not in train_rt and experiment_name is not None:
        train_rt["out_dir"] = str(Path("out") / experiment_name)
        merged.base_dirs["train.runtime.out_dir"] = cwd
    if "out_dir" not in sample_rt and "out_dir" in train_rt:
        # sampling reads what training wrote unless told otherwise
        sample_rt["out_dir"] = train_rt["out_dir"]
        merged.base_dirs["sample.runtime.out_dir"] = merged.base_dirs.get("train.runtime.out_dir", cwd)
        merged.origins.setdefault("sample.runtime.out_dir", merged.origin_of("train.runtime.out_dir", ""))


def _sample_source(
    merged: Merged, sample_from: str | None, sample_checkpoint: str | None, cwd: Path
) -> dict[str, Location]:
    """``--from``/``--checkpoint`` as ``sample.runtime.out_dir`` (and ``.checkpoint``), parsed from the command line."""
    runtime = table(merged.data, ("sample", "runtime"))
    if sample_checkpoint is not None:
        location, name = parse_checkpoint_ref(sample_checkpoint, base_dir=cwd)
        runtime["checkpoint"] = name
        merged.origins["sample.runtime.checkpoint"] = merged.origins["sample.runtime.out_dir"] = "--checkpoint"
        return {"sample.runtime": location}
    if sample_from is not None:
        runtime.pop("checkpoint", None)  # --from picks by read_policy in another location
        merged.origins["sample.runtime.out_dir"] = "--from"
        return {"sample.runtime": parse_location(sample_from, base_dir=cwd, what="--from")}
    return {}


def _build_locations(merged: Merged, fallback: str, parsed: Mapping[str, Location]) -> None:
    for section in _LOCATION_KEYS:
        runtime = table(merged.data, section, fallback)
        prefix = ".".join(section)
        key = f"{prefix}.out_dir"
        source = merged.origin_of(key, fallback)
        raw_options = runtime.get("storage_options", {})
        try:
            options = StorageOptions.model_validate(raw_options)
        except ValidationError as exc:
            raise ConfigError(describe(exc, merged, fallback, prefix=f"{prefix}.storage_options")) from None
        location = parsed.get(prefix)
        if location is None:
            if "out_dir" not in runtime:
                raise ConfigError(f"{key} is required (in {fallback}): a directory path or s3:// / gs:// URL")
            location = _parse_out_dir(runtime["out_dir"], key, source, merged.base_dirs.get(key, Path.cwd()))
        _check_options(raw_options, location, merged, fallback, f"{prefix}.storage_options")
        if isinstance(location, RemoteLocation):
            location = location.model_copy(update={"storage_options": options})
        runtime["out_dir"] = location
        runtime["storage_options"] = options


def _parse_out_dir(value: object, key: str, source: str, base_dir: Path) -> Location:
    if not isinstance(value, str):
        raise ConfigError(f"{key} (from {source}) must be a string path or URL, got {value!r}")
    try:
        return parse_location(value, base_dir=base_dir, what=key)
    except ConfigError as exc:
        raise type(exc)(f"{exc} (from {source})") from None


def _check_options(raw: object, location: Location, merged: Merged, fallback: str, prefix: str) -> None:
    """The storage options set must all suit the location's scheme; each one that does not is named."""
    scheme = SCHEMES[location.scheme]
    try:
        scheme.options.model_validate(raw)
    except ValidationError as exc:
        unknown = f"does not apply to {location.url} ({scheme.takes})"
        raise ConfigError(describe(exc, merged, fallback, prefix=prefix, unknown=unknown)) from None
