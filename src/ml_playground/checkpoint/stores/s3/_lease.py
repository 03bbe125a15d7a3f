"""The writer lease on S3: an object written with conditional puts, kept alive by heartbeats.

``<prefix>/.ml_playground.lease`` holds the holder (as on local disk) plus ``expires_at``.

- acquire: ``PutObject`` with ``If-None-Match: *``. If it exists, read it with its ETag; a lease whose
  ``expires_at`` has passed (or whose holder was a process on this host that is gone) is taken over
  with ``PutObject`` ``If-Match: <that ETag>``, so of two restarted jobs only one can win; a live
  one raises LocationLockedError unless ``force=True``. A holder on this host whose process is alive
  is live whatever its expiry says (its heartbeat may have met a network fault).
- heartbeat: every ``ttl / 4`` a ``PutObject`` ``If-Match: <our ETag>`` with a new ``expires_at``; a
  412 means it was taken over, and the next :meth:`check` says so. :meth:`check` also renews the lease
  itself when the last renewal is older than ``ttl / 2`` (failing heartbeats), so a writer never goes on
  saving on a lease that may have expired: that renewal succeeds or the save fails.
- a conditional PUT whose response was lost is retried by botocore and the retry answers 412 although
  the first attempt landed: a 412 is settled by reading the lease, which is ours if it holds our token.
- release: ``DeleteObject`` ``If-Match: <our ETag>``: a lease taken over by another is left alone.

A writer that died (SIGKILL, preemption, lost node) blocks its restart for at most ``ttl`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

from fsspec.asyn import sync

from ml_playground.checkpoint._lease import (
    DEFAULT_TTL,
    LEASE_NAME,
    MAX_LEASE_BYTES,
    Lease,
    LeaseHolder,
    LeaseState,
    MalformedLeaseError,
    process_alive,
)
from ml_playground.checkpoint.stores._translate import is_conflict, is_missing, translate
from ml_playground.errors import CheckpointError, LocationLockedError
from ml_playground.locations import RemoteLocation

__all__ = ["S3WriterLease", "lease_state"]

logger = logging.getLogger(__name__)


class S3WriterLease(Lease):
    """The writer lease of the S3 run location ``location`` on filesystem ``fs``."""

    def __init__(self, fs: Any, location: RemoteLocation, *, force: bool = False, ttl: float = DEFAULT_TTL) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        self._fs = fs
        self.location = url = location.url
        self.ttl = ttl
        self.holder = LeaseHolder.for_this_process()
        self._bucket, self._key = location.bucket, location.key(LEASE_NAME)
        self._lease_url = location.child(LEASE_NAME)
        self._etag: str | None = None
        self._renewed = time.monotonic()
        self._renewing = threading.Lock()
        self._lost = False
        self._stop = threading.Event()
        self._acquire(force)
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-heartbeat {url}", daemon=True)
        self._heartbeat.start()

    # ------------------------------------------------------------ public

    def check(self) -> None:
        """Raise LocationLockedError unless this writer still holds the lease."""
        current = self._get()
        if self._lost or current is None or current[0].get("token") != self.holder.token:
            raise self._taken_over(self.location, _describe(current[0]) if current is not None else None)
        if time.monotonic() - self._renewed > self.ttl / 2:  # the heartbeat has been failing
            self._renew()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=10)
        with self._renewing:  # a renewal still in flight would change the ETag under the delete
            if self._etag is not None and not self._lost:
                with contextlib.suppress(CheckpointError, _Conflict):  # taken over meanwhile: not ours to delete
                    self._call("releasing the writer lease", "delete_object", IfMatch=self._etag)
            self._etag = None

    # ------------------------------------------------------------ protocol

    def _acquire(self, force: bool) -> None:
        try:
            self._etag = self._put(IfNoneMatch="*")
            return
        except _Conflict:
            if self._adopt_if_ours():
                return
        current = self._get()
        if current is None:  # released meanwhile: try once more, as a fresh lease
            try:
                self._etag = self._put(IfNoneMatch="*")
                return
            except _Conflict:
                if self._adopt_if_ours():
                    return
                raise self._locked("another writer took it at the same moment") from None
        record, etag = current
        try:
            alive, why = self._holder_state(record)
        except MalformedLeaseError as exc:
            if not force:
                raise
            alive, why = True, str(exc)  # replaced below, by force
        if alive and not force:
            raise self._locked(why, record)
        logger.warning("taking over the writer lease on %s from %s (%s)", self.location, _describe(record), why)
        try:
            self._etag = self._put(IfMatch=etag)
        except _Conflict:
            if not self._adopt_if_ours():
                raise self._locked("another writer took it over at the same moment") from None

    def _holder_state(self, record: dict[str, Any]) -> tuple[bool, str]:
        return _holder_state(record, self.holder.host, self._lease_url)

    def _locked(self, why: str, record: dict[str, Any] | None = None) -> LocationLockedError:
        holder = f" ({_describe(record)}; {why})" if record is not None else f" ({why})"
        return LocationLockedError(
            f"{self.location} is being written by another job{holder}. Stop that job, or, if you are "
            "sure it no longer writes, take the lease over explicitly (ml-playground train --take-over; "
            "in Python acquire_writer(force=True))."
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._renew()
            except LocationLockedError:
                return
            except CheckpointError as exc:  # transient: the next beat (or check()) retries before it expires
                logger.warning("writer lease heartbeat on %s failed: %s", self.location, exc)

    def _renew(self) -> None:
        """Extend the lease (a conditional PUT on our ETag); LocationLockedError if it is no longer ours."""
        with self._renewing:
            if self._lost:
                raise self._taken_over(self.location, None)
            try:
                self._etag = self._put(IfMatch=self._etag or "")
            except _Conflict:
                if not self._adopt_if_ours():
                    self._lost = True
                    raise self._taken_over(self.location, None) from None

    def _adopt_if_ours(self) -> bool:
        """After a 412: whether the lease holds our token after all (a retried PUT whose first attempt
        landed); if so, its current ETag becomes ours."""
        current = self._get()
        if current is None or current[0].get("token") != self.holder.token:
            return False
        self._etag = current[1]
        self._renewed = time.monotonic()
        return True

    # ------------------------------------------------------------ S3 calls

    def _put(self, **condition: str) -> str:
        record = {**asdict(self.holder), "expires_at": time.time() + self.ttl}
        body = json.dumps(record, sort_keys=True).encode()
        response = self._call("writing the writer lease", "put_object", Body=body, **condition)
        self._renewed = time.monotonic()
        return str(response["ETag"])

    def _get(self) -> tuple[dict[str, Any], str] | None:
        return _get(self._fs, self._bucket, self._key, self._lease_url)

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        try:
            return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)
        except Exception as exc:
            if is_conflict(exc):
                raise _Conflict from None
            raise translate(exc, what, self._lease_url) from None


def lease_state(fs: Any, location: RemoteLocation) -> LeaseState:
    """The writer lease of ``location`` as a reader sees it: one GetObject of the lease, nothing written."""
    current = _get(fs, location.bucket, location.key(LEASE_NAME), location.child(LEASE_NAME))
    if current is None:
        return "released"
    alive, _ = _holder_state(current[0], socket.gethostname(), location.child(LEASE_NAME))
    return "held" if alive else "expired"


def _holder_state(record: dict[str, Any], this_host: str, url: str) -> tuple[bool, str]:
    """Whether the holder of the lease ``record`` (at ``url``) may still be writing, and why we think so."""
    holder = LeaseHolder.from_record(record, url, extra=("expires_at",))
    expires = record.get("expires_at")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        raise MalformedLeaseError(url, f"expires_at is {str(expires)[:40]!r}, not a time")
    if holder.host == this_host:
        if process_alive(holder.pid, holder.process_start):
            return True, "its process on this host is alive"
        return False, "its process on this host is gone"
    left = float(expires) - time.time()
    if left <= 0:
        return False, f"it expired {-left:.0f} s ago without a heartbeat"
    return True, f"it expires in {left:.0f} s unless its holder's heartbeat renews it"


def _get(fs: Any, bucket: str, key: str, url: str) -> tuple[dict[str, Any], str] | None:
    """The lease object's record and ETag; None when there is none. A record that is not a table is
    checked (and named) where its holder matters: _holder_state."""

    async def fetch() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return await body.read(), str(response["ETag"])

    try:
        data, etag = sync(fs.loop, fetch)
    except Exception as exc:
        if is_missing(exc):
            return None
        raise translate(exc, "reading the writer lease", url) from None
    try:
        record = json.loads(data) if len(data) <= MAX_LEASE_BYTES else None
    except ValueError:
        record = None
    return (record if isinstance(record, dict) else {"malformed": "not a JSON table"}), etag


class _Conflict(Exception):
    """A conditional request lost: the lease is not what we thought."""


def _describe(record: dict[str, Any]) -> str:
    pid, host, since = (str(record.get(key))[:64] for key in ("pid", "host", "acquired_at"))
    return f"pid {pid} on host {host}, since {since}"
