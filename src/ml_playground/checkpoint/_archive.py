"""CRC checks of the small records of a ``torch.save`` archive, which our own digests do not cover.

The codec's xxh3 digests cover every tensor's bytes and the *loaded* structure. A flipped byte in the
pickled metadata can still unpickle to the same structure (the pickle protocol number, a memo index),
so a damaged file would load without a word. The zip CRC-32 of each record catches that; tensor
storages are skipped here because their digests already cover them (and reading them twice costs).
"""

from __future__ import annotations

import re
import zipfile
from typing import IO

from ml_playground.errors import CheckpointCorruptError

__all__ = ["check_records"]

_TENSOR_STORAGE = re.compile(r"/data/\d+$")
_CHUNK = 1 << 20


def check_records(stream: IO[bytes], source: str) -> None:
    """Raise CheckpointCorruptError unless every non-tensor record matches its CRC-32.

    Streams that are not seekable or not zip archives are left to ``torch.load`` to judge. The
    stream's position is restored.
    """
    if not stream.seekable():
        return
    start = stream.tell()
    try:
        if not zipfile.is_zipfile(stream):
            return
        stream.seek(start)
        with zipfile.ZipFile(stream) as archive:
            for info in archive.infolist():
                if _TENSOR_STORAGE.search(info.filename):
                    continue
                with archive.open(info) as record:  # raises on a CRC or header mismatch at the end
                    while record.read(_CHUNK):
                        pass
    except Exception as exc:  # zipfile fails on damage in many ways: BadZipFile, NotImplementedError, zlib.error...
        raise CheckpointCorruptError(f"{source} is damaged: {exc}. Delete it, or restore it from a copy.") from None
    finally:
        stream.seek(start)
