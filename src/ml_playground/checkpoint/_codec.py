"""Checkpoint <-> bytes.

A file is a plain ``torch.save`` archive of tensors and plain data, so ``torch.load(weights_only=True)``
reads it without this package. Its top level (format version 2) is::

    {"format": "ml_playground.checkpoint", "format_version": 2,
     "meta": {iter_num, best_val_loss, model_args, config, data_state},
     "model": {...}, "ema": {...} | None, "rng_state": {...}, "optimizer": {...},
     "integrity": {"algorithm": "xxh3_64", "structure": HEX, "tensors": uint8 tensor (N, 8)}}

``integrity.tensors`` holds one digest of every tensor's bytes in traversal order; ``structure`` covers
every key, plain value, dtype and shape. ``torch.load`` itself detects no flipped byte in tensor data,
so these digests are what make a damaged file an error instead of a silently wrong model.

Speed (docs/performance.md): ``torch.save``'s zip writer computes a CRC32 of every record by default, a
whole extra pass over the tensor bytes that ``torch.load`` never checks; our xxh3 digests are the check,
so ``encode`` turns that CRC off for its own ``torch.save`` call (the records' CRC fields then read 0;
``torch.load`` is unaffected, ``unzip -t`` would complain). The digests are computed by a second thread
while ``torch.save`` writes the tensors: they are a tensor, the archive's last tensor record, so they are
needed only at the end of the write (version 1 kept them as hex strings inside ``data.pkl``, the first
record, which made the hashing a pass of its own before the write). The section order (model and EMA
first, the optimizer last) keeps the weights an evaluation needs in one run of bytes near the file's
start. A file given as a local path is read by ``torch.load``'s own reader, or memory-mapped when the
caller asks.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch.utils.serialization import config as serialization_config

from ml_playground.checkpoint import _digests
from ml_playground.checkpoint._checkpoint import FORMAT_VERSION, Checkpoint, check_plain_tree
from ml_playground.checkpoint._migrations import MIGRATIONS, TENSOR_SECTIONS
from ml_playground.checkpoint._zip_layout import check_storage_alignment, refuse_other_byte_order
from ml_playground.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSchemaError,
    CheckpointVersionError,
    MLPlaygroundError,
    StorageError,
    UnsafeCheckpointError,
)

__all__ = ["FORMAT_MAGIC", "MIGRATIONS", "TENSOR_SECTIONS", "decode", "encode", "verify", "verify_sections"]

FORMAT_MAGIC = "ml_playground.checkpoint"
_ALGORITHM = _digests.ALGORITHM
_ZIP_MAGIC = b"PK\x03\x04"
_DIGEST_SIZE = _digests.DIGEST_SIZE
_META_FIELDS = ("iter_num", "best_val_loss", "model_args", "config", "data_state")

Payload = dict[str, Any]
Source = IO[bytes] | Path
"""What ``decode``/``verify`` read: an open binary stream, or the path of a local file."""

_CRC32_SWITCH = threading.Lock()
_OFFSETS_SWITCH = threading.Lock()


def encode(checkpoint: Checkpoint, stream: IO[bytes], *, destination: str = "the stream") -> None:
    """Write ``checkpoint`` to ``stream`` (which need not be seekable); ``destination`` names it in errors."""
    body: Payload = {
        "format": FORMAT_MAGIC,
        "format_version": FORMAT_VERSION,
        "meta": {
            "iter_num": checkpoint.iter_num,
            "best_val_loss": checkpoint.best_val_loss,
            "model_args": dict(checkpoint.model_args),
            "config": dict(checkpoint.config),
            "data_state": dict(checkpoint.data_state),
        },
        "model": dict(checkpoint.model),
        "ema": None if checkpoint.ema is None else dict(checkpoint.ema),
        "rng_state": dict(checkpoint.rng_state),
        "optimizer": dict(checkpoint.optimizer),
    }
    tensors = [tensor for _, _, tensor in _digests.tensors(body)]
    with _DigestThread(tensors, destination) as digests, contextlib.ExitStack() as crc_off:
        # The digest tensor starts as random bytes that no other record of the archive can equal; the
        # sink recognises that record when torch writes it (last) and writes the digests in its place.
        # (os.urandom, not torch's generator: a save must not move the training's RNG state)
        placeholder = os.urandom(len(tensors) * _DIGEST_SIZE)
        rows = torch.tensor(list(placeholder), dtype=torch.uint8).reshape(len(tensors), _DIGEST_SIZE)
        payload = {**body, "integrity": {**_digests.structure_record(body), "tensors": rows}}
        crc_off.enter_context(_crc32_off())
        # torch reads the CRC switch once, when it opens its zip writer, before its first write: the switch
        # goes back at that first write, so other threads' saves neither wait for ours nor lose their CRCs
        sink = _ErrorKeepingSink(stream, placeholder, digests.result, on_first_write=crc_off.close)
        try:
            torch.save(payload, cast(IO[bytes], sink))  # torch only calls write() and flush()
        except BaseException as exc:
            if sink.error is not None and sink.error is not exc:
                raise sink.error from None  # torch.save reports it as RuntimeError("unexpected pos ...")
            raise
        if sink.error is not None:
            raise sink.error
        if tensors and not sink.replaced:
            raise CheckpointError(
                f"saving {destination} was abandoned: this torch version's writer (torch {torch.__version__}) did "
                "not write the checkpoint's integrity record as one piece. Report this to ml_playground."
            )


class _DigestThread:
    """Hashes tensors on a second thread while the caller writes them (xxhash releases the GIL).

    ``result()`` waits for every digest; leaving the ``with`` block stops the thread early (between two
    tensors) when the write failed and waits for it, so no thread outlives a save. (A second Ctrl-C
    during that wait leaves the daemon thread to finish its current tensor on its own; it only reads.)
    """

    def __init__(self, tensors: list[torch.Tensor], destination: str) -> None:
        self._tensors = tensors
        self._destination = destination
        self._digests: list[bytes] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ml_playground-checksums", daemon=True)

    def __enter__(self) -> _DigestThread:
        try:
            self._thread.start()
        except RuntimeError as exc:  # "can't start new thread": the process is at its thread limit
            raise CheckpointError(
                f"saving {self._destination} failed before writing: the thread that computes its checksums "
                f"could not start ({exc}); the process is at its thread limit"
            ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            for tensor in self._tensors:
                if self._stop.is_set():
                    return
                self._digests.append(_digests.tensor_digest(tensor))
        except BaseException as exc:  # handed to the writer by result(); never lost in the thread
            self._error = exc

    def result(self) -> bytes:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return b"".join(self._digests)


class _ErrorKeepingSink:
    """Passes writes through, keeps the first exception a write raised, and fills in the digests.

    ``torch.save`` turns an exception raised by ``write`` (a full disk, a failed upload, even
    KeyboardInterrupt) into ``RuntimeError("unexpected pos ...")``; the store's own error, which
    names the path or URL and the cause, is what the caller must see. The write that carries the
    integrity record's placeholder bytes waits for the digests and writes them instead (torch's zip
    writer hands over an uncompressed record in one write, straight from the tensor's memory).
    """

    def __init__(
        self,
        stream: IO[bytes],
        placeholder: bytes,
        digests: Callable[[], bytes],
        on_first_write: Callable[[], object],
    ) -> None:
        self._stream = stream
        self._placeholder = placeholder
        self._digests = digests
        self._on_first_write: Callable[[], object] | None = on_first_write
        self.replaced = False
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        try:
            first = self._on_first_write
            if first is not None:
                self._on_first_write = None
                first()
            if not self.replaced and len(data) == len(self._placeholder) and bytes(data) == self._placeholder:
                self.replaced = True
                digests = self._digests()
                self._stream.write(digests)
                return len(digests)
            return self._stream.write(data)
        except BaseException as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._stream.flush()


@contextlib.contextmanager
def _crc32_off() -> Iterator[None]:
    # The switch is process-global: a save of ours holds one lock while it is off (until torch has opened
    # its writer) and restores the previous value, so two saves of ours never flip it under each other. A
    # plain torch.save another thread starts in that moment writes zero CRC fields; torch.load ignores them.
    with _CRC32_SWITCH:
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(previous)


def decode(
    data: Source,
    *,
    source: str,
    map_location: torch.device | str | None = None,
    verify: bool = True,
    mmap: bool = False,
) -> Checkpoint:
    """Read, check and return the checkpoint in ``data``; ``source`` names it in every error.

    ``verify=False`` skips the checksums (DESIGN.md, Integrity: only when the caller asks; run
    :func:`verify` later). ``mmap=True`` needs a local ``Path``: tensors are then backed by the file's
    pages (copy-on-write), so the call returns before the tensor bytes are read.
    """
    if mmap and not isinstance(data, Path):
        raise ValueError(f"mmap loading needs a local file path; {source} is a stream")
    # Verification reads the bytes as loaded: a payload bound for another device (or "meta", which has
    # no bytes) is verified on the CPU first, then moved.
    device = usable_device(map_location, source)
    elsewhere = verify and device is not None and device.type != "cpu"
    payload = _load_payload(data, source, "cpu" if elsewhere else map_location, mmap)
    version = _check_header(payload, source)
    if verify:
        try:
            verify_sections(payload, source)
        except CheckpointCorruptError:
            refuse_other_byte_order(data, source, "its checksums cannot be checked here")
            raise
    if elsewhere and device is not None:
        payload = on_device(payload, device)
    while version < FORMAT_VERSION:
        payload = MIGRATIONS[version](payload)
        version += 1
    return _to_checkpoint(payload, source)


def usable_device(map_location: torch.device | str | None, source: str) -> torch.device | None:
    """``map_location`` as a device this process can allocate on, checked before the file is decoded: an
    unavailable one (``"cuda"`` on a CPU-only build) would otherwise fail mid-load like a damaged file."""
    if map_location is None:
        return None
    try:
        device = torch.device(map_location)
        torch.empty(0, device=device)
    except Exception as exc:  # unknown or unavailable devices fail in many ways (AssertionError on CPU builds)
        raise CheckpointError(
            f"cannot load {source} onto {str(map_location)!r}: {_first_line(exc)}; pass a device this machine has"
        ) from None
    return device


def verify(data: Source, *, source: str) -> None:
    """Check the checksums of the checkpoint in ``data`` without keeping it; raises if it is damaged.

    A local path is memory-mapped, so verifying costs one read of the file and no copy of it.
    """
    payload = _load_payload(data, source, None, isinstance(data, Path))
    _check_header(payload, source)
    verify_sections(payload, source)


def load_mapped(path: Path, source: str) -> Any:
    """``torch.load(path, mmap=True)`` computing every storage's offset instead of reading its local header.

    Reads the pickle and one local header, no tensor bytes; a sparse file that holds just those loads
    too (docs/performance.md, target 7). torch's switch for it is process-global: it is on only during
    our loads, under one lock; a ``torch.load`` another thread runs meanwhile computes the same offsets.
    """
    switch = serialization_config.patch({"load.calculate_storage_offsets": True})  # type: ignore[attr-defined]
    with _OFFSETS_SWITCH, switch:
        return _load_payload(path, source, "cpu", True)


def on_device(tree: Any, device: torch.device, copies: dict[int, torch.UntypedStorage] | None = None) -> Any:
    """``tree`` with its tensors copied to ``device``, one copy per storage: shared storages stay shared
    (also across calls that pass the same ``copies``)."""

    def moved(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        as_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
        return as_bytes.to(device=device, copy=True).untyped_storage()

    return with_storages(tree, moved, copies)


def with_storages(
    tree: Any,
    replace: Callable[[torch.UntypedStorage], torch.UntypedStorage],
    copies: dict[int, torch.UntypedStorage] | None = None,
) -> Any:
    """``tree`` with every tensor's storage swapped for ``replace(storage)``, called once per storage (keyed
    by ``data_ptr()`` in ``copies``), so shared storages stay shared; views keep their offsets and strides."""
    copies = {} if copies is None else copies
    if isinstance(tree, torch.Tensor):
        storage = tree.untyped_storage()
        if storage.data_ptr() not in copies:
            copies[storage.data_ptr()] = replace(storage)
        new = copies[storage.data_ptr()]
        return torch.empty(0, dtype=tree.dtype, device=new.device).set_(
            new, tree.storage_offset(), tree.size(), tree.stride()
        )
    if isinstance(tree, dict):
        return type(tree)((key, with_storages(value, replace, copies)) for key, value in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(with_storages(value, replace, copies) for value in tree)
    return tree


def _body(payload: Payload) -> Payload:
    return {key: value for key, value in payload.items() if key != "integrity"}


def _load_payload(data: Source, source: str, map_location: torch.device | str | None, mmap: bool) -> Any:
    _check_magic(data, source)
    meta = map_location is not None and torch.device(map_location).type == "meta"
    try:
        if isinstance(data, Path) or meta:  # a stream only when torch would compute offsets from it
            check_storage_alignment(data, source)
        with warnings.catch_warnings():
            # a damaged or foreign file makes torch warn about its pickle protocol; the outcome (an
            # error, or a verified load) must not depend on the caller's warning filters
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(data, map_location=map_location, weights_only=True, mmap=mmap)
    except MLPlaygroundError:
        raise
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint {source}") from None
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise UnsafeCheckpointError(
                f"{source} holds objects other than tensors and plain data; it was refused without "
                "running any of its code. Only load checkpoints written by ml_playground."
            ) from None
        raise CheckpointCorruptError(f"{source} is damaged: its metadata cannot be read ({_first_line(exc)})") from None
    except Exception as exc:  # a damaged archive fails inside torch in many ways (AttributeError, ...)
        raise CheckpointCorruptError(
            f"{source} is not a readable checkpoint (truncated or damaged: {_first_line(exc)})"
        ) from None


def _check_magic(data: Source, source: str) -> None:
    # torch.save writes a zip archive; anything else would take torch.load's legacy pickle path
    if isinstance(data, Path):
        try:
            with data.open("rb") as handle:
                magic = handle.read(len(_ZIP_MAGIC))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint {source}") from None
        except OSError as exc:  # not the bytes' fault: permissions, I/O errors
            raise StorageError(f"cannot read {source}: {exc.strerror or _first_line(exc)}") from None
    else:
        start = data.tell()
        magic = data.read(len(_ZIP_MAGIC))
        data.seek(start)
    if magic != _ZIP_MAGIC:
        what = "empty" if not magic else "not a torch.save archive"
        raise CheckpointCorruptError(f"{source} is {what}; it is damaged or not a checkpoint")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    # torch's weights-only refusal opens with advice to load with weights_only=False, i.e. to run the
    # file's code: never repeat that; its reason follows this marker
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _check_header(payload: Any, source: str) -> int:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_MAGIC:
        raise CheckpointSchemaError(f"{source} is not an ml_playground checkpoint (no format marker)")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointSchemaError(f"{source} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{source} was written in format version {version}; this ml_playground reads up to "
            f"{FORMAT_VERSION}. Upgrade ml_playground to load it."
        )
    missing = {"meta", "integrity", *TENSOR_SECTIONS} - payload.keys()
    if missing:
        raise CheckpointSchemaError(f"{source} lacks the field(s) {', '.join(sorted(missing))}")
    return version


def verify_sections(payload: Payload, source: str, sections: Collection[str] = TENSOR_SECTIONS) -> None:
    """Check ``payload``'s structure digest and the digests of the tensors in ``sections``; raise if damaged.

    A payload loaded with ``mmap=True`` is read only where it is hashed, so checking a subset reads only
    that subset's bytes (an evaluation checks the model and EMA weights, never the optimizer's).
    """
    unknown = set(sections) - set(TENSOR_SECTIONS)
    if unknown:
        raise ValueError(f"unknown checkpoint sections {sorted(unknown)}")
    stored = payload["integrity"]
    if not isinstance(stored, dict) or stored.get("algorithm") != _ALGORITHM:
        raise CheckpointCorruptError(f"{source} has no readable integrity record")
    body = _body(payload)
    try:
        check_plain_tree("checkpoint", body, tensors_allowed=True)
    except CheckpointSchemaError as exc:
        raise UnsafeCheckpointError(f"{source}: {exc}") from None
    if stored.get("structure") != _digests.structure_record(body)["structure"]:
        raise CheckpointCorruptError(
            f"{source} is damaged: its metadata does not match its checksum. Delete it, or restore it from a copy."
        )
    tensors = list(_digests.tensors(body))
    expected = _digests.stored_digests(stored.get("tensors"), payload["format_version"])
    if expected is None or len(expected) != len(tensors):
        raise CheckpointCorruptError(f"{source} is damaged: its tensor checksums are incomplete")
    for (section, path, tensor), want in zip(tensors, expected, strict=True):
        if section in sections and _digests.tensor_digest(tensor) != want:
            raise CheckpointCorruptError(
                f"{source} is damaged: the bytes of tensor {path} do not match their checksum. "
                "Delete it, or restore it from a copy."
            )


def _integrity(body: Mapping[str, Any]) -> dict[str, Any]:
    """The integrity record of ``body``, computed in line (``encode`` overlaps it with the write)."""
    return {
        **_digests.structure_record(body),
        "tensors": _digests.digest_tensor([_digests.tensor_digest(t) for _, _, t in _digests.tensors(body)]),
    }


def checked_meta(payload: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The fields of the payload's ``meta`` table (``Checkpoint``/``ModelWeights`` keyword arguments)."""
    meta = payload["meta"]
    if not isinstance(meta, dict):
        raise CheckpointSchemaError(f"{source}: meta must be a table, got {type(meta).__name__}")
    missing = set(_META_FIELDS) - meta.keys()
    if missing:
        raise CheckpointSchemaError(f"{source} lacks the field(s) {', '.join(sorted('meta.' + m for m in missing))}")
    return {key: meta[key] for key in _META_FIELDS}


def _to_checkpoint(payload: Payload, source: str) -> Checkpoint:
    meta = checked_meta(payload, source)
    try:
        return Checkpoint(
            model=payload["model"],
            optimizer=payload["optimizer"],
            ema=payload["ema"],
            rng_state=payload["rng_state"],
            **meta,
        )
    except CheckpointSchemaError as exc:
        raise CheckpointSchemaError(f"{source}: {exc}") from None
