"""GcsStore: checkpoints as objects under a ``gs://bucket/prefix``, committed as uncommitted gcsfs uploads.

The write is an fsspec file opened with ``autocommit=False`` in mode ``"xb"`` (``ifGenerationMatch=0``):
``commit()`` when the block ends, ``discard()`` on any exception and after a failed commit. Never
``fs.transaction``: it is shared by every user of the filesystem instance.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import IO, Any

from ml_playground.checkpoint._streams import FailureKeeping
from ml_playground.checkpoint.stores._backend import check_options, import_backend
from ml_playground.checkpoint.stores._fsspec import READ_BLOCK_SIZE, FsspecStore
from ml_playground.checkpoint.stores._translate import translate, translated
from ml_playground.locations import RemoteLocation

__all__ = ["GcsStore"]

logger = logging.getLogger(__name__)


class GcsStore(FsspecStore):
    """Checkpoints under the ``gs://`` location ``location``; ``filesystem`` defaults to one built from its options."""

    def __init__(
        self,
        location: RemoteLocation,
        *,
        create: bool = False,
        filesystem: Any = None,
        read_block_size: int = READ_BLOCK_SIZE,
    ) -> None:
        check_options(location)
        fs = filesystem if filesystem is not None else make_filesystem(location)
        super().__init__(location, fs, read_block_size=read_block_size)
        if create:
            self._prove_writable(make_filesystem(location, quick=True))

    @classmethod
    def from_location(cls, location: RemoteLocation, *, create: bool = False) -> GcsStore:
        return cls(location, create=create)

    @contextlib.contextmanager
    def _write(self, url: str, name: str) -> Iterator[IO[bytes]]:
        with translated("saving", url):
            handle = self._fs.open(url, "xb", autocommit=False, block_size=self._part_size)
        kept = FailureKeeping(handle, lambda exc: translate(exc, "saving", url))
        try:
            yield kept  # type: ignore[misc]
            with translated("saving", url):
                handle.close()
                handle.commit()
        except BaseException as exc:
            try:
                handle.discard()
            except Exception as discard_exc:
                logger.warning("could not cancel the unfinished upload of %s: %s", url, discard_exc)
            # a handle left open is flushed by its finaliser later (gcsfs defers that to a thread)
            handle.closed = True
            kept.raise_own_failure(exc)
            raise


def make_filesystem(location: RemoteLocation, *, quick: bool = False) -> Any:
    """A fresh gcsfs filesystem for ``location`` (``quick``: a short connect timeout, for the probe at open).

    Its own instance and no listing cache (see :mod:`.s3._filesystem`); gcsfs's retry count is fixed (6).
    """
    gcsfs = import_backend(location)
    options = location.storage_options
    timeout = (min(options.connect_timeout, 5.0) if quick else options.connect_timeout) + options.read_timeout
    return gcsfs.GCSFileSystem(
        token="anon" if options.anon else None,
        endpoint_url=options.endpoint_url,
        requester_pays=options.requester_pays,
        requests_timeout=timeout,
        timeout=timeout,
        block_size=options.part_size_mib * 2**20,
        skip_instance_cache=True,
        use_listings_cache=False,
    )
