"""CheckpointManager: names, discovery, save-then-rotate, and validated loads over any CheckpointStore."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Literal

from ml_playground.checkpoint._checkpoint import Checkpoint, ModelWeights
from ml_playground.checkpoint._discovery import delete_all, discover
from ml_playground.checkpoint._lease import DEFAULT_TTL, Lease
from ml_playground.checkpoint._loading import load_checkpoint, load_manifest, load_weights, verify_checkpoint
from ml_playground.checkpoint._naming import CheckpointInfo, CheckpointKind, CheckpointName
from ml_playground.checkpoint._reads import load_chosen, rotated_away_if_missing
from ml_playground.checkpoint._rotation import KeepPolicy, MetricMode, best_first, to_delete
from ml_playground.checkpoint._stop_seam import reached
from ml_playground.checkpoint._store import CheckpointStore, StoredObject
from ml_playground.checkpoint._view import StoredView
from ml_playground.checkpoint.format import MapLocation, encode
from ml_playground.errors import CheckpointError, CheckpointNotFoundError

__all__ = ["CheckpointManager"]

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Saves, rotates and loads the checkpoints of one run location.

    After every successful save exactly ``min(keep.<kind>, n)`` checkpoints of each kind remain;
    rotation runs only after the new file is committed and never deletes it. A kind with
    ``keep = 0`` is never written. Discovery parses names (never mtime, never string order), so a new
    manager on an existing location continues the same rotation.
    """

    def __init__(self, store: CheckpointStore, keep: KeepPolicy | None = None, mode: MetricMode = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.store = store
        self.keep = keep or KeepPolicy()
        self.mode: MetricMode = mode
        self.lease: Lease | None = None
        self._view = StoredView(self.checkpoints)

    @property
    def supports_writer_lease(self) -> bool:
        """Whether this store has a writer lease (local directories and ``s3://`` locations do)."""
        return self.store.capabilities.writer_lease is not None

    def acquire_writer(self, *, force: bool = False, ttl: float = DEFAULT_TTL) -> Lease:
        """Take the writer lease of this run location; from then on every save and rotation checks it.

        Another live writer raises LocationLockedError naming it; a dead one's lease is taken over.
        ``force=True`` takes over a live writer's lease (an explicit user action). Use the returned
        lease as a context manager (or call ``release()``) when the run ends. The new writer removes the
        leftovers of sharded saves that did not complete (:meth:`remove_leftovers`).
        """
        factory = self.store.capabilities.writer_lease
        if factory is None:
            raise CheckpointError(
                f"writer leases exist for local directories and s3:// locations; {self.store.url} has none yet"
            )
        self.lease = factory(force=force, ttl=ttl)
        try:
            self.remove_leftovers()
        except BaseException:
            self.lease.release()
            self.lease = None
            raise
        return self.lease

    # ------------------------------------------------------------ discovery

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, newest first; a ``ckpt_`` file that does not parse raises."""
        return discover(self.store.list()).strict().checkpoints

    def leftovers(self) -> list[StoredObject]:
        """Parts of sharded checkpoints whose manifest is absent: a save that failed (or is being written)."""
        return discover(self.store.list()).strict().leftovers

    def remove_leftovers(self) -> list[str]:
        """Delete the leftovers; only the writer may (on a store with leases, the lease holder)."""
        if self.supports_writer_lease and self.lease is None:
            raise CheckpointError(f"only the writer removes leftovers from {self.store.url}: take its lease first")
        if self.lease is not None:
            self.lease.check()
        return delete_all(self.store, [obj.name for obj in self.leftovers()], "a leftover of a failed save")

    def latest(self) -> CheckpointInfo | None:
        """The highest iteration over both kinds; on a tie the last checkpoint (same state)."""
        infos = self.checkpoints()
        return infos[0] if infos else None

    def best(self) -> CheckpointInfo | None:
        """The best-metric checkpoint (ties: the newer one)."""
        by_name = {info.name: info for info in self.checkpoints() if info.kind is CheckpointKind.BEST}
        ranked = best_first(by_name, self.mode)
        return by_name[ranked[0]] if ranked else None

    def resume_point(self, policy: Literal["latest", "best"]) -> CheckpointInfo | None:
        """The checkpoint a run resumes from by ``policy``; None in an empty location.

        A run never goes back in time: a choice older than the newest checkpoint there raises.
        """
        infos = self.checkpoints()
        if not infos:
            return None
        chosen = self.choose(policy)
        if chosen.iter_num < infos[0].iter_num:
            raise CheckpointError(
                f"train.runtime.checkpointing.read_policy = {policy!r} picks {chosen.filename} (iteration "
                f"{chosen.iter_num}), but {self.store.url} holds {infos[0].filename} (iteration "
                f"{infos[0].iter_num}); a run never goes back in time. Use read_policy = 'latest', or a new out_dir"
            )
        return chosen

    # ------------------------------------------------------------ saving

    def name_for(self, kind: CheckpointKind, checkpoint: Checkpoint) -> CheckpointName | None:
        """The name ``checkpoint`` is saved under as ``kind``; None when that kind's keep is 0.

        A best checkpoint is named by its ``best_val_loss``, which must be finite (NaN and infinities are
        never best): anything else raises.
        """
        if kind is CheckpointKind.BEST and not checkpoint.has_finite_metric:
            raise CheckpointError(
                f"a best checkpoint needs a finite metric; iteration {checkpoint.iter_num} has "
                f"{checkpoint.best_val_loss!r}"
            )
        if self.keep.of(kind) == 0:
            return None
        if kind is CheckpointKind.LAST:
            return CheckpointName.last(checkpoint.iter_num)
        return CheckpointName.best(checkpoint.iter_num, checkpoint.best_val_loss)

    def save_last(self, checkpoint: Checkpoint) -> CheckpointName | None:
        """Save ``checkpoint`` as a "last" checkpoint and rotate; None when ``keep.last`` is 0."""
        return self.save(CheckpointKind.LAST, checkpoint)

    def save_best(self, checkpoint: Checkpoint) -> CheckpointName | None:
        """Save ``checkpoint`` as a "best" checkpoint named by its ``best_val_loss``; None when ``keep.best`` is 0.

        A NaN or infinite metric is never best: it raises.
        """
        return self.save(CheckpointKind.BEST, checkpoint)

    def save(self, kind: CheckpointKind, checkpoint: Checkpoint) -> CheckpointName | None:
        """Save ``checkpoint`` as ``kind`` (see :meth:`name_for`), then rotate."""
        name = self.prepare_save(kind, checkpoint)
        if name is None:
            return None
        with self._view.forgotten_on_failure(), self.store.write(name.filename) as stream:
            encode(checkpoint, stream, destination=f"{self.store.url}/{name.filename}")
        return self.committed(name)

    def prepare_save(self, kind: CheckpointKind, checkpoint: Checkpoint) -> CheckpointName | None:
        """The name ``checkpoint`` is saved under as ``kind`` (None: keep is 0), once the writer may write it:
        its lease holds and the location holds no later iteration. A sharded save calls it, writes the parts
        and the manifest, then calls :meth:`committed`."""
        name = self.name_for(kind, checkpoint)
        if name is None:
            return None
        with self._view.forgotten_on_failure():
            if self.lease is not None:
                self.lease.check()
            newest = max((stored.iter_num for stored in self._view.current(self.lease)), default=-1)
            if checkpoint.iter_num < newest:
                raise CheckpointError(
                    f"refusing to save iteration {checkpoint.iter_num} into {self.store.url}, which holds "
                    f"iteration {newest}: a run never goes back in time. Use a new out_dir for a new run."
                )
        return name

    def committed(self, name: CheckpointName, parts: tuple[str, ...] = ()) -> CheckpointName:
        """Record that checkpoint ``name`` (with ``parts``) was committed, then rotate around it."""
        self._view.added(self.lease, name, parts)
        logger.info("saved %s/%s", self.store.url, name.filename)
        try:
            if self.lease is not None:  # again: it may have been taken over during a long upload
                self.lease.check()
            self._rotate(protect=name)
        except CheckpointError as exc:
            # The save itself succeeded; say so, so nobody retries it or thinks it is lost.
            raise type(exc)(
                f"{self.store.url}/{name.filename} was saved, but rotation failed: {exc}. "
                "The next save (or CheckpointManager.rotate()) retries the rotation."
            ) from exc
        return name

    def rotate(self, protect: CheckpointName | None = None) -> list[CheckpointName]:
        """Delete what the keep policy does not keep; a failed delete raises.

        Without a writer lease it works from a fresh listing. With one, from the manager's own view
        (one listing after the lease was taken, then its own saves and deletes).
        """
        if self.lease is not None:
            self.lease.check()
        return self._rotate(protect)

    def _rotate(self, protect: CheckpointName | None) -> list[CheckpointName]:
        with self._view.forgotten_on_failure():
            from_view = self.lease is not None
            stored = self._view.current(self.lease)
            doomed = to_delete(stored, self.keep, self.mode, protect)
            for name in doomed:
                try:
                    self.store.delete(name.filename)  # the manifest first: the checkpoint is gone at once
                except CheckpointNotFoundError:
                    if not from_view:
                        raise  # a fresh listing named it: its disappearance is news worth raising
                    # Our view named a file someone removed by hand: gone is what rotation wants.
                    logger.warning("%s/%s was already gone; the next save lists afresh", self.store.url, name.filename)
                    self._view.forget()
                    continue
                reached("rotation")  # a test seam (a no-op unless a fault test asks): the parts remain
                delete_all(self.store, stored[name], f"a part of {name.filename}")
                self._view.removed(self.lease, name)
                logger.info("rotated away %s/%s", self.store.url, name.filename)
        return doomed

    # ------------------------------------------------------------ loading

    def load(
        self, filename: str, *, map_location: MapLocation = None, verify: bool = True, mmap: bool = False
    ) -> Checkpoint:
        """Load one checkpoint by file name and check that its content matches its name; a sharded one whole.

        ``mmap=True`` (local stores only) returns tensors backed by the file's pages; with
        ``verify=False`` as well the call returns before the tensor bytes are read, and
        :meth:`verify` checks the file later (DESIGN.md, Integrity). A file whose name does not start
        with ``ckpt_`` (a copy such as ``model.pt``) is loaded and verified, with no name to match.
        A missing file raises (CheckpointRotatedAwayError when a newer one of its kind exists).
        """
        with rotated_away_if_missing(self.store.url, filename, self.checkpoints) as name:
            return load_checkpoint(self.store, filename, name, map_location=map_location, verify=verify, mmap=mmap)

    def load_weights(self, filename: str, *, map_location: MapLocation = None, verify: bool = True) -> ModelWeights:
        """One checkpoint's model and EMA weights (no optimizer, no RNG state), checked like :meth:`load`; from
        a remote store only their bytes are fetched (docs/performance.md, target 7). ``map_location=None``: CPU."""
        with rotated_away_if_missing(self.store.url, filename, self.checkpoints) as name:
            return load_weights(self.store, filename, name, map_location=map_location, verify=verify)

    def load_manifest(self, filename: str) -> Checkpoint:
        """The manifest of sharded checkpoint ``filename``, checked like :meth:`load`: no tensors, its ``shards``
        record set (``checkpoint.sharded.load_into`` reads the tensors into a run's sharded state)."""
        with rotated_away_if_missing(self.store.url, filename, self.checkpoints) as name:
            return load_manifest(self.store, filename, name)

    def verify(self, filename: str) -> None:
        """Check one checkpoint's checksums (a sharded one's parts too); damage raises."""
        with rotated_away_if_missing(self.store.url, filename, self.checkpoints):
            verify_checkpoint(self.store, filename)

    def load_latest(self, *, map_location: MapLocation = None, verify: bool = True, mmap: bool = False) -> Checkpoint:
        """The latest checkpoint (highest iteration), chosen again if rotation deletes it first."""
        return self.load_chosen("latest", map_location=map_location, verify=verify, mmap=mmap)[1]

    def load_best(self, *, map_location: MapLocation = None, verify: bool = True, mmap: bool = False) -> Checkpoint:
        """The best checkpoint by this manager's mode, chosen again if rotation deletes it first."""
        return self.load_chosen("best", map_location=map_location, verify=verify, mmap=mmap)[1]

    def load_chosen(
        self,
        policy: Literal["latest", "best"],
        *,
        map_location: MapLocation = None,
        verify: bool = True,
        mmap: bool = False,
        on_choose: Callable[[CheckpointInfo], None] | None = None,
    ) -> tuple[CheckpointInfo, Checkpoint]:
        """The checkpoint ``policy`` picks (:meth:`choose`) and its :meth:`load`; which one was read comes first.

        When rotation deletes the choice before it is read, it chooses again from a fresh listing, three
        attempts in all; then CheckpointRotatedAwayError advises a larger keep or a best checkpoint.
        ``on_choose`` is told each choice before it is read (e.g. to announce a download).
        """
        read = partial(self.load, map_location=map_location, verify=verify, mmap=mmap)
        return load_chosen(self.store.url, policy, self.choose, read, on_choose)

    def load_chosen_weights(
        self,
        policy: Literal["latest", "best"],
        *,
        map_location: MapLocation = None,
        verify: bool = True,
        on_choose: Callable[[CheckpointInfo], None] | None = None,
    ) -> tuple[CheckpointInfo, ModelWeights]:
        """:meth:`load_chosen` with :meth:`load_weights`: the chosen checkpoint's model and EMA weights only."""
        read = partial(self.load_weights, map_location=map_location, verify=verify)
        return load_chosen(self.store.url, policy, self.choose, read, on_choose)

    def choose(self, policy: Literal["latest", "best"]) -> CheckpointInfo:
        """The checkpoint a read policy picks; none of that kind raises CheckpointNotFoundError."""
        info = self.latest() if policy == "latest" else self.best()
        if info is None:
            kind = "" if policy == "latest" else "best "
            raise CheckpointNotFoundError(f"no {kind}checkpoint in {self.store.url}")
        return info
