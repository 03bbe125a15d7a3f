"""Paths and URLs into validated locations, through the scheme registry (:mod:`ml_playground.schemes`).

The only place in the package that parses a ``scheme://`` string or resolves a relative path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import SecretStr

from ml_playground.errors import ConfigError, MissingExtraError
from ml_playground.locations import LocalLocation, Location, RemoteLocation, StorageOptions
from ml_playground.schemes import LOCAL_SCHEME, SCHEMES, Scheme

__all__ = [
    "applicable_options",
    "is_file_ref",
    "parse_checkpoint_ref",
    "parse_location",
    "require_options_used",
    "resolve_path",
]

_CHECKPOINT_SUFFIX = ".pt"
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_TYPO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/?(?!/)")
_BARE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*$")


def parse_location(
    text: str,
    *,
    base_dir: Path,
    storage_options: StorageOptions | None = None,
    what: str = "location",
    only_applicable: bool = False,
) -> Location:
    """Turn a path or URL into a validated location; relative paths resolve against ``base_dir``.

    ``storage_options`` must all apply to the location's scheme (a ConfigError names those that do
    not); with ``only_applicable`` the location takes just those that apply, for options given once
    for several locations (``ckpt cp SRC DST -o ...``, checked by :func:`require_options_used`).
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what} must be a non-empty path or URL, got {text!r}")
    with _query_hidden(text):
        return _parse_location(text.strip(), base_dir, storage_options or StorageOptions(), what, only_applicable)


def _parse_location(text: str, base_dir: Path, options: StorageOptions, what: str, only_applicable: bool) -> Location:
    scheme_match = _SCHEME_PREFIX.match(text)
    if scheme_match is None:
        typo = _SCHEME_TYPO.match(text)
        if typo is not None and typo.group(1).lower() in SCHEMES:
            scheme = typo.group(1).lower()
            raise ConfigError(f"{what} {text!r} looks like a {scheme}:// URL with a '/' missing; write {scheme}://...")
        return _local(resolve_path(text, base_dir, what), options, what, only_applicable)
    scheme_name = scheme_match.group(1).lower()
    if scheme_name == LOCAL_SCHEME:
        return _local(_file_url_path(text, base_dir, what), options, what, only_applicable)
    scheme = SCHEMES.get(scheme_name)
    if scheme is None:
        allowed = ", ".join(["a local path", *(f"{s}://" for s in SCHEMES if not SCHEMES[s].single_file)])
        raise ConfigError(f"{what} {text!r}: unsupported URL scheme {scheme_name!r}; use {allowed}")
    if scheme.single_file:
        raise ConfigError(
            f"{what} {text!r}: {scheme.name}:// URLs are read-only and name one checkpoint file, never a run "
            "location or an out_dir; read it with sample/eval --checkpoint URL or ckpt show/verify/export/cp URL"
        )
    _require_backend(scheme, text)
    root = _checked_root(text[len(scheme_match.group(0)) :], scheme, text, what)
    selected = applicable_options(options, scheme) if only_applicable else options
    _check_options(selected, scheme, what)
    return RemoteLocation(scheme=scheme.name, root=root, storage_options=selected)


def parse_checkpoint_ref(
    text: str,
    *,
    base_dir: Path,
    storage_options: StorageOptions | None = None,
    only_applicable: bool = False,
    for_writing: bool = False,
) -> tuple[Location, str]:
    """Split a checkpoint file's path or URL into its run location and the checkpoint's name.

    ``for_writing``: the file is a destination (``ckpt cp``, ``ckpt export``), which a read-only URL
    (``http(s)://``) cannot be.
    """
    single = _single_file_scheme(text)
    if single is not None:
        with _query_hidden(text):
            return _file_url(text.strip(), single, storage_options or StorageOptions(), only_applicable, for_writing)
    stripped = text.strip().rstrip("/")
    parent, sep, name = stripped.rpartition("/")
    if _BARE_URL.match(stripped):
        raise ConfigError(f"checkpoint {text!r} names no file; write SCHEME://BUCKET/PREFIX/FILE")
    if not sep or not name:
        parent, name = ".", stripped
    if parent.lower().startswith(
        f"{LOCAL_SCHEME}://"
    ):  # percent-escapes decoded in the name too; file:///x.pt is /x.pt
        parent, name = parent if parent.lower() != f"{LOCAL_SCHEME}://" else f"{LOCAL_SCHEME}:///", unquote(name)
    if not name or name.startswith(".") or "\0" in name:  # "..", hidden and temporary files
        raise ConfigError(f"checkpoint {text!r}: {name!r} is not a checkpoint file name; write DIR/FILE or URL/FILE")
    location = parse_location(
        parent or "/",
        base_dir=base_dir,
        storage_options=storage_options,
        what="checkpoint",
        only_applicable=only_applicable,
    )
    return location, name


def is_file_ref(text: str) -> bool:
    """Whether a command-line location names one checkpoint file rather than a run location: its path
    ends in ``.pt`` (for an ``http(s)://`` URL its path, not its query)."""
    if _single_file_scheme(text) is not None:
        return urlsplit(text.strip()).path.endswith(_CHECKPOINT_SUFFIX)
    return text.strip().rstrip("/").endswith(_CHECKPOINT_SUFFIX)


def applicable_options(options: StorageOptions, scheme: Scheme) -> StorageOptions:
    """``options`` without those set that ``scheme`` does not take."""
    taken = scheme.options.model_fields
    return StorageOptions.model_validate(
        {key: getattr(options, key) for key in options.model_fields_set if key in taken}
    )


def require_options_used(options: StorageOptions, locations: Sequence[Location], flag: str) -> None:
    """Every option set must apply to at least one of ``locations``: none is silently ignored."""
    taken = {key for location in locations for key in SCHEMES[location.scheme].options.model_fields}
    unused = sorted(options.model_fields_set - taken)
    if unused:
        schemes = ", ".join(sorted({f"{location.scheme}://" for location in locations}))
        raise ConfigError(f"{flag} {', '.join(unused)}: no location of this command ({schemes}) takes it")


def resolve_path(text: str, base_dir: Path, what: str) -> Path:
    """``text`` as an absolute path (``~`` expanded, relative to ``base_dir``); unusable paths are ConfigErrors."""
    try:
        path = Path(os.path.expanduser(text))
        return (path if path.is_absolute() else base_dir / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte, ...
        raise ConfigError(f"{what} {text!r} is not a usable path ({exc})") from None


def _local(path: Path, options: StorageOptions, what: str, only_applicable: bool) -> LocalLocation:
    if options.model_fields_set and not only_applicable:
        raise ConfigError(
            f"{what} {path} is a local path, which takes no storage options "
            f"(got {', '.join(sorted(options.model_fields_set))}); remove them"
        )
    return LocalLocation(path=path)


def _file_url_path(text: str, base_dir: Path, what: str) -> Path:
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ConfigError(
            f"{what} {text!r}: a file:// URL names a local path (file:///abs/path); it takes no host, query or fragment"
        )
    if not parts.path:
        raise ConfigError(f"{what} {text!r} has no path; write file:///abs/path")
    return resolve_path(unquote(parts.path), base_dir, what)


def _checked_root(rest: str, scheme: Scheme, text: str, what: str) -> str:
    """The URL's path (bucket and prefix) with repeated and trailing slashes removed, checked."""
    if rest.startswith("/") and scheme.bucket is not None:
        raise ConfigError(f"{what} {text!r} has no bucket; write {scheme.name}://BUCKET/PREFIX")
    root = re.sub(r"/{2,}", "/", rest.strip("/"))
    if scheme.bucket is not None:
        bucket = root.split("/", 1)[0]
        if not bucket:
            raise ConfigError(f"{what} {text!r} has no bucket; write {scheme.name}://BUCKET/PREFIX")
        if not scheme.bucket.pattern.match(bucket):
            raise ConfigError(f"{what} {text!r}: {bucket!r} is not a valid bucket name ({scheme.bucket.description})")
    elif not root:
        raise ConfigError(f"{what} {text!r} has no path; write {scheme.name}://NAME")
    if any(part in (".", "..") for part in root.split("/")):
        raise ConfigError(f"{what} {text!r} must not contain '.' or '..' path segments")
    return root


def _check_options(options: StorageOptions, scheme: Scheme, what: str) -> None:
    problem = scheme.refuses(options.model_dump(exclude_unset=True))
    if problem is not None:
        raise ConfigError(f"{what}: {problem}")


def _require_backend(scheme: Scheme, url: str) -> None:
    if scheme.requires is not None and importlib.util.find_spec(scheme.requires) is None:
        raise MissingExtraError(
            f"{url!r} needs the {scheme.requires} package, which is not installed; "
            f"install it with: pip install 'ml_playground[{scheme.extra}]'"
        )


def _single_file_scheme(text: str) -> Scheme | None:
    """The scheme of ``text`` when it is a URL of a read-only single-file scheme (``http(s)://``)."""
    match = _SCHEME_PREFIX.match(text.strip())
    scheme = SCHEMES.get(match.group(1).lower()) if match is not None else None
    return scheme if scheme is not None and scheme.single_file else None


def _file_url(
    text: str, scheme: Scheme, options: StorageOptions, only_applicable: bool, for_writing: bool
) -> tuple[RemoteLocation, str]:
    """A URL of one file: the location of its directory holding that one object, with its query kept secret."""
    parts = urlsplit(text)
    shown = _shown(parts)
    if for_writing:
        raise ConfigError(f"{shown!r}: {scheme.name}:// URLs are read-only; write to a local path, s3:// or gs://")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{shown!r}: credentials in a URL's host part are not accepted; use a presigned URL")
    if parts.fragment:
        raise ConfigError(f"{shown!r}: a URL with a fragment (#...) names no file; remove the fragment")
    if not parts.hostname:
        raise ConfigError(f"checkpoint {shown!r} has no host; write {scheme.name}://HOST/PATH/FILE.pt")
    directory, _, name = parts.path.rpartition("/")
    if not name or name.startswith(".") or any(seg in (".", "..") for seg in directory.split("/")):
        raise ConfigError(f"checkpoint {shown!r} names no checkpoint file; write {scheme.name}://HOST/PATH/FILE.pt")
    selected = applicable_options(options, scheme) if only_applicable else options
    _check_options(selected, scheme, "checkpoint")
    query = SecretStr(parts.query) if parts.query else None
    location = RemoteLocation(
        scheme=scheme.name, root=f"{parts.netloc}{directory}", storage_options=selected, object_name=name, query=query
    )
    return location, name


def _shown(parts: SplitResult) -> str:
    """A URL as messages may show it: no credentials in the host part, the query as ``?...``."""
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}{'?...' if parts.query else ''}{'#...' if parts.fragment else ''}"


@contextlib.contextmanager
def _query_hidden(text: str) -> Iterator[None]:
    """Errors about the URL ``text`` never show its query or host credentials (presigned signatures are secrets)."""
    try:
        yield
    except ConfigError as exc:
        message = str(exc)
        if _SCHEME_TYPO.match(text.strip()) is not None or _SCHEME_PREFIX.match(text.strip()) is not None:
            parts = urlsplit(text.strip())
            userinfo = parts.netloc.rpartition("@")[0]
            for secret, mask in ((f"?{parts.query}", "?..."), (f"#{parts.fragment}", "#..."), (f"{userinfo}@", "...@")):
                if len(secret) > 1:
                    message = message.replace(secret, mask).replace(repr(secret)[1:-1], mask)
        if message == str(exc):
            raise
        raise type(exc)(message) from None
