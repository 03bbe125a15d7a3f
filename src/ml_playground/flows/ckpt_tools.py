"""Checkpoint tools behind ``ml-playground ckpt``: list, show, verify, copy and export, on any store.

Every function takes validated locations (from :mod:`ml_playground.config_loader`) and goes through
:func:`~ml_playground.checkpoint.open_store`, so local paths and ``s3://`` / ``gs://`` URLs work alike.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from ml_playground.checkpoint import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    CheckpointInfo,
    CheckpointManager,
    CheckpointName,
    CheckpointStore,
    LocalStore,
    open_store,
)
from ml_playground.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNameError,
    ConfigError,
    MissingExtraError,
    StorageError,
)
from ml_playground.flows.events import EventSink, Transferred
from ml_playground.locations import Location

__all__ = [
    "CopyResult",
    "VerifyResult",
    "copy_checkpoints",
    "export_safetensors",
    "list_checkpoints",
    "read_checkpoint",
    "summarize",
    "verify",
]

_CHUNK = 4 << 20


def list_checkpoints(location: Location) -> tuple[str, list[CheckpointInfo]]:
    """The store's URL and its committed checkpoints, newest first."""
    manager = CheckpointManager(open_store(location))
    return manager.store.url, manager.checkpoints()


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


def verify(location: Location, name: str | None = None) -> VerifyResult:
    """Fully read and check every checkpoint in ``location`` (or just ``name``); collect every failure."""
    store = open_store(location)
    names = [name] if name is not None else [o.name for o in store.list() if o.name.startswith(CHECKPOINT_PREFIX)]
    good: list[str] = []
    bad: dict[str, str] = {}
    for each in sorted(names):
        try:
            read_checkpoint(location, each)
        except CheckpointError as exc:
            bad[each] = str(exc)
        else:
            good.append(each)
    return VerifyResult(store.url, good, bad)


@dataclass(frozen=True)
class CopyResult:
    source: str
    destination: str
    copied: list[str]


def copy_checkpoints(
    src: Location,
    dst: Location,
    *,
    name: str | None = None,
    dst_name: str | None = None,
    on_event: EventSink | None = None,
) -> CopyResult:
    """Copy a run (every checkpoint in ``src``) or one checkpoint ``name`` into ``dst``.

    Every target name is checked (its form, the target store's name limit, no clash) before the first
    byte is copied. Each file is then copied into a private temporary directory (``TMPDIR``), verified
    there (digests, and its content against its name), and only those verified bytes are written
    through the target store's atomic write: a file that fails verification, or any error, leaves
    nothing under the target name. Existing names in ``dst`` are never overwritten.
    """
    source = open_store(src)
    if name is None:
        names = [info.filename for info in sorted(CheckpointManager(source).checkpoints(), key=lambda i: i.iter_num)]
        if not names:
            raise CheckpointError(f"no checkpoints in {source.url} to copy")
    else:
        names = [name]
    target = open_store(dst, create=True)
    pairs = [(each, dst_name or each) for each in names]
    for _, out_name in pairs:  # before copying anything: never half a run
        _check_target_name(out_name, target)
    sizes = {obj.name: obj.size for obj in source.list()}
    present = {obj.name for obj in target.list()}
    clashes = [out_name for _, out_name in pairs if out_name in present]
    if clashes:
        raise CheckpointExistsError(
            f"{target.url} already holds {', '.join(clashes)}; nothing was copied (names are never overwritten)"
        )
    copied = []
    with tempfile.TemporaryDirectory(prefix="ml_playground-cp-") as staging_dir:
        staging = LocalStore(Path(staging_dir))
        for each, out_name in pairs:
            _stage(source, each, staging, out_name, sizes.get(each, 0), on_event)
            try:
                CheckpointManager(staging).load(out_name, mmap=True)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"{source.url}/{each} failed verification; nothing was written to {target.url}/{out_name}: {exc}"
                ) from None
            with staging.open(out_name) as reader, target.write(out_name) as writer:
                _copy_stream(reader, writer, sizes.get(each, 0), f"{each} -> {target.url}", on_event)
            staging.delete(out_name)
            copied.append(out_name)
    return CopyResult(source.url, target.url, copied)


def _stage(
    source: CheckpointStore, name: str, staging: LocalStore, out_name: str, size: int, on_event: EventSink | None
) -> None:
    """``name`` of ``source`` copied into the local ``staging`` store as ``out_name``, if there is room."""
    free = shutil.disk_usage(staging.path).free
    if size > free:
        raise StorageError(
            f"cannot copy {source.url}/{name} ({size:,} bytes): {staging.path.parent} (TMPDIR), where each file is "
            f"verified before it is written, has {free:,} bytes free; point TMPDIR at a larger directory"
        )
    with source.open(name) as reader, staging.write(out_name) as writer:
        _copy_stream(reader, writer, size, f"{name} (verifying)", on_event)


def _check_target_name(name: str, target: CheckpointStore) -> None:
    if name.startswith(CHECKPOINT_PREFIX):
        try:
            CheckpointName.parse(name)
        except CheckpointNameError as exc:
            raise CheckpointNameError(f"cannot copy to {target.url}/{name}: {exc}; nothing was copied") from None
    limit = target.capabilities.max_name_bytes
    length = len(name.encode("utf-8", "surrogateescape"))
    if limit is not None and length > limit:
        raise CheckpointNameError(
            f"cannot copy {name[:60]}... to {target.url}: its name has {length} bytes, and {target.url} holds "
            f"names of at most {limit} bytes; nothing was copied (copy it under a shorter name: ckpt cp FILE DST/NAME)"
        )


def _copy_stream(reader: IO[bytes], writer: IO[bytes], size: int, label: str, on_event: EventSink | None) -> None:
    done = 0
    while chunk := reader.read(_CHUNK):
        writer.write(chunk)
        done += len(chunk)
        if on_event is not None:
            on_event(Transferred(label, done, size))


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
