"""The stored checkpoints as a manager sees them when it saves and rotates: each name with its parts.

Without a writer lease every look lists the location afresh. The lease holder is the location's only
writer, so it lists once after taking the lease and then keeps track of its own saves and deletes (a
listing of a large S3 prefix costs time, and s3fs's cached listings cannot be trusted). After any failure
the store may hold what the view does not: the view is dropped and the next look lists again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ml_playground.checkpoint._lease import Lease
from ml_playground.checkpoint._naming import CheckpointInfo, CheckpointName

__all__ = ["StoredView"]

Stored = dict[CheckpointName, tuple[str, ...]]
"""Each committed checkpoint's name and the names of its parts (none for a single file)."""


class StoredView:
    def __init__(self, listing: Callable[[], list[CheckpointInfo]]) -> None:
        self._listing = listing
        self._held: tuple[Lease, Stored] | None = None

    def current(self, lease: Lease | None) -> Stored:
        """What is stored: listed afresh, unless ``lease`` is held and was listed once already."""
        if lease is None:
            return self._listed()
        if self._held is None or self._held[0] is not lease:
            self._held = (lease, self._listed())
        return dict(self._held[1])

    def added(self, lease: Lease | None, name: CheckpointName, parts: tuple[str, ...]) -> None:
        if self._held is not None and self._held[0] is lease:
            self._held[1][name] = parts

    def removed(self, lease: Lease | None, name: CheckpointName) -> None:
        if self._held is not None and self._held[0] is lease:
            self._held[1].pop(name, None)

    def forget(self) -> None:
        self._held = None

    @contextlib.contextmanager
    def forgotten_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._held = None
            raise

    def _listed(self) -> Stored:
        return {info.name: info.parts for info in self._listing()}
