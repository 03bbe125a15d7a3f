"""Discovery: the committed checkpoints of one listing, each sharded one with its parts, and the leftovers.

A ``ckpt_`` name is a checkpoint (a single file or a sharded checkpoint's manifest) or, with
``.part-RRRRR-of-WWWWW.model|optim`` after it, a part of one. A checkpoint exists if and only if its
manifest does; parts whose manifest is absent are leftovers of a save that did not complete (or is
still being written). Anything else starting with ``ckpt_`` raises CheckpointNameError; other names are
other tools' files and are left alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ml_playground.checkpoint._naming import CheckpointInfo, CheckpointKind, CheckpointName, is_checkpoint_like
from ml_playground.checkpoint._parts import PART_KINDS, PartName, is_part_like
from ml_playground.checkpoint._store import CheckpointStore, StoredObject
from ml_playground.errors import CheckpointNameError, CheckpointNotFoundError

__all__ = ["Discovered", "delete_all", "discover"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Discovered:
    checkpoints: list[CheckpointInfo]
    """Newest first; on a tie the last checkpoint first."""
    leftovers: list[StoredObject]
    """Parts whose manifest is absent, by name."""
    unparsable: dict[str, CheckpointNameError]
    """``ckpt_`` names that are neither a checkpoint's nor a part's, with the error naming each."""

    def strict(self) -> Discovered:
        """This discovery, if every ``ckpt_`` name parsed; else the first unparsable name's error raises."""
        for error in self.unparsable.values():
            raise error
        return self


def discover(objects: Iterable[StoredObject]) -> Discovered:
    """What a listing holds (see the module docstring); :meth:`Discovered.strict` for a run's own discovery."""
    manifests: dict[str, tuple[CheckpointName, StoredObject]] = {}
    parts: dict[str, list[tuple[PartName, StoredObject]]] = {}
    unparsable: dict[str, CheckpointNameError] = {}
    for obj in sorted(objects, key=lambda each: each.name):
        if not is_checkpoint_like(obj.name):
            continue
        try:
            if is_part_like(obj.name):
                part = PartName.parse(obj.name)
                parts.setdefault(part.checkpoint.filename, []).append((part, obj))
            else:
                manifests[obj.name] = (CheckpointName.parse(obj.name), obj)
        except CheckpointNameError as exc:
            unparsable[obj.name] = exc
    infos = [_info(name, obj, parts.get(filename, [])) for filename, (name, obj) in manifests.items()]
    infos.sort(key=lambda i: (i.iter_num, i.kind is CheckpointKind.LAST), reverse=True)
    leftovers = [obj for filename, found in parts.items() if filename not in manifests for _, obj in found]
    return Discovered(infos, leftovers, unparsable)


def _info(name: CheckpointName, manifest: StoredObject, parts: list[tuple[PartName, StoredObject]]) -> CheckpointInfo:
    """Every part named after a manifest goes with it (rotation deletes them all); its world size is the one
    whose set of parts is complete (None when none is: the checkpoint is damaged, and verify says so)."""
    complete = sorted(
        world
        for world in {part.world_size for part, _ in parts}
        if {(p.rank, p.kind) for p, _ in parts if p.world_size == world}
        == {(rank, kind) for rank in range(world) for kind in PART_KINDS}
    )
    return CheckpointInfo(
        name,
        manifest.size + sum(obj.size for _, obj in parts),
        manifest.modified,
        tuple(sorted(obj.name for _, obj in parts)),
        complete[-1] if complete else None,
    )


def delete_all(store: CheckpointStore, names: Iterable[str], what: str) -> list[str]:
    """Delete ``names`` (each ``what``: logged); one already gone is what deleting wants. Other failures raise."""
    deleted = list(names)
    for name in deleted:
        with contextlib.suppress(CheckpointNotFoundError):
            store.delete(name)
        logger.info("deleted %s/%s, %s", store.url, name, what)
    return deleted
