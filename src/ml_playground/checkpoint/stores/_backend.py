"""What building any store shares: its scheme's backend imported with a clear error, its options checked."""

from __future__ import annotations

import importlib
from types import ModuleType

from ml_playground.errors import ConfigError, MissingExtraError
from ml_playground.locations import LocalLocation, RemoteLocation
from ml_playground.schemes import SCHEMES

__all__ = ["check_options", "import_backend"]


def import_backend(location: RemoteLocation) -> ModuleType:
    """The module the location's scheme needs (``s3fs``, ``gcsfs``); missing: the pip extra to install."""
    scheme = SCHEMES[location.scheme]
    if scheme.requires is None:
        raise ConfigError(f"{location.url}: the {scheme.name}:// scheme needs no backend module")
    try:
        return importlib.import_module(scheme.requires)
    except ImportError:
        raise MissingExtraError(
            f"{location.url!r} needs the {scheme.requires} package, which is not installed; "
            f"install it with: pip install 'ml_playground[{scheme.extra}]'"
        ) from None


def check_options(location: LocalLocation | RemoteLocation) -> None:
    """The location's storage options must suit its scheme (the configuration loader checked it already;
    a location built by hand is checked here), so an option is never silently ignored."""
    if isinstance(location, LocalLocation):
        return
    problem = SCHEMES[location.scheme].refuses(location.storage_options.model_dump(exclude_unset=True))
    if problem is not None:
        raise ConfigError(f"{location.url}: {problem}")
