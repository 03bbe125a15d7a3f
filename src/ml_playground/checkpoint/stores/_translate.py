"""The one boundary where botocore / aiobotocore / s3fs / gcsfs / aiohttp / urllib / OS errors become ours.

Every backend status code and errno the stores act on is in the tables below; stores ask
:func:`is_conflict`, :func:`is_missing` and :func:`is_changed` instead of comparing codes themselves.

Backends report the same condition in many shapes: botocore raises ``ClientError`` with a code,
s3fs re-raises it as an ``OSError`` subclass with the ``ClientError`` as its cause, gcsfs raises its
own ``HttpError`` with an HTTP status, and connection failures arrive as botocore or aiohttp
exceptions. :func:`translate` walks the exception's chain once and picks the package error; every
message names the operation and the URL. Classes are matched by name so that this module imports
no optional backend.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from ml_playground.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    MLPlaygroundError,
    StorageError,
    StorageUnavailableError,
)

__all__ = ["error_code", "is_changed", "is_conflict", "is_missing", "os_error", "translate", "translated"]

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_EXISTS_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_CONFLICT_CODES = {*_EXISTS_CODES, "409"}
"""A conditional request lost (If-Match / If-None-Match), or S3 refused a concurrent conditional write."""
_UNAVAILABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "InvalidBucketName"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "401",
    "Forbidden",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
    "301",
}
_NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "ProfileNotFound",
    "UnauthorizedSSOTokenError",
    "SSOTokenLoadError",
    "DefaultCredentialsError",
    "RefreshError",
    "NoRegionError",
}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerTimeoutError",
    "ConnectionRefusedError",
    "gaierror",
}
_CREDENTIALS_HINT = (
    "configure credentials through the standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "a profile, or an instance role; for GCS, application default credentials)"
)


def translate(exc: BaseException, operation: str, url: str) -> CheckpointError:
    """The package error for backend exception ``exc`` raised while ``operation`` ran on ``url``."""
    if isinstance(exc, CheckpointError):
        return exc
    what = f"{operation} {url} failed"
    names = _class_names(exc)
    code = error_code(exc)
    reason = _reason(exc, code)
    if names & _NO_CREDENTIALS:
        return StorageUnavailableError(f"{what}: no usable credentials ({reason}); {_CREDENTIALS_HINT}")
    if names & _UNREACHABLE:
        return StorageUnavailableError(
            f"{what}: the endpoint is unreachable ({reason}); check endpoint_url, the network and the region"
        )
    if code in _MISSING_BUCKET_CODES or "bucket does not exist" in reason.lower():
        return StorageUnavailableError(f"{what}: the bucket does not exist ({reason}); create it or fix the URL")
    if code in _DENIED_CODES or isinstance(exc, PermissionError) or reason.startswith("Forbidden"):
        return StorageUnavailableError(
            f"{what}: access denied ({reason}); check the credentials and the bucket's permissions"
        )
    if "FileExpired" in names or _condition(exc) == "If-Match":
        return StorageError(f"{what}: the object changed while it was being read ({reason}); read it again")
    if code in _EXISTS_CODES or isinstance(exc, FileExistsError):
        return CheckpointExistsError(f"{what}: the object already exists ({reason}); checkpoints are never overwritten")
    if code in _NOT_FOUND_CODES or isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"{what}: no such object ({reason})")
    return StorageError(f"{what}: {reason}")


@contextlib.contextmanager
def translated(operation: str, url: str) -> Iterator[None]:
    """Run the block; any backend exception leaves it as a package error naming ``operation`` and ``url``."""
    try:
        yield
    except MLPlaygroundError:
        raise
    except Exception as exc:
        raise translate(exc, operation, url) from exc


def os_error(exc: OSError, what: str, path: Path) -> StorageError:
    """The package error for a local file-system error while doing ``what`` with ``path``."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return StorageError(f"{what}: no space left on the device holding {path}; free space and retry")
    if exc.errno in _UNAVAILABLE_ERRNOS:
        return StorageUnavailableError(f"{what}: {reason} ({path}); check that the location is writable")
    return StorageError(f"{what}: {reason} ({path})")


def is_conflict(exc: BaseException) -> bool:
    """A conditional request (If-Match, If-None-Match) lost: the object is not what the caller thought."""
    return error_code(exc) in _CONFLICT_CODES


def is_missing(exc: BaseException) -> bool:
    """The object (or what holds it) does not exist."""
    return error_code(exc) in _NOT_FOUND_CODES or isinstance(exc, FileNotFoundError)


def is_changed(exc: BaseException) -> bool:
    """A read pinned to an ETag (If-Match) found the object replaced."""
    return error_code(exc) in ("PreconditionFailed", "412")


def error_code(exc: BaseException) -> str | None:
    """The S3 error code or HTTP status carried anywhere in ``exc``'s chain, as a string."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            code = error.get("Code")
            if code:
                return str(code)
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status:
                return str(status)
        status = getattr(link, "code", None)
        if isinstance(status, int) and type(link).__name__ in ("HttpError", "HTTPError"):  # gcsfs, urllib
            return str(status)
    return None


def _condition(exc: BaseException) -> str | None:
    """Which precondition header a 412 refers to: If-None-Match (exists) or If-Match (changed)."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            condition = (response.get("Error") or {}).get("Condition")
            if condition:
                return str(condition)
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 8:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for link in _chain(exc) for cls in type(link).__mro__}


def _reason(exc: BaseException, code: str | None) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if code and code not in text:
        text = f"{code}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."
