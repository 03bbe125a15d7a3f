"""A payload's tensors in their fixed order, the xxh3 digest of each one's bytes, and the integrity record's parts."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import xxhash

__all__ = [
    "ALGORITHM",
    "DIGEST_SIZE",
    "digest_tensor",
    "stored_digests",
    "structure_record",
    "tensor_digest",
    "tensors",
    "tensors_in",
]

DIGEST_SIZE = 8
ALGORITHM = "xxh3_64"


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


def stored_digests(stored: object, version: int) -> list[bytes] | None:
    """The digests as the file keeps them (v1: hex strings; v2: a uint8 tensor, a row per tensor)."""
    if version == 1:
        if not isinstance(stored, list) or not all(isinstance(h, str) and len(h) == 2 * DIGEST_SIZE for h in stored):
            return None
        try:
            return [bytes.fromhex(h) for h in stored]
        except ValueError:
            return None
    if (
        not isinstance(stored, torch.Tensor)
        or stored.dtype != torch.uint8
        or stored.dim() != 2
        or stored.shape[1] != DIGEST_SIZE
    ):
        return None
    return [bytes(row) for row in stored.tolist()]


def digest_tensor(digests: list[bytes]) -> torch.Tensor:
    return torch.tensor([list(d) for d in digests], dtype=torch.uint8).reshape(len(digests), DIGEST_SIZE)


def structure_record(body: Mapping[str, Any]) -> dict[str, str]:
    structure = xxhash.xxh3_64()
    for token in _structure_tokens(body):
        structure.update(token.encode("utf-8", "surrogatepass"))
    return {"algorithm": ALGORITHM, "structure": structure.hexdigest()}


def _structure_tokens(tree: Any) -> Iterator[str]:
    if isinstance(tree, torch.Tensor):
        yield f"T{tree.dtype}{tuple(tree.shape)};"
    elif isinstance(tree, Mapping):
        yield f"{{{len(tree)};"
        for key, value in tree.items():
            yield f"{type(key).__name__}:{key!r};"
            yield from _structure_tokens(value)
    elif isinstance(tree, (list, tuple)):
        yield f"[{type(tree).__name__}{len(tree)};"
        for value in tree:
            yield from _structure_tokens(value)
    elif isinstance(tree, float):
        yield f"f{tree.hex()};"
    else:
        yield f"{type(tree).__name__}:{tree!r};"
