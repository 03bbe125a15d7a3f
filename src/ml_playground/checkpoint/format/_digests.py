"""A payload's tensors in their fixed order, the xxh3 digest of each one's bytes, and the integrity record's parts."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import xxhash

from ml_playground.checkpoint._tree import Node, tensors_in, walk

__all__ = [
    "ALGORITHM",
    "DIGEST_SIZE",
    "digest_tensor",
    "integrity_record",
    "stored_digests",
    "structure_record",
    "tensor_digest",
    "tensors",
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
    """The record's algorithm and the digest of ``body``'s structure: every key, plain value, dtype and shape."""
    structure = xxhash.xxh3_64()
    for node in walk(body):
        structure.update(_token(node).encode("utf-8", "surrogatepass"))
    return {"algorithm": ALGORITHM, "structure": structure.hexdigest()}


def _token(node: Node) -> str:
    key = f"{type(node.key).__name__}:{node.key!r};" if node.in_mapping else ""
    value = node.value
    if isinstance(value, torch.Tensor):
        return f"{key}T{value.dtype}{tuple(value.shape)};"
    if isinstance(value, Mapping):
        return f"{key}{{{len(value)};"
    if isinstance(value, (list, tuple)):
        return f"{key}[{type(value).__name__}{len(value)};"
    if isinstance(value, float):
        return f"{key}f{value.hex()};"
    return f"{key}{type(value).__name__}:{value!r};"


def integrity_record(body: Mapping[str, Any]) -> dict[str, Any]:
    """The integrity record of ``body``, computed in line (``encode`` overlaps the hashing with the write)."""
    return {**structure_record(body), "tensors": digest_tensor([tensor_digest(t) for _, _, t in tensors(body)])}
