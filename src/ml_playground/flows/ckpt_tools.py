"""Checkpoint tools behind ``ml-playground ckpt``: list, show, verify and export, on any store (copies:
:mod:`.ckpt_copy`).

Every function takes validated locations (from :mod:`ml_playground.config_loader`) and goes through
:func:`~ml_playground.checkpoint.open_store`, so local paths and ``s3://`` / ``gs://`` URLs work alike.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from dataclasses import dataclass

import torch

from ml_playground.checkpoint import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    CheckpointInfo,
    CheckpointManager,
    CheckpointStore,
    StoredObject,
    discover,
    open_store,
)
from ml_playground.errors import (
    CheckpointError,
    CheckpointExistsError,
    ConfigError,
    MissingExtraError,
)
from ml_playground.locations import Location

__all__ = [
    "Listing",
    "VerifyResult",
    "export_safetensors",
    "list_checkpoints",
    "read_checkpoint",
    "summarize",
    "verify",
]

_CHUNK = 4 << 20


@dataclass(frozen=True)
class Listing:
    url: str
    checkpoints: list[CheckpointInfo]
    """Newest first; a sharded one with its parts and world size."""
    leftovers: list[StoredObject]
    """Parts of sharded saves that did not complete (or are being written): the next writer removes them."""


def list_checkpoints(location: Location) -> Listing:
    """The store's committed checkpoints and leftovers; a ``ckpt_`` name that parses as neither raises."""
    store = open_store(location)
    found = discover(store.list()).strict()
    return Listing(store.url, found.checkpoints, found.leftovers)


def read_checkpoint(location: Location, name: str) -> tuple[Checkpoint, str]:
    """Load and verify one checkpoint file. A ``ckpt_`` name must match its content; other names are
    read as copies of a checkpoint (e.g. ``model.pt``) and only their checksums are checked."""
    manager = CheckpointManager(open_store(location))
    return manager.load(name), f"{manager.store.url}/{name}"


@dataclass(frozen=True)
class VerifyResult:
    url: str
    good: list[str]
    bad: dict[str, str]
    leftovers: list[str]
    """Listed, never failing the check: parts of saves that did not complete (the next writer removes them)."""


def verify(location: Location, name: str | None = None) -> VerifyResult:
    """Fully read and check every checkpoint in ``location`` (a sharded one with all of its parts), or just
    ``name``; collect every failure. A ``ckpt_`` name that is neither a checkpoint's nor a part's is bad."""
    store = open_store(location)
    manager = CheckpointManager(store)
    found = discover(store.list())
    sharded = {info.filename for info in found.checkpoints if info.sharded}
    leftovers: list[str] = []
    bad: dict[str, str] = {}
    if name is not None:
        names = [name]
    else:
        names = [info.filename for info in found.checkpoints]
        leftovers = [obj.name for obj in found.leftovers]
        bad = {each: str(error) for each, error in found.unparsable.items()}
    good: list[str] = []
    for each in sorted(names):
        try:
            if each in sharded:  # its manifest against its name, then every byte of its parts (one item at a time)
                manager.load_manifest(each)
                manager.verify(each)
            else:
                manager.load(each)
        except CheckpointError as exc:
            bad[each] = str(exc)
        else:
            good.append(each)
    return VerifyResult(store.url, good, dict(sorted(bad.items())), leftovers)


def export_safetensors(
    checkpoint: Checkpoint, source: str, out: Location, out_name: str, *, use_ema: bool = True
) -> tuple[str, str]:
    """Write the model weights (EMA when present and ``use_ema``) as safetensors; returns (URL, weights)."""
    if importlib.util.find_spec("safetensors") is None:
        raise MissingExtraError(
            "ckpt export needs the safetensors package, which is not installed; "
            "install it with: pip install 'ml_playground[export]'"
        )
    if out_name.startswith(CHECKPOINT_PREFIX):  # it would be listed as a checkpoint of that run, and fail to load
        raise ConfigError(
            f"cannot export to {out_name!r}: names starting with {CHECKPOINT_PREFIX!r} are checkpoints'; "
            "choose another name (e.g. model.safetensors)"
        )
    from safetensors.torch import save

    weights = "ema" if use_ema and checkpoint.ema is not None else "raw"
    state = checkpoint.ema if use_ema and checkpoint.ema is not None else checkpoint.model
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    metadata = {
        "format": "ml_playground.weights",
        "source": source,
        "iter_num": str(checkpoint.iter_num),
        "weights": weights,
        "model_args": json.dumps(dict(checkpoint.model_args), sort_keys=True),
        "vocab": json.dumps(checkpoint.data_state.get("vocab")),
    }
    payload = save(tensors, metadata=metadata)
    store: CheckpointStore = open_store(out, create=True)
    try:
        with store.write(out_name) as stream:
            shutil.copyfileobj(io.BytesIO(payload), stream, _CHUNK)
    except CheckpointExistsError:
        raise CheckpointExistsError(
            f"{store.url}/{out_name} already exists; it was not overwritten: remove it or choose another name"
        ) from None
    return f"{store.url}/{out_name}", weights


def summarize(checkpoint: Checkpoint) -> dict[str, object]:
    """Metadata of a checkpoint for ``ckpt show``: no model is built."""
    params = sum(t.numel() for t in checkpoint.model.values() if isinstance(t, torch.Tensor))
    data = dict(checkpoint.data_state)
    vocab = data.pop("vocab", None)
    return {
        "iteration": checkpoint.iter_num,
        "world size": checkpoint.world_size,
        "best metric": checkpoint.best_val_loss,
        "model args": dict(checkpoint.model_args),
        "parameters": params,
        "EMA weights": "yes" if checkpoint.has_ema else "no",
        "optimizer state": "yes" if checkpoint.optimizer else "no",
        "RNG state": ", ".join(sorted(checkpoint.rng_state)) or "none",
        "data state": data,
        "vocabulary": f"{len(vocab)} characters" if isinstance(vocab, str) else "none",
    }
