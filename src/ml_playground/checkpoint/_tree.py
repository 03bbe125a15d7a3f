"""The one walk over a checkpoint's trees of plain data and tensors, with bounds on its work.

Checking that a tree holds only plain data, listing its tensors in their fixed order, the structure
digest's tokens and copying a tree all go through :func:`walk` (or :func:`map_tensors`), so they agree
on the order and on what counts as a container. The walk keeps a stack of iterators, one per open
container: it uses memory proportional to the depth, never Python's recursion.

Bounds (docs/reliability.md, "Hostile files"): every walk stops at :data:`MAX_DEPTH` nested containers,
and a walk of a loaded file's content also at a node budget proportional to the bytes its pickle had
(:meth:`Limits.for_pickle`). A value referenced twice is visited twice, as ``torch.save`` and
``torch.load`` see it, so a few hundred bytes of pickle whose tuples reference the level below three
times (3^N values) exceed the budget after a bounded amount of work instead of running for hours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch

from ml_playground.errors import CheckpointCorruptError, CheckpointSchemaError

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DEPTH",
    "NODES_PER_PICKLE_BYTE",
    "PLAIN_SCALARS",
    "Limits",
    "Node",
    "check_plain_tree",
    "map_tensors",
    "tensors_in",
    "walk",
]

PLAIN_SCALARS = (type(None), bool, int, float, str)
MAX_DEPTH = 100
"""Containers nested deeper than this are refused: a checkpoint of ours nests about 8 deep."""
NODES_PER_PICKLE_BYTE = 4
"""A pickle without shared references yields at most about one value per byte (``None`` is one opcode);
a shared small tuple (AdamW's ``betas`` in every param group) about 1.5 per byte of its 2-byte memo
reference. Four per byte, plus :data:`_NODE_FLOOR`, leaves room for both and none for exponential sharing."""
_NODE_FLOOR = 10_000
_EXACT_SCALARS = frozenset(PLAIN_SCALARS)
"""The plain scalar types themselves (a subclass takes the general checks)."""


@dataclass(frozen=True)
class Limits:
    """How much a walk may do: ``max_nodes`` values (None: no budget) nested at most ``max_depth`` deep.

    ``source`` names the file the tree was read from; exceeding a limit then raises
    CheckpointCorruptError naming it. Without a source the tree is the caller's own (a checkpoint being
    built) and exceeding a limit raises CheckpointSchemaError.
    """

    max_nodes: int | None = None
    max_depth: int = MAX_DEPTH
    source: str | None = None

    @classmethod
    def for_pickle(cls, source: str, pickle_bytes: int) -> Limits:
        """The limits of a file's content whose pickle (``data.pkl``) has ``pickle_bytes`` bytes."""
        return cls(NODES_PER_PICKLE_BYTE * max(pickle_bytes, 0) + _NODE_FLOOR, MAX_DEPTH, source)

    def exceeded(self, what: str) -> CheckpointCorruptError | CheckpointSchemaError:
        if self.source is None:
            return CheckpointSchemaError(f"{what}; only plain data of a sensible size can be saved")
        return CheckpointCorruptError(
            f"{self.source} is damaged or hostile: {what}. It was refused before any further work; "
            "only load checkpoints written by ml_playground."
        )


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Node:
    """One value of a tree: where it sits (``parent`` and its key or index there) and the value."""

    value: object
    parent: Node | None
    key: object = None
    """The key in the parent mapping, or the index in the parent list/tuple; None for the root."""
    root_name: str = ""

    @property
    def in_mapping(self) -> bool:
        return self.parent is not None and isinstance(self.parent.value, Mapping)

    @property
    def path(self) -> str:
        """``root.key[index]...``: built when asked, so a deep walk costs no quadratic string work."""
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(f".{node.key}" if node.in_mapping else f"[{node.key}]")
            node = node.parent
        return (node.root_name if node is not None else "") + "".join(reversed(parts))

    @property
    def keys(self) -> tuple[object, ...]:
        """The keys and indices from the root down to this node."""
        keys: list[object] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            keys.append(node.key)
            node = node.parent
        return tuple(reversed(keys))


def _items(value: object) -> Iterator[tuple[object, object]] | None:
    """(key or index, item) of a container, lazily; None for a leaf."""
    kind = type(value)
    if kind in _EXACT_SCALARS:  # most values of a tree: leaves, and the ABC checks below are slow
        return None
    if kind is dict:
        return iter(cast("dict[object, object]", value).items())
    if isinstance(value, Mapping):
        return iter(value.items())
    if isinstance(value, (list, tuple)):
        return enumerate(value)
    return None


def walk(tree: object, root_name: str = "", limits: Limits = DEFAULT_LIMITS) -> Iterator[Node]:
    """Every value of ``tree`` depth first, a container before its items, items in their order.

    Mappings and lists/tuples are containers; anything else (tensors included) is a leaf. A value
    referenced twice is visited twice. Exceeding ``limits`` raises before the offending value is
    yielded (see :class:`Limits`).
    """
    root = Node(tree, None, None, root_name)
    yield root
    items = _items(tree)
    if items is None:
        return
    stack: list[tuple[Node, Iterator[tuple[object, object]]]] = [(root, items)]
    budget = limits.max_nodes
    count = 1
    while stack:
        parent, items = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        key, value = entry
        count += 1
        if budget is not None and count > budget:
            raise limits.exceeded(
                f"its metadata holds more than {budget:,} values (shared references are counted at every use)"
            )
        node = Node(value, parent, key)
        yield node
        children = _items(value)
        if children is not None:
            if len(stack) >= limits.max_depth:
                path = node.path
                where = path if len(path) <= 80 else f"{path[:80]}..."
                raise limits.exceeded(f"{where} nests containers more than {limits.max_depth} deep")
            stack.append((node, children))


def tensors_in(
    tree: object, root_name: str = "", limits: Limits = DEFAULT_LIMITS
) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in ``tree``, in walk order."""
    for node in walk(tree, root_name, limits):
        if isinstance(node.value, torch.Tensor):
            yield node.path, node.value


def check_plain_tree(where: str, value: object, *, tensors_allowed: bool, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise unless ``value`` is plain data (None, bool, int, float, str, list, tuple, dict) [and tensors]."""
    for node in walk(value, where, limits):
        item = node.value
        kind = type(item)
        if kind in _EXACT_SCALARS or kind is list or kind is tuple:  # plain, without the ABC checks below
            continue
        if isinstance(item, Mapping):
            for key in item:
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise CheckpointSchemaError(f"{node.path} has a key of type {type(key).__name__}: {key!r}")
        elif not (
            isinstance(item, (*PLAIN_SCALARS, list, tuple)) or (tensors_allowed and isinstance(item, torch.Tensor))
        ):
            allowed = "tensors and plain data" if tensors_allowed else "plain data (no tensors)"
            raise CheckpointSchemaError(f"{node.path} holds a {type(item).__name__}; only {allowed} may be saved")


def map_tensors(tree: Any, replace: Callable[[torch.Tensor, tuple[object, ...]], torch.Tensor]) -> Any:
    """``tree`` rebuilt with every tensor ``t`` at keys ``k`` replaced by ``replace(t, k)``.

    Dicts keep their type (an OrderedDict stays one), other mappings become dicts, lists and tuples
    keep theirs; other values are shared, not copied. Recursive: call it on trees a bounded walk has
    checked (every loaded tree has been, and every tree being saved: at most :data:`MAX_DEPTH` deep).
    """

    def rebuild(value: Any, keys: tuple[object, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            return replace(value, keys)
        if isinstance(value, Mapping):
            kind = type(value) if isinstance(value, dict) else dict
            return kind((key, rebuild(item, (*keys, key))) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(rebuild(item, (*keys, index)) for index, item in enumerate(value))
        return value

    return rebuild(tree, ())
