"""One atomic, streaming S3 upload: parts in flight concurrently, visible only when complete.

Why not ``s3fs``'s own file object: an exception inside ``with fs.open(url, "wb")`` commits the partial
object, parts go up one at a time, and a failed commit leaves the multipart upload open. Here:

- bytes fill a buffer of ``part_size``; each full buffer becomes an ``UploadPart`` running on the
  filesystem's event loop, with at most ``max_concurrency`` in flight, so memory stays bounded by
  ``(max_concurrency + 1) * part_size`` whatever the checkpoint's size;
- an object smaller than one part is a single ``PutObject``;
- the object appears only through ``CompleteMultipartUpload`` / ``PutObject`` with
  ``If-None-Match: *``, so an existing object is never replaced;
- :meth:`S3Upload.abort` (called on any ``BaseException`` and after a failed commit) cancels the parts
  in flight and aborts the multipart upload;
- a commit whose outcome is unknown (the connection died, or a retry of a request that had landed got
  412) is settled by a ``HeadObject``: the object counts as ours only if it carries this upload's
  random write id and the expected size. If it was committed while the caller gave up (Ctrl-C during
  the commit), :meth:`S3Upload.abort` deletes it again;
- a Ctrl-C stops only our wait for a request, not the request (it runs on fsspec's event loop): the
  commit and the creation of the multipart upload are tracked, and :meth:`S3Upload.abort` first waits
  for what is still running (at most 30 s), so a commit that lands late is deleted and an upload
  created late is aborted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import secrets
from typing import TYPE_CHECKING, Any

from ml_playground.checkpoint.stores._translate import translate, translated
from ml_playground.checkpoint.stores.s3._requests import SETTLE_TIMEOUT, TrackedRequests
from ml_playground.errors import StorageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["WRITE_ID_KEY", "S3Upload"]

logger = logging.getLogger(__name__)

WRITE_ID_KEY = "ml-playground-write-id"
"""User metadata key holding the random id of the upload that wrote an object."""


class S3Upload(io.RawIOBase):
    """A write-only stream that becomes ``s3://bucket/key`` on :meth:`commit`, and nothing on :meth:`abort`."""

    def __init__(self, fs: Any, bucket: str, key: str, *, part_size: int, max_concurrency: int) -> None:
        super().__init__()
        self._fs = fs
        self._bucket = bucket
        self._key = key
        self._url = f"s3://{bucket}/{key}"
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self._write_id = secrets.token_hex(16)
        # parts travel as BytesIO: aiohttp streams a file object, while a large bytes body blocks its loop
        self._buffer = io.BytesIO()
        self._size = 0
        self._upload_id: str | None = None
        self._next_part = 1
        self._parts: list[dict[str, Any]] = []
        self._in_flight: dict[concurrent.futures.Future[dict[str, Any]], int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._requests = TrackedRequests(fs, bucket, key, self._url)  # commit/create requests a Ctrl-C may leave
        self._committing = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def upload_id(self) -> str | None:
        """The multipart upload's id once one was created (for logs and tests)."""
        return self._upload_id

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        if self.closed:
            raise ValueError(f"write to a finished upload of {self._url}")
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            take = min(len(view), self._part_size - self._buffer.tell())
            self._buffer.write(view[:take])
            view = view[take:]
            if self._buffer.tell() == self._part_size:
                body, self._buffer = self._buffer, io.BytesIO()
                with translated("uploading a part of", self._url):
                    self._send_part(body)
        self._size += total
        return total

    # ------------------------------------------------------------ commit

    def commit(self) -> None:
        """Make the object visible under its key, or raise (then call :meth:`abort`)."""
        with translated("uploading", self._url):
            if self._upload_id is None:
                self._commit_single()
            else:
                if self._buffer.tell():
                    self._send_part(self._buffer)
                while self._in_flight:
                    self._collect(concurrent.futures.FIRST_EXCEPTION)
                self._commit_multipart()
        self._buffer = io.BytesIO()
        self.close()

    def _commit_single(self) -> None:
        body = self._buffer
        body.seek(0)
        self._committing = True
        try:
            self._requests.send(
                "put_object",
                Body=body,
                IfNoneMatch="*",
                Metadata={WRITE_ID_KEY: self._write_id},
            )
        except Exception as exc:
            self._settle(exc)

    def _commit_multipart(self) -> None:
        parts = sorted(self._parts, key=lambda part: int(part["PartNumber"]))
        self._committing = True
        try:
            self._requests.send(
                "complete_multipart_upload",
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except Exception as exc:
            self._settle(exc)

    def _settle(self, exc: Exception) -> None:
        """A commit request failed: succeed only if the object is provably this upload's."""
        try:
            ours = self._is_ours()
        except Exception as head_exc:
            raise StorageError(
                f"uploading {self._url}: the commit's outcome is unknown ({translate(exc, 'commit', self._url)}); "
                f"checking it failed too ({translate(head_exc, 'checking', self._url)})"
            ) from exc
        if not ours:
            raise exc
        logger.info("commit of %s was retried after it had landed; the object is this upload's", self._url)

    def _is_ours(self) -> bool:
        try:
            head = self._fs.call_s3("head_object", Bucket=self._bucket, Key=self._key)
        except FileNotFoundError:
            return False
        metadata = {str(k).lower(): v for k, v in (head.get("Metadata") or {}).items()}
        return bool(metadata.get(WRITE_ID_KEY) == self._write_id and head.get("ContentLength") == self._size)

    # ------------------------------------------------------------ abort

    def abort(self) -> None:
        """Leave nothing behind: cancel parts in flight, abort the upload, undo a commit that landed.

        Never raises (it runs while another exception propagates); what it cannot clean up it logs.
        """
        self._buffer = io.BytesIO()
        self.close()
        created = self._requests.settle().get("create_multipart_upload")
        if created is not None and self._upload_id is None:  # created after the caller gave up waiting
            self._upload_id = str(created["UploadId"])
        try:
            self._cancel_in_flight()
        except Exception as exc:  # cleanup must not replace the caller's exception
            logger.warning("cancelling the parts of %s failed: %s", self._url, exc)
        if self._upload_id is not None:
            try:
                self._fs.call_s3("abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
            except FileNotFoundError:
                pass  # completed or already aborted
            except Exception as exc:
                logger.warning(
                    "could not abort multipart upload %s of %s (%s); a bucket lifecycle rule that aborts "
                    "incomplete multipart uploads removes it",
                    self._upload_id,
                    self._url,
                    translate(exc, "aborting", self._url),
                )
        if self._committing:
            self._delete_if_ours()

    def _delete_if_ours(self) -> None:
        try:
            if self._is_ours():
                self._fs.call_s3("delete_object", Bucket=self._bucket, Key=self._key)
                logger.warning("%s was committed while the save was being abandoned; deleted it", self._url)
        except Exception as exc:
            logger.warning(
                "could not check whether the abandoned save of %s landed (%s); check that object",
                self._url,
                translate(exc, "checking", self._url),
            )

    def _cancel_in_flight(self) -> None:
        if not self._in_flight:
            return
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        tasks = list(self._tasks)
        if tasks:
            asyncio.run_coroutine_threadsafe(_cancel_and_wait(tasks), self._fs.loop).result(SETTLE_TIMEOUT)

    # ------------------------------------------------------------ parts

    def _send_part(self, body: io.BytesIO) -> None:
        body.seek(0)
        if self._upload_id is None:
            response = self._requests.send("create_multipart_upload", Metadata={WRITE_ID_KEY: self._write_id})
            self._upload_id = str(response["UploadId"])
        while len(self._in_flight) >= self._max_concurrency:
            self._collect(concurrent.futures.FIRST_COMPLETED)
        number = self._next_part
        self._next_part += 1
        future = asyncio.run_coroutine_threadsafe(self._upload_part(number, body), self._fs.loop)
        self._in_flight[future] = number

    async def _upload_part(self, number: int, body: io.BytesIO) -> dict[str, Any]:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            response: dict[str, Any] = await self._fs._call_s3(
                "upload_part",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
        finally:
            if task is not None:
                self._tasks.discard(task)
        part = {"PartNumber": number, "ETag": response["ETag"]}
        # echo the part checksums botocore computed: S3 checks them again at completion
        part.update({k: v for k, v in response.items() if k.startswith("Checksum") and k != "ChecksumType"})
        return part

    def _collect(self, return_when: str) -> None:
        done, _ = concurrent.futures.wait(self._in_flight, return_when=return_when)
        for future in done:
            del self._in_flight[future]
            self._parts.append(future.result())


async def _cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
