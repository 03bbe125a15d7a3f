"""One phase of one scenario, run in its own process: the baselines and our store, on the same bytes.

Each ``setup_<scenario>(ctx)`` prepares everything outside the timed phase and returns
``(body, cleanup)``: ``body(phase)`` is the timed phase and returns extra result fields;
``cleanup()`` frees what the phase produced before the next memory mode runs (see bench.py).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _measure import Phase
from _state import as_plain_dict, build_checkpoint, tensor_bytes, touch

from ml_playground.checkpoint import AsyncCheckpointSaver, CheckpointManager, KeepPolicy, LocalStore
from ml_playground.checkpoint._async import snapshot
from ml_playground.checkpoint.format import _decode, _digests, _encode

BUCKET = "bench"
OURS_NAME = "ckpt_last_00012345.pt"
Body = Callable[[Phase], dict[str, Any]]


@dataclass
class Context:
    scenario: str
    size_mb: int
    dir: Path
    payload_bytes: int
    endpoint: str | None = None
    held: dict[str, Any] = field(default_factory=dict)  # keeps a load's result alive until measured
    drop_caches_between: bool = False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(*paths: Path) -> Callable[[], None]:
    def cleanup() -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    return cleanup


# ------------------------------------------------------------------ local saves


def _raw_write(ctx: Context, writeback: bool) -> tuple[Body, Callable[[], None]]:
    """The limit: the same number of bytes from prefaulted memory, write + fsync + rename + dir fsync."""
    from ml_playground.checkpoint import FileOps

    buf = np.empty(ctx.payload_bytes, dtype=np.uint8)
    buf[:] = 7
    ops = FileOps()
    final, temp = ctx.dir / "raw.bin", ctx.dir / "raw.bin.tmp"
    piece = 16 << 20

    def body(phase: Phase) -> dict[str, Any]:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view, offset = memoryview(buf), 0
        while offset < len(view):
            written = os.write(fd, view[offset : offset + piece] if writeback else view[offset:])
            if writeback:  # the same early writeback as LocalStore: the limit for its write pattern
                ops.start_writeback(fd, offset, written)
            offset += written
        phase.mark("write")
        os.fsync(fd)
        os.close(fd)
        phase.mark("fsync")
        os.replace(temp, final)
        ops.fsync_dir(ctx.dir)
        return {"payload": ctx.payload_bytes}

    return body, _unlink(final)


def setup_raw_write(ctx: Context) -> tuple[Body, Callable[[], None]]:
    return _raw_write(ctx, writeback=False)


def setup_raw_write_wb(ctx: Context) -> tuple[Body, Callable[[], None]]:
    return _raw_write(ctx, writeback=True)


def setup_torch_save(ctx: Context) -> tuple[Body, Callable[[], None]]:
    obj = as_plain_dict(build_checkpoint(ctx.size_mb))
    final, temp = ctx.dir / "ckpt.pt", ctx.dir / "ckpt.pt.tmp"

    def body(phase: Phase) -> dict[str, Any]:
        torch.save(obj, temp)
        phase.mark("serialize_write")
        _fsync_path(temp)
        phase.mark("fsync")
        os.replace(temp, final)
        _fsync_path(ctx.dir)
        return {"payload": tensor_bytes(obj), "file_bytes": final.stat().st_size}

    return body, _unlink(final)


def setup_ours_save(ctx: Context) -> tuple[Body, Callable[[], None]]:
    """Our save; ``checksum_work_s`` is the hashing the digest thread did (overlapped with the write),
    ``checksum_wait_s`` the time the write waited for it (what the checksums add to the save)."""
    work_s, wait_s = [0.0], [0.0]
    digest, result = _digests.tensor_digest, _encode._DigestThread.result

    def timed_digest(tensor: Any) -> bytes:
        start = time.perf_counter()
        try:
            return digest(tensor)
        finally:
            work_s[0] += time.perf_counter() - start

    def timed_result(self: Any) -> bytes:
        start = time.perf_counter()
        try:
            return result(self)
        finally:
            wait_s[0] += time.perf_counter() - start

    _digests.tensor_digest = timed_digest  # type: ignore[assignment]
    _encode._DigestThread.result = timed_result  # type: ignore[method-assign]
    body, cleanup = _ours_save(ctx)

    def with_checksum_times(phase: Phase) -> dict[str, Any]:
        work_s[0] = wait_s[0] = 0.0
        return {**body(phase), "checksum_s": work_s[0], "checksum_wait_s": wait_s[0]}

    return with_checksum_times, cleanup


def setup_ours_save_nohash(ctx: Context) -> tuple[Body, Callable[[], None]]:
    """Our save with the hashing replaced by a constant: the A/B reference for what checksums cost."""
    _digests.tensor_digest = lambda tensor: bytes(8)  # type: ignore[assignment]
    return _ours_save(ctx, "ours_nohash")


def _ours_save(ctx: Context, directory: str = "ours") -> tuple[Body, Callable[[], None]]:
    checkpoint = build_checkpoint(ctx.size_mb)
    manager = CheckpointManager(LocalStore(ctx.dir / directory, create=True), KeepPolicy(last=1, best=0))
    path = ctx.dir / directory / OURS_NAME

    def body(phase: Phase) -> dict[str, Any]:
        manager.save_last(checkpoint)
        return {"payload": tensor_bytes(checkpoint), "file_bytes": path.stat().st_size}

    return body, _unlink(path)


def setup_snapshot_copy(ctx: Context) -> tuple[Body, Callable[[], None]]:
    checkpoint = build_checkpoint(ctx.size_mb)

    def body(phase: Phase) -> dict[str, Any]:
        # as AsyncCheckpointSaver does: the first snapshot allocates, later ones copy into the previous one
        ctx.held["copy"] = snapshot(checkpoint, into=ctx.held.get("copy"))
        return {"payload": tensor_bytes(checkpoint)}

    return body, lambda: None


def setup_async_save(ctx: Context) -> tuple[Body, Callable[[], None]]:
    checkpoint = build_checkpoint(ctx.size_mb)
    manager = CheckpointManager(LocalStore(ctx.dir / "ours", create=True), KeepPolicy(last=1, best=0))
    saver = AsyncCheckpointSaver(manager)

    def body(phase: Phase) -> dict[str, Any]:
        saver.save_last(checkpoint)
        phase.mark("stall")
        saver.wait()
        phase.mark("background")
        return {"payload": tensor_bytes(checkpoint)}

    return body, _unlink(ctx.dir / "ours" / OURS_NAME)


# ------------------------------------------------------------------ local loads


def _load(ctx: Context, load: Callable[[], Any], touch_after: bool = True) -> tuple[Body, Callable[[], None]]:
    ctx.drop_caches_between = True

    def body(phase: Phase) -> dict[str, Any]:
        obj = load()
        phase.mark("call")
        if touch_after:
            touch(obj)
            phase.mark("touch")
        ctx.held["obj"] = obj
        return {"payload": tensor_bytes(obj)}

    return body, ctx.held.clear


def setup_raw_read(ctx: Context) -> tuple[Body, Callable[[], None]]:
    path = ctx.dir / "raw.bin"

    def read() -> Any:
        size = path.stat().st_size
        buf = np.empty(size, dtype=np.uint8)  # fresh memory, as any loader must allocate
        with open(path, "rb", buffering=0) as handle:
            view, offset = memoryview(buf), 0
            while offset < size:
                offset += handle.readinto(view[offset:])
        return torch.from_numpy(buf)

    return _load(ctx, read, touch_after=False)


def setup_torch_load(ctx: Context) -> tuple[Body, Callable[[], None]]:
    return _load(ctx, lambda: torch.load(ctx.dir / "ckpt.pt", weights_only=True))


def setup_torch_load_mmap(ctx: Context) -> tuple[Body, Callable[[], None]]:
    return _load(ctx, lambda: torch.load(ctx.dir / "ckpt.pt", weights_only=True, mmap=True))


def _ours(ctx: Context) -> CheckpointManager:
    return CheckpointManager(LocalStore(ctx.dir / "ours"))


def setup_ours_load(ctx: Context) -> tuple[Body, Callable[[], None]]:
    manager = _ours(ctx)
    verify_s = [0.0]
    original = _decode.verify_sections

    def timed_verify(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            original(*args, **kwargs)
        finally:
            verify_s[0] += time.perf_counter() - start

    _decode.verify_sections = timed_verify  # type: ignore[assignment]
    body, cleanup = _load(ctx, lambda: (verify_s.__setitem__(0, 0.0), manager.load(OURS_NAME))[1])

    def with_verify_time(phase: Phase) -> dict[str, Any]:
        return {**body(phase), "verify_s": verify_s[0]}

    return with_verify_time, cleanup


def setup_ours_load_mmap(ctx: Context) -> tuple[Body, Callable[[], None]]:
    manager = _ours(ctx)
    return _load(ctx, lambda: manager.load(OURS_NAME, mmap=True, verify=False))


def setup_ours_load_mmap_verified(ctx: Context) -> tuple[Body, Callable[[], None]]:
    manager = _ours(ctx)
    return _load(ctx, lambda: manager.load(OURS_NAME, mmap=True))


# ------------------------------------------------------------------ S3 (moto on loopback)


def _s3fs(ctx: Context) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        skip_instance_cache=True,
        endpoint_url=ctx.endpoint,
        key="testing",
        secret="testing",
        client_kwargs={"region_name": "us-east-1"},
    )


def _s3_manager(ctx: Context, create: bool) -> CheckpointManager:
    from ml_playground.checkpoint import open_store
    from ml_playground.locations import RemoteLocation, StorageOptions

    options = StorageOptions(endpoint_url=ctx.endpoint, region="us-east-1")
    location = RemoteLocation(scheme="s3", root=f"{BUCKET}/ours", storage_options=options)
    return CheckpointManager(open_store(location, create=create), KeepPolicy(last=1, best=0))


def _count_requests(manager: CheckpointManager) -> dict[str, int]:
    """Count the S3 operations the store's client makes, by name (reset it before a phase)."""
    counts: dict[str, int] = {}

    def seen(model: Any, params: Any = None, **_: Any) -> None:
        counts[model.name] = counts.get(model.name, 0) + 1
        ranged = ((params or {}).get("headers") or {}).get("Range") or (params or {}).get("Range")
        if model.name == "GetObject" and isinstance(ranged, str) and ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes=") :].partition("-")
            if first and last:  # bytes fetched by ranged GETs (target 7: evaluation should fetch the model only)
                counts["bytes_fetched"] = counts.get("bytes_fetched", 0) + int(last) - int(first) + 1

    manager.store.filesystem.connect().meta.events.register("before-call.s3", seen)  # type: ignore[attr-defined]
    return counts


def setup_s3_raw_pipe(ctx: Context) -> tuple[Body, Callable[[], None]]:
    fs = _s3fs(ctx)
    data = bytes(ctx.payload_bytes)
    path = f"{BUCKET}/raw/raw.bin"

    def body(phase: Phase) -> dict[str, Any]:
        fs.pipe(path, data)  # s3fs: >= 100 MiB goes multipart, 50 MiB parts, 10 concurrent
        return {"payload": ctx.payload_bytes}

    return body, lambda: fs.rm(path)


def setup_s3_raw_cat(ctx: Context) -> tuple[Body, Callable[[], None]]:
    fs = _s3fs(ctx)

    def body(phase: Phase) -> dict[str, Any]:
        data = fs.cat(f"{BUCKET}/raw/raw.bin")  # s3fs: ranged GETs, 50 MiB blocks, 10 concurrent
        ctx.held["obj"] = data
        return {"payload": len(data)}

    return body, ctx.held.clear


def setup_ours_s3_save(ctx: Context) -> tuple[Body, Callable[[], None]]:
    checkpoint = build_checkpoint(ctx.size_mb)
    manager = _s3_manager(ctx, create=True)
    # As training does: the writer lease held, so a save after the first one lists nothing (target 6).
    # A long ttl keeps heartbeat PutObjects out of the counted phases.
    manager.acquire_writer(ttl=3600)
    counts = _count_requests(manager)

    def body(phase: Phase) -> dict[str, Any]:
        counts.clear()
        manager.save_last(checkpoint)
        return {"payload": tensor_bytes(checkpoint), "requests": dict(counts)}

    return body, lambda: manager.store.delete(OURS_NAME)


def setup_ours_s3_load(ctx: Context) -> tuple[Body, Callable[[], None]]:
    manager = _s3_manager(ctx, create=False)
    counts = _count_requests(manager)
    body, cleanup = _load(ctx, lambda: (counts.clear(), manager.load(OURS_NAME))[1])

    def counted(phase: Phase) -> dict[str, Any]:
        return {**body(phase), "requests": dict(counts)}

    return counted, cleanup


def setup_ours_s3_load_weights(ctx: Context) -> tuple[Body, Callable[[], None]]:
    """``load_weights``: only the model's records are fetched (target 7); bytes counted from the Range headers."""
    manager = _s3_manager(ctx, create=False)
    counts = _count_requests(manager)
    body, cleanup = _load(ctx, lambda: (counts.clear(), manager.load_weights(OURS_NAME))[1])

    def counted(phase: Phase) -> dict[str, Any]:
        return {**body(phase), "requests": dict(counts)}

    return counted, cleanup


SETUPS: dict[str, Callable[[Context], tuple[Body, Callable[[], None]]]] = {
    name[len("setup_") :]: value for name, value in globals().items() if name.startswith("setup_")
}
