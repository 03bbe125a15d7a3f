"""The one walk over a checkpoint's trees of plain data and tensors.

Checking that a tree holds only plain data, listing its tensors in their fixed order, the structure
digest's tokens and copying a tree all go through :func:`walk` (or :func:`map_tensors`), so they agree
on the order and on what counts as a container. The walk uses an explicit stack: a deep tree cannot
exhaust Python's recursion limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ml_playground.errors import CheckpointSchemaError

__all__ = ["PLAIN_SCALARS", "Node", "check_plain_tree", "map_tensors", "tensors_in", "walk"]

PLAIN_SCALARS = (type(None), bool, int, float, str)


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


def walk(tree: object, root_name: str = "") -> Iterator[Node]:
    """Every value of ``tree`` depth first, a container before its items, items in their order.

    Mappings and lists/tuples are containers; anything else (tensors included) is a leaf. A value
    referenced twice is visited twice, as ``torch.save`` and ``torch.load`` see it.
    """
    stack = [Node(tree, None, None, root_name)]
    while stack:
        node = stack.pop()
        yield node
        value = node.value
        if isinstance(value, Mapping):
            stack.extend(reversed([Node(item, node, key) for key, item in value.items()]))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed([Node(item, node, index) for index, item in enumerate(value)]))


def tensors_in(tree: object, root_name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in ``tree``, in walk order."""
    for node in walk(tree, root_name):
        if isinstance(node.value, torch.Tensor):
            yield node.path, node.value


def check_plain_tree(where: str, value: object, *, tensors_allowed: bool) -> None:
    """Raise unless ``value`` is plain data (None, bool, int, float, str, list, tuple, dict) [and tensors]."""
    for node in walk(value, where):
        item = node.value
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
    keep theirs; other values are shared, not copied.
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
