"""``ml-playground ckpt cp`` and ``ckpt consolidate``: checkpoints written into another location, verified first.

A copy never writes a byte it has not verified: each checkpoint is copied into a private directory in
``TMPDIR``, verified there, and then written through the target store's atomic write. A sharded checkpoint
is copied whole (its manifest and every part) and written parts first, manifest last: it exists in the target
only once it is complete. Consolidation writes a sharded checkpoint as one single file.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ml_playground.checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointInfo,
    CheckpointManager,
    CheckpointName,
    CheckpointStore,
    LocalStore,
    discover,
    encode,
    open_store,
)
from ml_playground.errors import CheckpointError, CheckpointExistsError, CheckpointNameError, ConfigError, StorageError
from ml_playground.flows.events import EventSink, Transferred
from ml_playground.locations import Location

__all__ = ["CopyResult", "consolidate", "copy_checkpoints"]

_CHUNK = 4 << 20


@dataclass(frozen=True)
class CopyResult:
    source: str
    destination: str
    copied: list[str]


@dataclass(frozen=True)
class _Copy:
    name: str
    out_name: str
    parts: tuple[str, ...]

    @property
    def objects(self) -> list[str]:
        """What is written to the target, in order: the parts first, the manifest (or single file) last."""
        return [*self.parts, self.out_name]


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
    byte is copied. Each checkpoint is then copied into a private temporary directory (``TMPDIR``), verified
    there (digests, and its content against its name), and only those verified bytes are written
    through the target store's atomic write: a checkpoint that fails verification, or any error, leaves
    nothing under the target name. Existing names in ``dst`` are never overwritten. A sharded checkpoint
    keeps its name (its parts are named after it).
    """
    source = open_store(src)
    found = discover(source.list()).strict()
    infos = {info.filename: info for info in found.checkpoints}
    if name is None:
        chosen = sorted(found.checkpoints, key=lambda info: info.iter_num)
        if not chosen:
            raise CheckpointError(f"no checkpoints in {source.url} to copy")
        copies = [_Copy(info.filename, info.filename, info.parts) for info in chosen]
    else:
        parts = infos[name].parts if name in infos else ()
        if parts and dst_name not in (None, name):
            raise ConfigError(
                f"{source.url}/{name} is a sharded checkpoint: it keeps its name (its parts are named after it); "
                "copy it into a location (ckpt cp FILE DST_LOCATION), or consolidate it into a single file first"
            )
        copies = [_Copy(name, dst_name or name, parts)]
    target = open_store(dst, create=True)
    for copy in copies:  # before copying anything: never half a run
        _check_target_name(copy.out_name, target)
        for part in copy.parts:
            _check_length(part, target)
    sizes = {obj.name: obj.size for obj in source.list()}
    present = {obj.name for obj in target.list()}
    clashes = [each for copy in copies for each in copy.objects if each in present]
    if clashes:
        raise CheckpointExistsError(
            f"{target.url} already holds {', '.join(clashes)}; nothing was copied (names are never overwritten)"
        )
    copied = []
    with tempfile.TemporaryDirectory(prefix="ml_playground-cp-") as staging_dir:
        staging = LocalStore(Path(staging_dir))
        for copy in copies:
            sources = [*copy.parts, copy.name]
            _check_room(source, copy.name, sum(sizes.get(each, 0) for each in sources), staging)
            for each, out in zip(sources, copy.objects, strict=True):
                with source.open(each) as reader, staging.write(out) as writer:
                    _copy_stream(reader, writer, sizes.get(each, 0), f"{each} (verifying)", on_event)
            _verify_staged(staging, copy, f"{source.url}/{copy.name}", target.url)
            _write(staging, copy.objects, target, sizes, on_event)
            copied.append(copy.out_name)
    return CopyResult(source.url, target.url, copied)


def consolidate(src: Location, name: str, dst: Location) -> str:
    """Write sharded checkpoint ``name`` of ``src`` as one single-file checkpoint under the same name in ``dst``,
    which a single-process or DDP run resumes from; returns its URL. The checkpoint is read whole, verified."""
    manager = CheckpointManager(open_store(src))
    info = _listed(manager, name)
    if not info.sharded:
        raise ConfigError(f"{manager.store.url}/{name} is a single file already; copy it with ckpt cp")
    checkpoint = manager.load(name)
    target = open_store(dst, create=True)
    _check_target_name(name, target)
    destination = f"{target.url}/{name}"
    try:
        with target.write(name) as stream:
            encode(checkpoint, stream, destination=destination)
    except CheckpointExistsError:
        raise CheckpointExistsError(f"{destination} already exists; it was not overwritten") from None
    return destination


def _listed(manager: CheckpointManager, name: str) -> CheckpointInfo:
    for info in manager.checkpoints():
        if info.filename == name:
            return info
    raise CheckpointError(f"no checkpoint {manager.store.url}/{name}")


def _verify_staged(staging: LocalStore, copy: _Copy, source: str, target: str) -> None:
    manager = CheckpointManager(staging)
    try:
        if copy.parts:
            manager.load_manifest(copy.out_name)
            manager.verify(copy.out_name)
        else:
            manager.load(copy.out_name, mmap=True)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{source} failed verification; nothing was written to {target}/{copy.out_name}: {exc}"
        ) from None


def _write(
    staging: LocalStore,
    objects: Sequence[str],
    target: CheckpointStore,
    sizes: dict[str, int],
    on_event: EventSink | None,
) -> None:
    """The staged ``objects`` written to ``target`` in order; after a failure, what was written is deleted."""
    written: list[str] = []
    try:
        for each in objects:
            with staging.open(each) as reader, target.write(each) as writer:
                _copy_stream(reader, writer, sizes.get(each, 0), f"{each} -> {target.url}", on_event)
            written.append(each)
            staging.delete(each)
    except BaseException:
        for each in written:  # parts without their manifest: leftovers at worst, which a writer removes
            with contextlib.suppress(CheckpointError):
                target.delete(each)
        raise


def _check_room(source: CheckpointStore, name: str, size: int, staging: LocalStore) -> None:
    free = shutil.disk_usage(staging.path).free
    if size > free:
        raise StorageError(
            f"cannot copy {source.url}/{name} ({size:,} bytes): {staging.path.parent} (TMPDIR), where each checkpoint "
            f"is verified before it is written, has {free:,} bytes free; point TMPDIR at a larger directory"
        )


def _check_target_name(name: str, target: CheckpointStore) -> None:
    if name.startswith(CHECKPOINT_PREFIX):
        try:
            CheckpointName.parse(name)
        except CheckpointNameError as exc:
            raise CheckpointNameError(f"cannot copy to {target.url}/{name}: {exc}; nothing was copied") from None
    _check_length(name, target)


def _check_length(name: str, target: CheckpointStore) -> None:
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
