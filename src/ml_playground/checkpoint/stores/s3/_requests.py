"""Requests to one S3 object whose outcome must be known even when the caller stops waiting.

A Ctrl-C stops only our wait for a request, not the request (it runs on fsspec's event loop). An
upload's commit and its creation of the multipart upload are sent through :class:`TrackedRequests`,
so that after an interrupt the upload can wait for them (:meth:`TrackedRequests.settle`, at most
``SETTLE_TIMEOUT``) and undo what landed late.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from typing import Any

__all__ = ["SETTLE_TIMEOUT", "TrackedRequests"]

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT = 30.0


class TrackedRequests:
    """Requests to ``s3://bucket/key`` (``url``, for messages) on filesystem ``fs``, tracked until they return."""

    def __init__(self, fs: Any, bucket: str, key: str, url: str) -> None:
        self._fs = fs
        self._bucket = bucket
        self._key = key
        self._url = url
        self._requests: dict[concurrent.futures.Future[Any], str] = {}

    def send(self, method: str, **kwargs: Any) -> Any:
        """``fs.call_s3(method, ...)`` on this object, tracked until it returns (see the module docstring)."""
        with contextlib.suppress(RuntimeError):  # no running loop: the usual case
            if asyncio.get_running_loop() is self._fs.loop:  # waiting here would wedge the loop: fsspec refuses
                return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)
        # Tracked before it is sent: a Ctrl-C can strike between any two lines, and a request sent but not
        # yet tracked would land unseen. One abandoned before it started is cancelled and never sent.
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests[future] = method

        async def send() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(await self._fs._call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs))
            except BaseException as exc:  # the caller's to handle, through the future
                future.set_exception(exc)

        asyncio.run_coroutine_threadsafe(send(), self._fs.loop)
        try:
            while not future.done():  # in slices, so that a Ctrl-C is noticed while the request runs
                concurrent.futures.wait([future], timeout=1)
            result = future.result()
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is not None:
                del self._requests[future]  # the request's own failure, which the caller handles
            raise
        del self._requests[future]
        return result

    def settle(self) -> dict[str, Any]:
        """Wait (at most ``SETTLE_TIMEOUT``) for requests a Ctrl-C left running; the responses of those that
        succeeded, by method. Forgets them all."""
        results: dict[str, Any] = {}
        for future in self._requests:
            future.cancel()  # succeeds only for one not sent yet
        done, running = concurrent.futures.wait(self._requests, timeout=SETTLE_TIMEOUT)
        for future in done:
            if not future.cancelled() and future.exception() is None:
                results[self._requests[future]] = future.result()
        for future in running:
            logger.warning(
                "a %s request for %s was still running %.0f s after the save was abandoned; check that object",
                self._requests[future],
                self._url,
                SETTLE_TIMEOUT,
            )
        self._requests.clear()
        return results
