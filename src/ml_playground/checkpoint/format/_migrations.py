"""Older format versions, carried forward: ``MIGRATIONS[v]`` turns a verified payload of version ``v`` into ``v + 1``.

``decode`` verifies a file against its own version's integrity record first, then applies these in turn.
Every version has a file written by its encoder in ``tests/data/`` (docs/file-format.md, Versions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ml_playground.checkpoint.format import _digests

__all__ = ["MIGRATIONS", "TENSOR_SECTIONS"]

Payload = dict[str, Any]
TENSOR_SECTIONS = ("model", "ema", "rng_state", "optimizer")
"""The tensor sections in the current format's order."""


def _v1_to_v2(payload: Payload) -> Payload:
    """v2 orders the sections model, ema, rng_state, optimizer and keeps the digests as a uint8 tensor.

    The record is carried over, not recomputed: the digests are permuted into the new order, and the
    structure digest is re-derived only where the old one matches (a load with ``verify=False``
    migrates unchecked payloads; damage there stays detectable by ``verify_sections``).
    """
    old_body = {key: value for key, value in payload.items() if key != "integrity"}
    body = {
        **{key: payload[key] for key in ("format", "format_version", "meta", *TENSOR_SECTIONS)},
        "format_version": 2,
    }
    stored = payload["integrity"]
    if not isinstance(stored, dict):
        return {**body, "integrity": stored}
    old_digests = _digests.stored_digests(stored.get("tensors"), 1)
    old_tensors = list(_digests.tensors(old_body))
    tensors: torch.Tensor | None = None
    if old_digests is not None and len(old_digests) == len(old_tensors):
        by_section: dict[str, list[bytes]] = {}
        for (section, _, _), digest in zip(old_tensors, old_digests, strict=True):
            by_section.setdefault(section, []).append(digest)
        tensors = _digests.digest_tensor(
            [digest for section in TENSOR_SECTIONS for digest in by_section.get(section, [])]
        )
    structure = (
        _digests.structure_record(body)
        if stored.get("structure") == _digests.structure_record(old_body)["structure"]
        else {}
    )
    return {**body, "integrity": {**stored, **structure, "tensors": tensors}}


def _v2_to_v3(payload: Payload) -> Payload:
    """v3 records the world size a checkpoint was written at (``meta.world_size``); older files were
    written by one process. The structure digest is re-derived only where the old one matches."""
    meta = payload["meta"]
    if not isinstance(meta, dict):
        return {**payload, "format_version": 3}
    old_body = {key: value for key, value in payload.items() if key != "integrity"}
    body = {**old_body, "format_version": 3, "meta": {**meta, "world_size": 1}, "shards": None}
    stored = payload["integrity"]
    if not isinstance(stored, dict):
        return {**body, "integrity": stored}
    matches = stored.get("structure") == _digests.structure_record(old_body)["structure"]
    return {**body, "integrity": {**stored, **(_digests.structure_record(body) if matches else {})}}


MIGRATIONS: dict[int, Callable[[Payload], Payload]] = {1: _v1_to_v2, 2: _v2_to_v3}
"""``MIGRATIONS[v]`` turns a verified payload of format version ``v`` into version ``v + 1``."""
