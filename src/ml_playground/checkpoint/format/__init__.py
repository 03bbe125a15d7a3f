"""The checkpoint file format: a ``torch.save`` archive of tensors and plain data, with its own digests.

A file is a plain ``torch.save`` archive, so ``torch.load(weights_only=True)`` reads it without this
package. Its top level (format version 3) is::

    {"format": "ml_playground.checkpoint", "format_version": 3,
     "meta": {iter_num, best_val_loss, model_args, config, data_state, world_size},
     "model": {...}, "ema": {...} | None, "rng_state": {...}, "optimizer": {...}, "shards": None | {...},
     "integrity": {"algorithm": "xxh3_64", "structure": HEX, "tensors": uint8 tensor (N, 8)}}

``integrity.tensors`` holds one digest of every tensor's bytes in traversal order; ``structure`` covers
every key, plain value, dtype and shape (docs/file-format.md). This package is the only code that knows
the layout: the rest of the package calls the functions below. What it borrows from torch's archive
writer and reader is in ``_torch`` and ``_zip_layout``, each assumption with a test that names it.
"""

from ml_playground.checkpoint.format._decode import Source, decode, usable_device, verify, verify_sections
from ml_playground.checkpoint.format._digests import integrity_record
from ml_playground.checkpoint.format._encode import encode
from ml_playground.checkpoint.format._migrations import MIGRATIONS, TENSOR_SECTIONS
from ml_playground.checkpoint.format._tensors import plain_tensor_problem
from ml_playground.checkpoint.format._torch import MapLocation
from ml_playground.checkpoint.format._version import FORMAT_MAGIC, FORMAT_VERSION
from ml_playground.checkpoint.format._weights import read_weights
from ml_playground.checkpoint.format._zip_layout import coalesce

__all__ = [
    "FORMAT_MAGIC",
    "FORMAT_VERSION",
    "MIGRATIONS",
    "TENSOR_SECTIONS",
    "MapLocation",
    "Source",
    "coalesce",
    "decode",
    "encode",
    "integrity_record",
    "plain_tensor_problem",
    "read_weights",
    "usable_device",
    "verify",
    "verify_sections",
]
