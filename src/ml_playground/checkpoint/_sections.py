"""Integrity checks of only some top-level sections of a payload (a weights-only load has no optimizer bytes).

INTEGRATION POINT (issue 6, target 7): ``_codec.verify_sections(payload, source, sections)`` is
being added on main with the format version 2 integrity record; when it lands, :func:`verify_sections`
here is replaced by it (``_weights.py`` is its only caller) and this module is deleted. Until then
it checks format version 1 files the way ``_codec._verify_integrity`` does, reading the codec's own
helpers: the structure digest over the whole payload (keys, plain values, dtypes and shapes: no
tensor bytes), and the tensor digests of the tensors in ``sections`` only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import xxhash

from ml_playground.checkpoint import _codec
from ml_playground.checkpoint._checkpoint import check_plain_tree
from ml_playground.errors import CheckpointCorruptError, CheckpointSchemaError, UnsafeCheckpointError

__all__ = ["verify_sections"]


def verify_sections(payload: dict[str, Any], source: str, sections: Collection[str]) -> None:
    """Raise CheckpointCorruptError unless the structure and the tensors of ``sections`` match their digests."""
    stored = payload["integrity"]
    if not isinstance(stored, dict) or stored.get("algorithm") != _codec._ALGORITHM:
        raise CheckpointCorruptError(f"{source} has no readable integrity record")
    body = {key: value for key, value in payload.items() if key != "integrity"}
    try:
        check_plain_tree("checkpoint", body, tensors_allowed=True)
    except CheckpointSchemaError as exc:
        raise UnsafeCheckpointError(f"{source}: {exc}") from None
    structure = xxhash.xxh3_64()
    for token in _codec._structure_tokens(body):
        structure.update(token.encode("utf-8", "surrogatepass"))
    if stored.get("structure") != structure.hexdigest():
        raise CheckpointCorruptError(
            f"{source} is damaged: its metadata does not match its checksum. Delete it, or restore it from a copy."
        )
    expected = stored.get("tensors")
    tensors = [(key, path, tensor) for key, value in body.items() for path, tensor in _codec._tensors(value, key)]
    if not isinstance(expected, list) or len(expected) != len(tensors):
        raise CheckpointCorruptError(f"{source} is damaged: its tensor checksums are incomplete")
    for (section, path, tensor), want in zip(tensors, expected, strict=True):
        if section in sections and want != _codec.tensor_digest(tensor):
            raise CheckpointCorruptError(
                f"{source} is damaged: the bytes of tensor {path} do not match their checksum. "
                "Delete it, or restore it from a copy."
            )
