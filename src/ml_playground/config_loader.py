"""The one boundary between configuration text and validated values.

This module alone reads configuration files, resolves relative paths, expands ``~``, checks which
fsspec backends are installed, and turns ``out_dir`` strings and checkpoint URLs into validated
:class:`~ml_playground.locations.Location` values. Everything downstream receives what it returns.

Precedence (later wins): the package defaults file, the experiment file, ``overrides`` (``--set``).
Relative paths resolve against the directory of the file that holds them; override values resolve
against the current directory; a bundled experiment's outputs default to ``./out/<experiment>``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from ml_playground.config import ExperimentConfig
from ml_playground.errors import ConfigError, MissingExtraError
from ml_playground.locations import LocalLocation, Location, RemoteLocation, StorageOptions

__all__ = [
    "BUNDLED_EXPERIMENTS_DIR",
    "SUPPORTED_SCHEMES",
    "get_cfg_path",
    "get_default_config_path",
    "list_experiments",
    "load",
    "load_experiment",
    "parse_checkpoint_ref",
    "parse_location",
    "parse_override",
    "read_toml",
]

BUNDLED_EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
_DEFAULTS_FILE = "default_config.toml"
_EXPERIMENT_FILE = "config.toml"
_OVERRIDE_SOURCE = "--set"

# scheme -> (module that must be importable, pip extra that provides it)
SUPPORTED_SCHEMES: Mapping[str, tuple[str | None, str | None]] = {
    "s3": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "memory": (None, None),
}
_BUCKET_RE = {
    "s3": re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
    "gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
}
_BUCKET_RE["gcs"] = _BUCKET_RE["gs"]
_EXPERIMENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_LOCATION_KEYS = (("train", "runtime"), ("sample", "runtime"))


# ---------------------------------------------------------------- suppliers


def list_experiments() -> list[str]:
    """Names of the experiments bundled with the package."""
    return sorted(p.parent.name for p in BUNDLED_EXPERIMENTS_DIR.glob(f"*/{_EXPERIMENT_FILE}"))


def get_cfg_path(experiment: str | None, exp_config: Path | None) -> Path:
    """The experiment file to load: ``exp_config`` when given, else the bundled ``experiment``'s."""
    if experiment is not None and exp_config is not None:
        raise ConfigError("give either an experiment name or --config PATH, not both")
    if exp_config is not None:
        path = _resolve_path(str(exp_config), Path.cwd(), "--config")
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


@dataclass
class _Merged:
    """The merged raw tree plus, for every dotted key, the file (or ``--set``) it came from."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    base_dirs: dict[str, Path] = field(default_factory=dict)

    def merge(self, tree: Mapping[str, Any], source: str, base_dir: Path, prefix: str = "") -> None:
        _merge_into(self.data, tree, prefix, lambda key: self._record(key, source, base_dir))

    def set(self, dotted: str, value: object, base_dir: Path) -> None:
        parts = dotted.split(".")
        node = self.data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is a value, not a table of keys")
            node = child
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"--set {dotted}: {dotted} is a table; set one of its keys instead")
        if isinstance(value, dict):  # an inline table sets its keys, as a file's table would
            _merge_into(
                node,
                {parts[-1]: value},
                ".".join(parts[:-1]) + "." if len(parts) > 1 else "",
                lambda key: self._record(key, _OVERRIDE_SOURCE, base_dir),
            )
            return
        node[parts[-1]] = value
        self._record(dotted, _OVERRIDE_SOURCE, base_dir)

    def _record(self, dotted: str, source: str, base_dir: Path) -> None:
        self.origins[dotted] = source
        self.base_dirs[dotted] = base_dir

    def origin_of(self, dotted: str, fallback: str) -> str:
        """The file(s) a key came from: its own, a table's contributing files, or its nearest parent's."""
        below = {src for key, src in self.origins.items() if key.startswith(f"{dotted}.")}
        if dotted in self.origins:
            below.add(self.origins[dotted])
        if below:
            return ", ".join(sorted(below))
        parts = dotted.split(".")
        for end in range(len(parts) - 1, 0, -1):
            found = self.origins.get(".".join(parts[:end]))
            if found is not None:
                return found
        return fallback


def _merge_into(target: dict[str, Any], tree: Mapping[str, Any], prefix: str, record: Any) -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, f"{dotted}.", record)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
            if isinstance(value, Mapping):
                _record_leaves(value, f"{dotted}.", record)
            record(dotted)


def _record_leaves(tree: Mapping[str, Any], prefix: str, record: Any) -> None:
    for key, value in tree.items():
        record(f"{prefix}{key}")
        if isinstance(value, Mapping):
            _record_leaves(value, f"{prefix}{key}.", record)


# ---------------------------------------------------------------- locations


def parse_location(
    text: str, *, base_dir: Path, storage_options: StorageOptions | None = None, what: str = "location"
) -> Location:
    """Turn a path or URL into a validated location; relative paths resolve against ``base_dir``."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what} must be a non-empty path or URL, got {text!r}")
    text = text.strip()
    scheme_match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme_match is None:
        typo = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/?(?!/)", text)
        if typo is not None and typo.group(1).lower() in {"file", *SUPPORTED_SCHEMES}:
            scheme = typo.group(1).lower()
            raise ConfigError(f"{what} {text!r} looks like a {scheme}:// URL with a '/' missing; write {scheme}://...")
        return LocalLocation(path=_resolve_path(text, base_dir, what))
    scheme = scheme_match.group(1).lower()
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ConfigError(
                f"{what} {text!r}: a file:// URL names a local path (file:///abs/path); "
                "it takes no host, query or fragment"
            )
        if not parts.path:
            raise ConfigError(f"{what} {text!r} has no path; write file:///abs/path")
        return LocalLocation(path=_resolve_path(unquote(parts.path), base_dir, what))
    if scheme not in SUPPORTED_SCHEMES:
        allowed = ", ".join(["a local path", "file://", *(f"{s}://" for s in SUPPORTED_SCHEMES)])
        raise ConfigError(f"{what} {text!r}: unsupported URL scheme {scheme!r}; use {allowed}")
    _require_backend(scheme, text)
    rest = text[len(scheme_match.group(0)) :]
    if rest.startswith("/") and scheme in _BUCKET_RE:
        raise ConfigError(f"{what} {text!r} has no bucket; write {scheme}://BUCKET/PREFIX")
    root = rest.strip("/")
    root = re.sub(r"/{2,}", "/", root)
    if scheme in _BUCKET_RE:
        bucket = root.split("/", 1)[0]
        if not bucket:
            raise ConfigError(f"{what} {text!r} has no bucket; write {scheme}://BUCKET/PREFIX")
        if not _BUCKET_RE[scheme].match(bucket):
            raise ConfigError(
                f"{what} {text!r}: {bucket!r} is not a valid bucket name "
                + (
                    "(lowercase letters, digits, '.', '-'; 3 to 63 characters)"
                    if scheme == "s3"
                    else "(lowercase letters, digits, '.', '-', '_'; 3 to 222 characters)"
                )
            )
    elif not root:
        raise ConfigError(f"{what} {text!r} has no path; write {scheme}://NAME")
    if any(part in (".", "..") for part in root.split("/")):
        raise ConfigError(f"{what} {text!r} must not contain '.' or '..' path segments")
    return RemoteLocation(scheme=scheme, root=root, storage_options=storage_options or StorageOptions())


def parse_checkpoint_ref(
    text: str, *, base_dir: Path, storage_options: StorageOptions | None = None
) -> tuple[Location, str]:
    """Split a checkpoint file's path or URL into its run location and the checkpoint's name."""
    stripped = text.strip().rstrip("/")
    parent, sep, name = stripped.rpartition("/")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*$", stripped):
        raise ConfigError(f"checkpoint {text!r} names no file; write SCHEME://BUCKET/PREFIX/FILE")
    if not sep or not name:
        parent, name = ".", stripped
    if parent.lower().startswith("file://"):  # percent-escapes decoded in the name too; file:///x.pt is /x.pt
        parent, name = parent if parent.lower() != "file://" else "file:///", unquote(name)
    if not name or name.startswith(".") or "\0" in name:  # "..", hidden and temporary files
        raise ConfigError(f"checkpoint {text!r}: {name!r} is not a checkpoint file name; write DIR/FILE or URL/FILE")
    location = parse_location(parent or "/", base_dir=base_dir, storage_options=storage_options, what="checkpoint")
    return location, name


def _resolve_path(text: str, base_dir: Path, what: str) -> Path:
    try:
        path = Path(os.path.expanduser(text))
        return (path if path.is_absolute() else base_dir / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte, ...
        raise ConfigError(f"{what} {text!r} is not a usable path ({exc})") from None


def _require_backend(scheme: str, url: str) -> None:
    module, extra = SUPPORTED_SCHEMES[scheme]
    if module is not None and importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{url!r} needs the {module} package, which is not installed; "
            f"install it with: pip install 'ml_playground[{extra}]'"
        )


# ---------------------------------------------------------------- loading


def load(
    config_path: Path,
    *,
    overrides: Mapping[str, object] | None = None,
    cwd: Path | None = None,
    experiment_name: str | None = None,
) -> ExperimentConfig:
    """Load ``config_path`` over the package defaults, apply ``overrides``, validate everything.

    ``experiment_name`` names a bundled experiment, whose outputs default to ``<cwd>/out/<name>``.
    """
    cwd = (cwd or Path.cwd()).resolve()
    config_path = config_path.resolve()
    defaults_path = get_default_config_path(config_path)
    merged = _Merged()
    merged.merge(read_toml(defaults_path), str(defaults_path), defaults_path.parent)
    merged.merge(read_toml(config_path), str(config_path), config_path.parent)
    for key, value in (overrides or {}).items():
        merged.set(key, value, cwd)
    _default_out_dirs(merged, experiment_name, cwd, source=str(config_path))
    _build_locations(merged, fallback=str(config_path))
    try:
        return ExperimentConfig.model_validate(merged.data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, merged, str(config_path))) from None


def load_experiment(
    experiment: str | None = None,
    exp_config: Path | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
    cwd: Path | None = None,
) -> ExperimentConfig:
    """Load a bundled experiment by name, or an experiment file by path."""
    path = get_cfg_path(experiment, exp_config)
    return load(path, overrides=overrides, cwd=cwd, experiment_name=path.parent.name if _is_bundled(path) else None)


def _default_out_dirs(merged: _Merged, experiment_name: str | None, cwd: Path, source: str) -> None:
    train_rt = _table(merged.data, ("train", "runtime"), source)
    sample_rt = _table(merged.data, ("sample", "runtime"), source)
    if "out_dir" not in train_rt and experiment_name is not None:
        train_rt["out_dir"] = str(Path("out") / experiment_name)
        merged.base_dirs["train.runtime.out_dir"] = cwd
    if "out_dir" not in sample_rt and "out_dir" in train_rt:
        # sampling reads what training wrote unless told otherwise
        sample_rt["out_dir"] = train_rt["out_dir"]
        merged.base_dirs["sample.runtime.out_dir"] = merged.base_dirs.get("train.runtime.out_dir", cwd)
        merged.origins.setdefault("sample.runtime.out_dir", merged.origin_of("train.runtime.out_dir", ""))


def _table(data: dict[str, Any], path: tuple[str, ...], source: str = "") -> dict[str, Any]:
    node = data
    for i, part in enumerate(path):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = f" (in {source})" if source else ""
            raise ConfigError(f"{'.'.join(path[: i + 1])} must be a table of keys, got {child!r}{where}")
        node = child
    return node


def _build_locations(merged: _Merged, fallback: str) -> None:
    for section in _LOCATION_KEYS:
        runtime = _table(merged.data, section, fallback)
        prefix = ".".join(section)
        key = f"{prefix}.out_dir"
        source = merged.origin_of(key, fallback)
        if "out_dir" not in runtime:
            raise ConfigError(f"{key} is required (in {fallback}): a directory path or s3:// / gs:// URL")
        raw_options = runtime.get("storage_options", {})
        try:
            options = StorageOptions.model_validate(raw_options)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, merged, fallback, prefix=f"{prefix}.storage_options")) from None
        value = runtime["out_dir"]
        if not isinstance(value, str):
            raise ConfigError(f"{key} (from {source}) must be a string path or URL, got {value!r}")
        try:
            runtime["out_dir"] = parse_location(
                value, base_dir=merged.base_dirs.get(key, Path.cwd()), storage_options=options, what=key
            )
        except ConfigError as exc:
            raise type(exc)(f"{exc} (from {source})") from None
        runtime["storage_options"] = options


def _describe(exc: ValidationError, merged: _Merged, fallback: str, prefix: str = "") -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
        dotted = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        source = merged.origin_of(dotted, fallback)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/configuration.md for every key)"
        elif "input" in error and error["type"] != "missing":
            message = f"{message} (got {error['input']!r})"
        lines.append(f"  {dotted}: {message} [from {source}]")
    return "invalid configuration:\n" + "\n".join(lines)
