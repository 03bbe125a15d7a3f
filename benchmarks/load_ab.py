"""Local loads side by side in one process (issue 16; issue 6's target 2): an A/B that drift hits alike.

Like ``save_ab.py``: one process, the modes alternated round after round on the same file, so the VM's
drift hits all alike; each round runs them in a new (seeded) random order. A load's time depends mostly on
how much of its memory is fresh (page faults: zeroed pages, the VM memory effect) rather than reused from
memory the allocator kept from the previous load, which depends on the mode before it: the script prints
each load's page faults, and the order changes so that no mode always follows the same one. With
``--heap trim`` (the default) every load starts after ``malloc_trim(0)`` has handed the allocator's free
memory back to the kernel, so every load gets fresh memory, as a load in a fresh process does (``sample``,
``eval``, a resume); ``--heap keep`` leaves it, and which mode reuses how much is then luck.

``--cache warm`` (the default) reads the file once before the first round and never drops it: every load
finds its bytes in the page cache (a resume right after a save, ``sample`` on the training machine).
``--cache cold`` drops the page cache before every load (``echo 3 > /proc/sys/vm/drop_caches``; needs
root, else the loads are warm and the script says so). Modes:

- ``raw read``: ``readinto`` of the whole file into freshly allocated memory (issue 6's limit);
- ``raw read, reused``: the same into one buffer kept across rounds (the limit for cached bytes);
- ``torch.load``: ``torch.load(path, weights_only=True)``, no verification;
- ``ours``: ``decode(path)``: every tensor in memory of its own, every digest verified;
- ``torch.load, drop optimizer``: ``torch.load`` then ``del`` of the optimizer state (what a weights-only
  load replaces), no verification;
- ``ours, weights``: ``CheckpointManager.load_weights``: the model (and EMA) read, their digests verified;
- ``ours, mmap call``: ``decode(path, mmap=True, verify=False)``, the call alone (verification deferred).

Each mode's peak memory is its VmHWM over the RSS at its start (reset through ``/proc/self/clear_refs``);
in one process glibc keeps memory freed by earlier rounds, so these read low (``test_memory_bounds`` and
``bench.py``'s ``first`` mode measure peaks in fresh processes).

    python benchmarks/load_ab.py --size-mb 128 --reps 9 --cache warm   # a 384 MiB checkpoint
    python benchmarks/load_ab.py --size-mb 512 --reps 7 --cache cold   # 1.5 GiB
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import ab_arguments, drop_caches, print_rounds, proc_status, reset_peak
from _state import build_checkpoint, tensor_bytes

from ml_playground.checkpoint import CheckpointManager, LocalStore, decode, encode

MODES = (
    "raw read",
    "raw read, reused",
    "torch.load",
    "ours",
    "torch.load, drop optimizer",
    "ours, weights",
    "ours, mmap call",
)
NAME = "ckpt_last_00012345.pt"


def _read_into(path: Path, buffer: torch.Tensor) -> torch.Tensor:
    size = buffer.numel()
    view = memoryview((ctypes.c_char * size).from_address(buffer.data_ptr())).cast("B")
    with path.open("rb", buffering=0) as handle:
        done = 0
        while done < size:
            done += handle.readinto(view[done:])
    return buffer


def _torch_load_drop_optimizer(path: Path) -> Any:
    payload = torch.load(path, weights_only=True)
    del payload["optimizer"]
    return payload


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), from /proc/stat and getrusage."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def main() -> None:
    args = ab_arguments(__doc__, cache=True)
    trim = ctypes.CDLL(None).malloc_trim if args.heap == "trim" else None  # glibc
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    path = args.dir / NAME
    checkpoint = build_checkpoint(args.size_mb)
    tensors = tensor_bytes(checkpoint)
    with path.open("wb") as handle:
        encode(checkpoint, handle)
    del checkpoint
    size = path.stat().st_size
    manager = CheckpointManager(LocalStore(args.dir))
    reused = torch.empty(size, dtype=torch.uint8)
    runs: dict[str, Callable[[], Any]] = {
        "raw read": lambda: _read_into(path, torch.empty(size, dtype=torch.uint8)),
        "raw read, reused": lambda: _read_into(path, reused),
        "torch.load": lambda: torch.load(path, weights_only=True),
        "ours": lambda: decode(path, source=str(path)),
        "torch.load, drop optimizer": lambda: _torch_load_drop_optimizer(path),
        "ours, weights": lambda: manager.load_weights(NAME),
        "ours, mmap call": lambda: decode(path, source=str(path), mmap=True, verify=False),
    }
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    peaks: dict[str, list[float]] = {mode: [] for mode in MODES}
    faults: dict[str, list[int]] = {mode: [] for mode in MODES}
    cold = args.cache == "cold"
    _read_into(path, reused)  # warm: the file is in the page cache from here on
    busy, own = _cpu_seconds()
    began = time.perf_counter()
    try:
        for round_index in range(args.reps):
            order = list(MODES)
            random.Random(round_index).shuffle(order)  # no mode always inherits the same predecessor's heap
            for mode in order:
                if args.cache == "cold":
                    cold = drop_caches() and cold
                gc.collect()
                if trim is not None:
                    trim(0)
                base = proc_status()["VmRSS"]
                reset_peak()
                faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                result = runs[mode]()
                times[mode].append(time.perf_counter() - start)
                faults[mode].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
                peaks[mode].append(proc_status()["VmHWM"] - base)
                del result
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    busy_end, own_end = _cpu_seconds()
    others = max(0.0, (busy_end - busy) - (own_end - own)) / (time.perf_counter() - began)
    regime = "cold" if cold else "WARM (could not drop caches)" if args.cache == "cold" else "warm"
    heap = "fresh memory for every load (malloc_trim)" if trim is not None else "the allocator's free memory kept"
    print(
        f"{size / 2**20:.0f} MiB file ({tensors / 2**20:.0f} MiB of tensors) in {args.dir}, {args.reps} rounds, "
        f"{regime} page cache, {heap}"
    )
    print(f"other processes kept {others:.2f} of the machine's {os.cpu_count()} cores busy during the rounds")
    print_rounds(times)
    print("page faults per round, thousands (fresh pages; the rest was memory the allocator reused):")
    for mode in MODES:
        print(f"  {mode:27s}" + " ".join(f"{count / 1000:4.0f}" for count in faults[mode]))
    print("peak over start, max of rounds (MiB): " + "; ".join(f"{m} {max(peaks[m]):.0f}" for m in MODES))
    for what, pick in (("median", statistics.median), ("min", min)):
        t = {mode: pick(times[mode]) for mode in MODES}
        print(
            f"{what:6s}: torch.load / ours {t['torch.load'] / t['ours']:.2f} (>= 1.0); "
            f"torch.load+drop / ours weights {t['torch.load, drop optimizer'] / t['ours, weights']:.2f} (>= 1.0); "
            f"raw read / ours {t['raw read'] / t['ours']:.2f}; raw read, reused / ours "
            f"{t['raw read, reused'] / t['ours']:.2f}; mmap call / ours {t['ours, mmap call'] / t['ours']:.3f}"
        )
    print(f"ours: peak over start {max(peaks['ours']) / (tensors / 2**20):.3f}x the tensor bytes (<= 1.05)")


if __name__ == "__main__":
    main()
