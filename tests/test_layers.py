"""The layers of docs/architecture.md, enforced: what may import what, where schemes are decided, module sizes.

Each rule reads the source (``ast``), so it holds for code paths no test runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "ml_playground"
MAX_MODULE_LINES = 300

SCHEME_NAMES = {"s3", "s3a", "gs", "gcs", "memory", "http", "https"}  # not "file": fsspec calls entries that
SCHEME_DECIDERS = {"ml_playground.schemes", "ml_playground.config_loader._locations"}
"""The only modules that may branch on a scheme string or parse ``scheme://``."""

FORBIDDEN = {
    # importer prefix: imported prefixes it must never reach
    "ml_playground.errors": ["ml_playground."],
    "ml_playground.locations": ["ml_playground.checkpoint", "ml_playground.config", "ml_playground.flows"],
    "ml_playground.schemes": ["ml_playground.checkpoint", "ml_playground.config", "ml_playground.flows"],
    "ml_playground.config": ["ml_playground.checkpoint", "ml_playground.config_loader", "ml_playground.flows"],
    "ml_playground.config_loader": ["ml_playground.checkpoint", "ml_playground.flows", "ml_playground.workload"],
    "ml_playground.checkpoint": [
        "ml_playground.config",
        "ml_playground.config_loader",
        "ml_playground.flows",
        "ml_playground.cli",
        "ml_playground.workload",
    ],
    "ml_playground.checkpoint.format": ["ml_playground.checkpoint.stores", "ml_playground.checkpoint._manager"],
    "ml_playground.checkpoint.stores": ["ml_playground.checkpoint.format", "ml_playground.checkpoint._manager"],
    "ml_playground.workload": ["ml_playground.checkpoint", "ml_playground.config_loader", "ml_playground.flows"],
    "ml_playground.flows": ["ml_playground.cli", "ml_playground.config_loader", "tqdm"],
}
for _low in ("ml_playground.errors", "ml_playground.locations", "ml_playground.schemes", "ml_playground.config"):
    FORBIDDEN[_low] = [*FORBIDDEN[_low], "ml_playground.cli", "ml_playground.workload", "ml_playground.config_loader"]
FORBIDDEN["ml_playground.config"].remove("ml_playground.config_loader")
FLOW_SHARED = {"ml_playground.flows.events", "ml_playground.flows.evaluation", "ml_playground.flows.limits"}
_TRAINING = {
    "ml_playground.flows.distributed",
    "ml_playground.flows.train_state",
    "ml_playground.flows.preemption",
    "ml_playground.flows.resume",
    "ml_playground.flows.fsdp",
}
FLOW_OWN = {
    "ml_playground.flows.training": {"ml_playground.flows._loop", *_TRAINING},
    "ml_playground.flows._loop": _TRAINING,
    "ml_playground.flows.train_state": _TRAINING,
    "ml_playground.flows.fsdp": _TRAINING,
}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]

    def imports(self) -> Iterator[tuple[int, str, str | None]]:
        """(line, imported module, imported name or None) of every import, relative ones resolved."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield node.lineno, alias.name, None
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = self.package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    yield node.lineno, base, alias.name


def _modules() -> list[Module]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append(Module(name, path, ast.parse(path.read_text(), str(path))))
    return found


MODULES = _modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".") or (prefix.endswith(".") and name.startswith(prefix))


def _targets(module: str, name: str | None) -> list[str]:
    """What an import reaches: the module, and ``module.name`` when that names a submodule."""
    return [module] + ([f"{module}.{name}"] if name else [])


def test_layers_import_only_downwards() -> None:
    broken = []
    for module in MODULES:
        for importer, banned in FORBIDDEN.items():
            if not _within(module.name, importer):
                continue
            for line, target, name in module.imports():
                for reached in _targets(target, name):
                    if any(_within(reached, ban) and not _within(reached, module.name) for ban in banned):
                        broken.append(f"{module.path.relative_to(SRC)}:{line} ({module.name}) imports {reached}")
    assert not broken, "\n".join(broken)


def test_private_modules_and_names_stay_in_their_package() -> None:
    """``a.b._c`` is imported only from inside package ``a.b``; ``_name`` only from its own package."""
    broken = []
    for module in MODULES:
        for line, target, name in module.imports():
            if not target.startswith("ml_playground"):
                continue
            parts = target.split(".")
            for index, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:index])
                    if not _within(module.name, owner):
                        broken.append(f"{module.path.relative_to(SRC)}:{line} imports private module {target}")
                    break
            else:
                is_private_name = name is not None and name.startswith("_") and not name.startswith("__")
                if is_private_name and not _within(module.name, target.rpartition(".")[0] or target):
                    broken.append(f"{module.path.relative_to(SRC)}:{line} imports private name {name} of {target}")
    assert not broken, "\n".join(broken)


def test_flows_never_print_and_never_import_each_other_sideways() -> None:
    broken = []
    flow_modules = {m.name for m in MODULES if _within(m.name, "ml_playground.flows.")}
    for module in MODULES:
        if not _within(module.name, "ml_playground.flows"):
            continue
        allowed = FLOW_SHARED | FLOW_OWN.get(module.name, set()) | {module.name}
        for line, target, name in module.imports():
            for reached in _targets(target, name):
                if reached in flow_modules and reached not in allowed:
                    broken.append(f"{module.path.relative_to(SRC)}:{line} imports the flow {reached}")
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Name) and node.id == "print":
                broken.append(f"{module.path.relative_to(SRC)}:{node.lineno} prints")
            if isinstance(node, ast.Attribute) and node.attr in {"stdout", "stderr"}:
                broken.append(f"{module.path.relative_to(SRC)}:{node.lineno} writes to the terminal")
    assert not broken, "\n".join(broken)


def _decides_scheme(node: ast.AST) -> bool:
    def schemey(value: ast.AST) -> bool:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value in SCHEME_NAMES or "://" in value.value
        if isinstance(value, (ast.Tuple, ast.List, ast.Set)):
            return any(schemey(item) for item in value.elts)
        return isinstance(value, ast.Attribute) and value.attr == "scheme"

    if isinstance(node, ast.Compare):
        return schemey(node.left) or any(schemey(c) for c in node.comparators)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        parsing = {"startswith", "endswith", "partition", "rpartition", "split", "rsplit", "find", "index"}
        return node.func.attr in parsing and any(schemey(arg) for arg in node.args)
    return False


def test_only_the_registry_and_the_config_loader_decide_on_schemes() -> None:
    found = [
        f"{module.path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}"
        for module in MODULES
        if module.name not in SCHEME_DECIDERS
        for node in ast.walk(module.tree)
        if _decides_scheme(node)
    ]
    assert not found, "scheme branches or '://' parsing outside the registry and the config loader:\n" + "\n".join(
        found
    )


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_no_module_is_over_300_lines(module: Module) -> None:
    lines = len(module.path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module.path.relative_to(SRC)} has {lines} lines; split it by responsibility"
