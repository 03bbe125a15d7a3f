"""Local loads side by side in one process (issue 6, target 2), each from a cold page cache.

Like ``save_ab.py``: one process, the modes alternated round after round on the same file, so the VM's
drift hits all alike. Before every load the page cache is dropped (``echo 3 > /proc/sys/vm/drop_caches``;
needs root, else the loads are warm and the script says so). Modes:

- ``raw read``: ``readinto`` of the whole file into freshly allocated memory (target 2's limit);
- ``torch.load``: ``torch.load(path, weights_only=True)``, no verification;
- ``ours``: ``decode(path)``: every tensor in memory of its own, every digest verified;
- ``ours, mmap call``: ``decode(path, mmap=True, verify=False)``, the call alone (verification deferred).

    python benchmarks/load_ab.py --size-mb 512 --reps 7 --dir /tmp/ml_playground_ab
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import ab_arguments, print_rounds
from _state import build_checkpoint

from ml_playground.checkpoint import decode, encode

MODES = ("raw read", "torch.load", "ours", "ours, mmap call")


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main() -> None:
    args = ab_arguments(__doc__)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    path = args.dir / "ckpt.pt"
    with path.open("wb") as handle:
        encode(build_checkpoint(args.size_mb), handle)
    size = path.stat().st_size

    def raw_read() -> Any:
        buffer = torch.empty(size, dtype=torch.uint8)
        view = memoryview((ctypes.c_char * size).from_address(buffer.data_ptr())).cast("B")
        with path.open("rb", buffering=0) as handle:
            done = 0
            while done < size:
                done += handle.readinto(view[done:])
        return buffer

    runs: dict[str, Callable[[], Any]] = {
        "raw read": raw_read,
        "torch.load": lambda: torch.load(path, weights_only=True),
        "ours": lambda: decode(path, source=str(path)),
        "ours, mmap call": lambda: decode(path, source=str(path), mmap=True, verify=False),
    }
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cold = True
    try:
        for _ in range(args.reps):
            for mode in MODES:
                cold = drop_caches() and cold
                start = time.perf_counter()
                result = runs[mode]()
                times[mode].append(time.perf_counter() - start)
                del result
                gc.collect()
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{size / 2**20:.0f} MiB file in {args.dir}, {args.reps} rounds, {'cold' if cold else 'WARM'} page cache")
    print_rounds(times)
    for what, pick in (("median", statistics.median), ("min", min)):
        t = {mode: pick(times[mode]) for mode in MODES}
        print(
            f"{what:6s}: 2. raw read / ours {t['raw read'] / t['ours']:.2f} (>= 0.9); "
            f"raw read / torch.load {t['raw read'] / t['torch.load']:.2f}; "
            f"mmap call / ours {t['ours, mmap call'] / t['ours']:.3f} (<= 0.1)"
        )


if __name__ == "__main__":
    main()
