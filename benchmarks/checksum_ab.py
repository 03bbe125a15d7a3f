"""What the checksums cost a save (issue 6, target 8), as an A/B in one process.

Saves the benchmark's synthetic checkpoint repeatedly with the real digests ("hashed"), with the hashing
replaced by a constant ("no hashing"), and with the digests computed in a pass before the write as format
version 1 did ("hashed first"), alternating the three so the machine's drift hits all alike. Run it on a
tmpfs (the default, /dev/shm) to see the CPU and memory cost without disk noise, or on a disk directory:

    python benchmarks/checksum_ab.py --size-mb 512 --reps 7 --dir /dev/shm/ml_playground_ab
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _state import build_checkpoint

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore, _digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=512, help="MiB of fp32 params; the checkpoint is ~3x")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/ml_playground_ab"))
    args = parser.parse_args()
    checkpoint = build_checkpoint(args.size_mb)
    real = _digests.tensor_digest
    sections = {"model": checkpoint.model, "optimizer": checkpoint.optimizer}
    times: dict[str, list[float]] = {"hashed": [], "no hashing": [], "hashed first": []}
    try:
        for _ in range(args.reps):
            for mode, seconds in times.items():
                shutil.rmtree(args.dir, ignore_errors=True)
                manager = CheckpointManager(LocalStore(args.dir, create=True), KeepPolicy(last=1, best=0))
                _digests.tensor_digest = real if mode == "hashed" else (lambda tensor: bytes(8))  # type: ignore[assignment]
                start = time.perf_counter()
                if mode == "hashed first":
                    for _, _, tensor in _digests.tensors(sections):
                        real(tensor)
                manager.save_last(checkpoint)
                seconds.append(time.perf_counter() - start)
    finally:
        _digests.tensor_digest = real  # type: ignore[assignment]
        shutil.rmtree(args.dir, ignore_errors=True)
    # the minimum is the undisturbed save: on a noisy VM it is the steadier estimate of a fixed cost
    base_median, base_min = statistics.median(times["no hashing"]), min(times["no hashing"])
    print(f"{args.size_mb} MB of params into {args.dir}, {args.reps} alternating repetitions")
    for mode, seconds in times.items():
        median, fastest = statistics.median(seconds), min(seconds)
        print(
            f"{mode:13s} median {median:.3f} s ({(median - base_median) / median:+.1%}), "
            f"min {fastest:.3f} s ({(fastest - base_min) / fastest:+.1%}) vs no hashing;  "
            + " ".join(f"{s:.2f}" for s in seconds)
        )


if __name__ == "__main__":
    main()
