"""Rank 0's save under DDP against a single process's save of the same state, in one torchrun job (issue 13).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/ddp_save.py --size-mb 64 --reps 7

Alternates, repetition after repetition, on the same synthetic checkpoint (a GPT-shaped model + AdamW state):

- ``single``: rank 0 calls ``CheckpointManager.save_last`` alone, as a single-process run does;
- ``ddp``: the training loop's save: every rank's generator states gathered to rank 0, rank 0 saves, the
  outcome broadcast to every rank (``Ranks.gather`` + ``Ranks.on_main``). Rank 0's time and every other
  rank's stall (from entering the save to learning its outcome) are recorded;
- ``agreement``: the same two collectives around a save that does nothing: their own cost per save; and an
  evaluation point's two broadcasts (the plan, the metric).

Each save goes to a fresh directory (deleting it is outside the timing). Minimums (the undisturbed save)
and medians are printed, with the ratio single / ddp on rank 0 (>= 0.95 is the target) and each rank's
stall / rank 0's save.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _state import build_checkpoint, tensor_bytes

from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, LocalStore
from ml_playground.config import DistributedConfig
from ml_playground.flows.distributed import Ranks
from ml_playground.flows.train_state import rng_keys


def _directory(root: Path, label: str) -> Path:
    path = root / label
    shutil.rmtree(path, ignore_errors=True)
    return path


def _timed(action: object) -> float:
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=64, help="MiB of fp32 params; the checkpoint is ~3x")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ml_playground_ddp_bench"))
    args = parser.parse_args()
    ranks = Ranks.start(DistributedConfig(timeout_s=600), "cpu")
    if not ranks.distributed:
        sys.exit("run me under torchrun: torchrun --standalone --nproc-per-node 2 benchmarks/ddp_save.py")
    checkpoint: Checkpoint | None = build_checkpoint(args.size_mb) if ranks.is_main else None
    randomness = {"torch": torch.get_rng_state(), "data": torch.Generator().manual_seed(ranks.rank).get_state()}
    times: dict[str, list[float]] = {"single": [], "ddp": [], "agreement": [], "evaluation point": []}
    stalls: list[list[float]] = []
    for rep in range(args.reps):
        for mode in ("single", "ddp", "agreement") if rep % 2 == 0 else ("agreement", "ddp", "single"):
            target = _directory(args.dir, f"{mode}-{rep}") if ranks.is_main else args.dir
            manager = CheckpointManager(LocalStore(target, create=True), KeepPolicy(1, 0)) if ranks.is_main else None
            dist.barrier()
            if mode == "single":
                if manager is not None and checkpoint is not None:
                    times[mode].append(_timed(lambda: manager.save_last(checkpoint)))  # noqa: B023
                continue
            start = time.perf_counter()
            gathered = ranks.gather(randomness)
            if mode == "ddp":
                ranks.on_main(lambda: manager.save_last(_with(checkpoint, gathered)))  # type: ignore[union-attr]  # noqa: B023
            else:
                ranks.on_main(lambda: None)
            elapsed = time.perf_counter() - start
            every = [0.0] * ranks.world_size
            dist.all_gather_object(every, elapsed)
            if ranks.is_main:
                times[mode].append(every[0])
                if mode == "ddp":
                    stalls.append(every[1:])
        dist.barrier()
        start = time.perf_counter()
        ranks.decide(ranks.observed((True, True)))
        ranks.decide(ranks.observed(1.2345))
        times["evaluation point"].append(time.perf_counter() - start)
    if ranks.is_main and checkpoint is not None:
        size = tensor_bytes(checkpoint) / 2**20
        print(f"world size {ranks.world_size}, checkpoint tensors {size:.0f} MiB, {args.reps} rounds, modes alternated")
        for mode, seconds in times.items():
            print(f"{mode:17s} min {min(seconds):.4f} s, median {statistics.median(seconds):.4f} s")
        single, ddp = min(times["single"]), min(times["ddp"])
        print(
            f"single / ddp on rank 0: {single / ddp:.3f} by min, "
            f"{statistics.median(times['single']) / statistics.median(times['ddp']):.3f} by median"
        )
        for other in range(ranks.world_size - 1):
            ratios = [stall[other] / own for stall, own in zip(stalls, times["ddp"], strict=True)]
            print(
                f"rank {other + 1} stall / rank 0's save: max {max(ratios):.3f}, median {statistics.median(ratios):.3f}"
            )
        per_save = min(times["agreement"])
        print(
            f"agreement per save (gather + outcome broadcast): {per_save * 1000:.2f} ms min; "
            f"per evaluation point (2 broadcasts): {min(times['evaluation point']) * 1000:.2f} ms min"
        )
    if ranks.is_main:
        shutil.rmtree(args.dir, ignore_errors=True)
    ranks.close()


def _with(checkpoint: Checkpoint | None, gathered: list[dict[str, torch.Tensor]] | None) -> Checkpoint:
    """The checkpoint with every rank's generator states, as the training loop saves it."""
    assert checkpoint is not None
    assert gathered is not None
    rng = dict(checkpoint.rng_state)
    for rank, states in enumerate(gathered):
        torch_key, data_key = rng_keys(rank)
        rng[torch_key], rng[data_key] = states["torch"], states["data"]
    return dataclasses.replace(checkpoint, rng_state=rng, world_size=len(gathered))


if __name__ == "__main__":
    main()
