"""Only plain tensors: strided, non-overlapping, every element inside their storage.

A file may describe a tensor that is not what our writer produces: sparse, quantized, nested or meta
(torch's weights-only loader accepts the first and the last), or a strided view whose strides repeat
bytes (``zeros(1).expand(2**40)``: one stored element, 8 TB once ``.contiguous()`` or a digest touches
it). Every loaded payload goes through :func:`check_loaded` right after ``torch.load``: one walk, bounded
by the pickle's size (:class:`~ml_playground.checkpoint._tree.Limits`), that checks every tensor's
layout, strides and storage before anything reads a tensor's bytes or builds anything from them. A
checkpoint being saved goes through :func:`check_saveable` before a byte is written.
"""

from __future__ import annotations

from typing import Any

import torch

from ml_playground.checkpoint._checkpoint import Checkpoint
from ml_playground.checkpoint._tree import Limits, walk
from ml_playground.checkpoint.format._zip_layout import Archive
from ml_playground.errors import CheckpointCorruptError, CheckpointError

__all__ = ["check_loaded", "check_saveable", "plain_tensor_problem"]


def plain_tensor_problem(
    tensor: torch.Tensor, *, meta_ok: bool = False, max_storage_bytes: int | None = None
) -> str | None:
    """Why ``tensor`` is not a plain tensor (a phrase to follow "it is"), or None if it is one.

    Plain: strided layout, not quantized or nested, with data (no meta tensor unless ``meta_ok``), every
    dimension of more than one element with a stride of its own (non-overlapping, in any order of
    dimensions: no element is stored once and read twice; a view with gaps, ``x[::3]``, is fine), and
    every element inside its storage (of at most ``max_storage_bytes``): its bytes, which a digest reads,
    are then never more than the file holds.
    """
    if tensor.layout != torch.strided:
        return f"of layout {tensor.layout} (only dense, strided tensors are stored)"
    if tensor.is_quantized or tensor.is_nested:
        return "quantized" if tensor.is_quantized else "nested"
    if tensor.device.type == "meta":
        return None if meta_ok else "a meta tensor (it has no data)"
    extent = 1  # elements spanned by the dimensions checked so far
    for stride, size in sorted((t, s) for s, t in zip(tensor.shape, tensor.stride(), strict=True) if s > 1):
        if stride < extent:
            what = "repeats its elements (stride 0: an expanded view)" if stride == 0 else "has overlapping strides"
            return f"a view that {what}; shape {tuple(tensor.shape)}, strides {tuple(tensor.stride())}"
        extent = stride * (size - 1) + extent
    needed = (tensor.storage_offset() + (extent if tensor.numel() else 0)) * tensor.element_size()
    storage = tensor.untyped_storage()
    if max_storage_bytes is not None and storage.nbytes() > max_storage_bytes:
        return f"backed by a storage of {storage.nbytes()} bytes, more than the file holds"
    if tensor.numel() and needed > storage.nbytes():
        return f"{needed} bytes past its storage's start, beyond its storage of {storage.nbytes()} bytes"
    return None


def check_loaded(payload: Any, archive: Archive, *, meta_ok: bool = False) -> None:
    """One walk of a freshly loaded payload, bounded by ``archive``'s pickle size: every tensor must be plain.

    Raises CheckpointCorruptError naming the file (and the tensor) otherwise. Call it before anything
    else walks the payload or reads a tensor's bytes.
    """
    limits = Limits.for_pickle(archive.source, archive.pickle_size())
    size = archive.size()
    for node in walk(payload, "", limits):
        if isinstance(node.value, torch.Tensor):
            problem = plain_tensor_problem(node.value, meta_ok=meta_ok, max_storage_bytes=size)
            if problem is not None:
                raise CheckpointCorruptError(
                    f"{archive.source} is damaged or hostile: its tensor {node.path.lstrip('.')} is {problem}"
                )


def check_saveable(checkpoint: Checkpoint, destination: str) -> None:
    """Raise CheckpointError, before anything is written, if a tensor of ``checkpoint`` is not plain."""
    sections = (
        ("model", checkpoint.model),
        ("ema", checkpoint.ema),
        ("rng_state", checkpoint.rng_state),
        ("optimizer", checkpoint.optimizer),
    )
    for section, tree in sections:
        for node in walk(tree, section):
            if isinstance(node.value, torch.Tensor):
                problem = plain_tensor_problem(node.value)
                if problem is not None:
                    raise CheckpointError(
                        f"cannot save {destination}: tensor {node.path} is {problem}; save plain tensors "
                        "(.contiguous(), .to_dense(), .dequantize()). Nothing was written."
                    )
