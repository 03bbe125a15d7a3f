"""Local saves side by side in one process (issue 6, targets 1 and 8): an A/B that drift hits alike.

``bench.py`` runs every phase in a process of its own, which is what honest peak memory needs, but on a
VM whose fresh memory is slow the phases' times then wander by 2-5x. This script keeps one process and
alternates, repetition after repetition, on the same synthetic checkpoint (the same bytes):

- ``raw write``: the checkpoint's tensor bytes from prefaulted memory, one ``write``, fsync, rename,
  directory fsync (the limit of target 1);
- ``torch.save``: of the same tensors to a temporary name, fsync, rename, directory fsync;
- ``ours``: ``CheckpointManager.save_last`` on a ``LocalStore`` (digests hashed during the write);
- ``ours, no hashing``: the same with the hashing replaced by a constant (target 8's reference);
- ``ours, hashed first``: the digests computed in a pass before the write, as format version 1 did.

Each save goes to a fresh directory; deleting the previous one is outside the timing. Medians and
minimums (the undisturbed save) are printed with the ratios the targets name.

    python benchmarks/save_ab.py --size-mb 512 --reps 7 --dir /tmp/ml_playground_ab   # a disk
    python benchmarks/save_ab.py --size-mb 512 --reps 7 --dir /dev/shm/ml_playground_ab   # tmpfs: no disk noise
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import ab_arguments, print_rounds
from _scenarios import _fsync_path
from _state import as_plain_dict, build_checkpoint, tensor_bytes

from ml_playground.checkpoint import CheckpointManager, FileOps, KeepPolicy, LocalStore
from ml_playground.checkpoint.format import _digests

MODES = ("raw write", "torch.save", "ours", "ours, no hashing", "ours, hashed first")


def main() -> None:
    args = ab_arguments(__doc__)
    checkpoint = build_checkpoint(args.size_mb)
    plain = as_plain_dict(checkpoint)
    raw = np.full(tensor_bytes(plain), 7, dtype=np.uint8)
    real = _digests.tensor_digest
    sections = {"model": checkpoint.model, "optimizer": checkpoint.optimizer}

    def raw_write(directory: Path) -> None:
        temp = directory / "raw.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        view, offset = memoryview(raw), 0
        while offset < len(view):
            offset += os.write(fd, view[offset:])
        os.fsync(fd)
        os.close(fd)
        os.replace(temp, directory / "raw.bin")
        FileOps().fsync_dir(directory)

    def torch_save(directory: Path) -> None:
        temp = directory / "ckpt.tmp"
        torch.save(plain, temp)
        _fsync_path(temp)
        os.replace(temp, directory / "ckpt.pt")
        FileOps().fsync_dir(directory)

    def ours(directory: Path, hashing: str) -> None:
        manager = CheckpointManager(LocalStore(directory), KeepPolicy(last=1, best=0))
        if hashing == "first":
            for _, _, tensor in _digests.tensors(sections):
                real(tensor)
        _digests.tensor_digest = real if hashing == "during" else (lambda tensor: bytes(8))  # type: ignore[assignment]
        try:
            manager.save_last(checkpoint)
        finally:
            _digests.tensor_digest = real  # type: ignore[assignment]

    runs: dict[str, Callable[[Path], None]] = {
        "raw write": raw_write,
        "torch.save": torch_save,
        "ours": lambda directory: ours(directory, "during"),
        "ours, no hashing": lambda directory: ours(directory, "none"),
        "ours, hashed first": lambda directory: ours(directory, "first"),
    }
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for _ in range(args.reps):
            for mode in MODES:
                shutil.rmtree(args.dir, ignore_errors=True)
                args.dir.mkdir(parents=True)
                start = time.perf_counter()
                runs[mode](args.dir)
                times[mode].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{args.size_mb} MB of params ({raw.nbytes / 2**20:.0f} MiB of tensors) into {args.dir}, {args.reps} rounds")
    print_rounds(times)
    for what in ("median", "min"):
        pick = statistics.median if what == "median" else min
        t = {mode: pick(times[mode]) for mode in MODES}
        print(
            f"{what:6s}: 1. raw write / ours {t['raw write'] / t['ours']:.2f} (>= 0.85); "
            f"torch.save {t['raw write'] / t['torch.save']:.2f}; "
            f"8. (ours - no hashing) / ours {(t['ours'] - t['ours, no hashing']) / t['ours']:+.1%} (<= 5%); "
            f"hashed first {(t['ours, hashed first'] - t['ours, no hashing']) / t['ours, hashed first']:+.1%}"
        )


if __name__ == "__main__":
    main()
