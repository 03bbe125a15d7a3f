"""The merged raw configuration tree, remembering for every dotted key the file (or ``--set``) it came from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ml_playground.errors import ConfigError

__all__ = ["OVERRIDE_SOURCE", "Merged", "describe", "table"]

OVERRIDE_SOURCE = "--set"

_Record = Callable[[str], None]


@dataclass
class Merged:
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
                lambda key: self._record(key, OVERRIDE_SOURCE, base_dir),
            )
            return
        node[parts[-1]] = value
        self._record(dotted, OVERRIDE_SOURCE, base_dir)

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


def _merge_into(target: dict[str, Any], tree: Mapping[str, Any], prefix: str, record: _Record) -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, f"{dotted}.", record)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
            if isinstance(value, Mapping):
                _record_leaves(value, f"{dotted}.", record)
            record(dotted)


def _record_leaves(tree: Mapping[str, Any], prefix: str, record: _Record) -> None:
    for key, value in tree.items():
        record(f"{prefix}{key}")
        if isinstance(value, Mapping):
            _record_leaves(value, f"{prefix}{key}.", record)


def table(data: dict[str, Any], path: tuple[str, ...], source: str = "") -> dict[str, Any]:
    """The table at ``path`` (made if missing); a value where a table belongs is a ConfigError."""
    node = data
    for i, part in enumerate(path):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = f" (in {source})" if source else ""
            raise ConfigError(f"{'.'.join(path[: i + 1])} must be a table of keys, got {child!r}{where}")
        node = child
    return node


def describe(exc: ValidationError, merged: Merged, fallback: str, prefix: str = "", unknown: str = "") -> str:
    """One line per validation error: the dotted key, what is wrong, and the file it came from.

    ``unknown`` replaces the message of a key the model does not have (e.g. an option a scheme does not take).
    """
    lines = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
        dotted = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        source = merged.origin_of(dotted, fallback)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = unknown or "unknown key (check the spelling; see docs/configuration.md for every key)"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        elif "input" in error and error["type"] != "missing":
            message = f"{message} (got {error['input']!r})"
        lines.append(f"  {dotted}: {message} [from {source}]")
    return "invalid configuration:\n" + "\n".join(lines)
