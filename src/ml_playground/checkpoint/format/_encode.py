"""Checkpoint -> bytes: ``torch.save`` of tensors and plain data, with the integrity record filled in during the write.

Speed (docs/performance.md): ``torch.save``'s zip writer computes a CRC32 of every record by default, a
whole extra pass over the tensor bytes that ``torch.load`` never checks; our xxh3 digests are the check,
so ``encode`` turns that CRC off for its own ``torch.save`` call (the records' CRC fields then read 0;
``torch.load`` is unaffected, ``unzip -t`` would complain). The digests are computed by a second thread
while ``torch.save`` writes the tensors: they are a tensor, the archive's last tensor record, so they are
needed only at the end of the write. The section order (model and EMA first, the optimizer last) keeps
the weights an evaluation needs in one run of bytes near the file's start.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import IO, Any, cast

import torch

from ml_playground.checkpoint._checkpoint import Checkpoint
from ml_playground.checkpoint._streams import FailureKeeping
from ml_playground.checkpoint.format import _digests
from ml_playground.checkpoint.format._tensors import check_saveable
from ml_playground.checkpoint.format._torch import crc32_off
from ml_playground.checkpoint.format._version import FORMAT_MAGIC, FORMAT_VERSION
from ml_playground.errors import CheckpointError

__all__ = ["encode"]

Payload = dict[str, Any]


def encode(checkpoint: Checkpoint, stream: IO[bytes], *, destination: str = "the stream") -> None:
    """Write ``checkpoint`` to ``stream`` (which need not be seekable); ``destination`` names it in errors.

    A tensor that is not plain (sparse, meta, an expanded view...) raises CheckpointError before the first write.
    """
    check_saveable(checkpoint, destination)
    body: Payload = {
        "format": FORMAT_MAGIC,
        "format_version": FORMAT_VERSION,
        "meta": {
            "iter_num": checkpoint.iter_num,
            "best_val_loss": checkpoint.best_val_loss,
            "model_args": dict(checkpoint.model_args),
            "config": dict(checkpoint.config),
            "data_state": dict(checkpoint.data_state),
            "world_size": checkpoint.world_size,
        },
        "model": dict(checkpoint.model),
        "ema": None if checkpoint.ema is None else dict(checkpoint.ema),
        "rng_state": dict(checkpoint.rng_state),
        "optimizer": dict(checkpoint.optimizer),
        "shards": None if checkpoint.shards is None else dict(checkpoint.shards),
    }
    tensors = [tensor for _, _, tensor in _digests.tensors(body)]
    with _DigestThread(tensors, destination) as digests, contextlib.ExitStack() as crc_off:
        # The digest tensor starts as random bytes that no other record of the archive can equal; the
        # sink recognises that record when torch writes it (last) and writes the digests in its place.
        # (os.urandom, not torch's generator: a save must not move the training's RNG state)
        placeholder = os.urandom(len(tensors) * _digests.DIGEST_SIZE)
        rows = torch.tensor(list(placeholder), dtype=torch.uint8).reshape(len(tensors), _digests.DIGEST_SIZE)
        payload = {**body, "integrity": {**_digests.structure_record(body), "tensors": rows}}
        crc_off.enter_context(crc32_off())
        # torch reads the CRC switch once, when it opens its zip writer, before its first write: the switch
        # goes back at that first write, so other threads' saves neither wait for ours nor lose their CRCs
        sink = _DigestSink(stream, placeholder, digests.result, on_first_write=crc_off.close)
        kept = FailureKeeping(sink)
        try:
            torch.save(payload, cast(IO[bytes], kept))  # torch only calls write() and flush()
        except BaseException as exc:
            kept.raise_own_failure(exc)  # torch.save reports it as RuntimeError("unexpected pos ...")
            raise
        kept.raise_failure()
        if tensors and not sink.replaced:
            raise CheckpointError(
                f"saving {destination} was abandoned: this torch version's writer (torch {torch.__version__}) did "
                "not write the checkpoint's integrity record as one piece. Report this to ml_playground."
            )


class _DigestThread:
    """Hashes tensors on a second thread while the caller writes them (xxhash releases the GIL).

    ``result()`` waits for every digest; leaving the ``with`` block stops the thread early (between two
    tensors) when the write failed and waits for it, so no thread outlives a save. (A second Ctrl-C
    during that wait leaves the daemon thread to finish its current tensor on its own; it only reads.)
    """

    def __init__(self, tensors: list[torch.Tensor], destination: str) -> None:
        self._tensors = tensors
        self._destination = destination
        self._digests: list[bytes] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ml_playground-checksums", daemon=True)

    def __enter__(self) -> _DigestThread:
        try:
            self._thread.start()
        except RuntimeError as exc:  # "can't start new thread": the process is at its thread limit
            raise CheckpointError(
                f"saving {self._destination} failed before writing: the thread that computes its checksums "
                f"could not start ({exc}); the process is at its thread limit"
            ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            for tensor in self._tensors:
                if self._stop.is_set():
                    return
                self._digests.append(_digests.tensor_digest(tensor))
        except BaseException as exc:  # handed to the writer by result(); never lost in the thread
            self._error = exc

    def result(self) -> bytes:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return b"".join(self._digests)


class _DigestSink:
    """Passes torch's writes through and writes the digests in place of the integrity record's placeholder.

    torch's zip writer hands over an uncompressed record in one write, straight from the tensor's memory,
    so the placeholder arrives as one write of exactly its bytes.
    """

    def __init__(
        self, stream: IO[bytes], placeholder: bytes, digests: Callable[[], bytes], on_first_write: Callable[[], object]
    ) -> None:
        self._stream = stream
        self._placeholder = placeholder
        self._digests = digests
        self._on_first_write: Callable[[], object] | None = on_first_write
        self.replaced = False

    def write(self, data: bytes) -> int:
        first = self._on_first_write
        if first is not None:
            self._on_first_write = None
            first()
        if not self.replaced and len(data) == len(self._placeholder) and bytes(data) == self._placeholder:
            self.replaced = True
            digests = self._digests()
            self._stream.write(digests)
            return len(digests)
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()
