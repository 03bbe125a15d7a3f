"""The tensors of a checkpoint payload in their fixed order, and the xxh3 digest of each one's bytes."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import xxhash

__all__ = ["DIGEST_SIZE", "tensor_digest", "tensors", "tensors_in"]

DIGEST_SIZE = 8


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """xxh3-64 of a tensor's logical bytes (8 bytes, big-endian), read in place (no copy for a
    contiguous CPU tensor)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.resolve_conj().resolve_neg().contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return xxhash.xxh3_64_digest(b"")
    return xxhash.xxh3_64_digest((ctypes.c_char * nbytes).from_address(tensor.data_ptr()))


def tensors(body: Mapping[str, Any]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(section, path, tensor) of every tensor in a payload body, in its order."""
    for section, value in body.items():
        for path, tensor in tensors_in(value, section):
            yield section, path, tensor


def tensors_in(tree: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from tensors_in(value, f"{path}.{key}")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from tensors_in(value, f"{path}[{index}]")
