"""S3Store: checkpoints as objects under an ``s3://bucket/prefix``, committed by our own multipart upload.

- write: :class:`~._upload.S3Upload` (concurrent parts; the object appears only at
  ``CompleteMultipartUpload`` / ``PutObject`` with ``If-None-Match: *``; abort on any failure);
- a name is checked free with one HEAD (``fs.exists`` would also list a "directory" of that name);
- loads fetch a local copy, or a weights-only load's byte ranges, with concurrent ranged GETs pinned
  to one ETag (:mod:`._download`);
- the writer lease is an object written with conditional PUTs (:mod:`._lease`);
- opening a writer aborts this location's multipart uploads older than a day (a killed writer's).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO, Any

from ml_playground.checkpoint._store import Capabilities, PartialCopy
from ml_playground.checkpoint._streams import FailureKeeping
from ml_playground.checkpoint.stores._backend import check_options
from ml_playground.checkpoint.stores._fsspec import READ_BLOCK_SIZE, FsspecStore
from ml_playground.checkpoint.stores._partial import partial_copy
from ml_playground.checkpoint.stores._staging import split
from ml_playground.checkpoint.stores._translate import error_code, translated
from ml_playground.checkpoint.stores.s3._download import downloaded, fetch_ranges, head
from ml_playground.checkpoint.stores.s3._filesystem import make_filesystem
from ml_playground.checkpoint.stores.s3._lease import S3WriterLease, lease_state
from ml_playground.checkpoint.stores.s3._upload import S3Upload
from ml_playground.locations import RemoteLocation

__all__ = ["STALE_UPLOAD_AGE", "S3Store", "abort_stale_uploads"]

logger = logging.getLogger(__name__)


class S3Store(FsspecStore):
    """Checkpoints under the ``s3://`` location ``location``; ``filesystem`` defaults to one built from its options."""

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
            abort_stale_uploads(self._fs, location.bucket, location.prefix)

    @classmethod
    def from_location(cls, location: RemoteLocation, *, create: bool = False) -> S3Store:
        return cls(location, create=create)

    @property
    def capabilities(self) -> Capabilities:
        """A writer lease (conditional PUTs) and its state for readers, local and sparse copies by ranged GETs."""
        return Capabilities(
            writer_lease=partial(S3WriterLease, self._fs, self.location),
            lease_state=partial(lease_state, self._fs, self.location),
            local_copy=self._local_copy,
            partial_copy=self._s3_partial_copy,
            max_name_bytes=self.max_name_bytes,
        )

    def _local_copy(self, name: str) -> AbstractContextManager[Path | None]:
        """A temporary local copy of ``name`` (deleted on exit); None when ``TMPDIR`` lacks the space.

        The copy comes from ``max_concurrency`` ranged GETs of ``part_size_mib`` at once, with a few
        MiB of client memory; loading it by path is faster than ``torch.load`` over :meth:`open`'s
        stream (docs/performance.md, target 4).
        """
        return downloaded(
            self._fs,
            self.location.bucket,
            self.location.key(name),
            self._child(name),
            range_size=self._part_size,
            max_concurrency=self._max_concurrency,
        )

    def _s3_partial_copy(self, name: str) -> AbstractContextManager[PartialCopy | None]:
        """An empty sparse copy of ``name`` whose ranges come from ranged GETs with the ETag of one HEAD."""
        url = self._child(name)
        object_id, size = head(self._fs, self.location.bucket, self.location.key(name), url)

        def fetch(path: Path, ranges: list[tuple[int, int]]) -> None:
            fetch_ranges(self._fs, url, object_id, path, split(ranges, self._part_size), self._max_concurrency)

        return partial_copy(url, size, fetch)

    @contextlib.contextmanager
    def _write(self, url: str, name: str) -> Iterator[IO[bytes]]:
        upload = S3Upload(
            self._fs,
            self.location.bucket,
            self.location.key(name),
            part_size=self._part_size,
            max_concurrency=self._max_concurrency,
        )
        kept = FailureKeeping(upload)
        try:
            yield kept  # type: ignore[misc]
            upload.commit()
        except BaseException as exc:
            upload.abort()
            kept.raise_own_failure(exc)
            raise

    def _exists(self, url: str, name: str) -> bool:
        with translated("checking before saving", url):
            try:
                self._fs.call_s3("head_object", Bucket=self.location.bucket, Key=self.location.key(name))
            except FileNotFoundError as exc:
                if error_code(exc) == "NoSuchBucket":
                    raise
                return False
            return True


STALE_UPLOAD_AGE = timedelta(hours=24)


def abort_stale_uploads(fs: Any, bucket: str, prefix: str, *, older_than: timedelta = STALE_UPLOAD_AGE) -> int:
    """Abort multipart uploads directly under ``prefix`` started more than ``older_than`` ago.

    A save killed with its process (SIGKILL, a lost machine) cannot abort its own upload; the next
    writer of the location does, as the local store removes a dead writer's temporary file. Uploads
    of live writers are far younger than a day. Best effort: failures are logged, never raised.
    """
    now = datetime.now(UTC)
    aborted = 0
    try:
        base = f"{prefix}/" if prefix else ""
        response = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=base)
        for upload in response.get("Uploads", []):
            key, initiated = str(upload["Key"]), upload.get("Initiated")
            if "/" in key[len(base) :] or not isinstance(initiated, datetime):
                continue  # another location's upload, under a deeper prefix
            if now - initiated.astimezone(UTC) > older_than:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                logger.info("aborted stale multipart upload of s3://%s/%s from %s", bucket, key, initiated)
                aborted += 1
    except Exception as exc:
        logger.warning("could not clean up stale uploads under s3://%s/%s: %s", bucket, prefix, exc)
    return aborted
