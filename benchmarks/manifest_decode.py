"""Reading a sharded checkpoint's manifest: DCP's metadata as one JSON text (what the writer keeps) against the
same record as nested plain data (what it kept before), alternated in one process.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/sharded_save.py --reps 1 \\
        --modes load --keep /tmp/keep
    python benchmarks/manifest_decode.py /tmp/keep/ours --reps 15

The directory's (first) sharded checkpoint is read as saved, and a copy of its manifest is written with the
``shards.dcp`` record as nested lists and tables (the same encoder, so its digests are valid). Each round times,
in alternating order, for each form: ``decode`` (the weights-only unpickle and the format's checks: plain-data
walks, the structure digest), then turning the record into DCP's ``Metadata`` with every field validated
(``json.loads`` and the validation, or the validation alone). Minimums and medians are printed, with the ratio
nested / JSON; every round checks that both forms give the same metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from torch.distributed.checkpoint.metadata import Metadata

from ml_playground.checkpoint import CheckpointManager, LocalStore, decode, encode
from ml_playground.checkpoint.sharded import _metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a run location holding a sharded checkpoint")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    filename = CheckpointManager(LocalStore(args.directory)).checkpoints()[0].filename
    saved = args.directory / filename
    manifest = decode(saved, source=str(saved))
    if manifest.shards is None or not isinstance(manifest.shards["dcp"], str):
        raise SystemExit(f"{saved} is not a sharded checkpoint's manifest with its DCP metadata as JSON text")
    with tempfile.TemporaryDirectory() as scratch:
        nested = Path(scratch) / filename
        buffer = io.BytesIO()
        shards = {**manifest.shards, "dcp": json.loads(manifest.shards["dcp"])}
        encode(dataclasses.replace(manifest, shards=shards), buffer)
        nested.write_bytes(buffer.getvalue())
        print(f"{saved}: {saved.stat().st_size:,} bytes as saved, {nested.stat().st_size:,} with a nested record")

        def as_json() -> Metadata:
            record = decode(saved, source=str(saved)).shards
            assert record is not None
            return _metadata.from_json(record["dcp"], str(saved))

        def as_nested() -> Metadata:
            record = decode(nested, source=str(nested)).shards
            assert record is not None
            return _metadata._from_plain(record["dcp"], str(nested))

        modes: dict[str, Callable[[], Metadata]] = {"JSON text": as_json, "nested plain data": as_nested}
        times: dict[str, list[float]] = {name: [] for name in modes}
        for rep in range(args.reps):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            results = {}
            for name in order:
                gc.collect()
                start = time.perf_counter()
                results[name] = modes[name]()
                times[name].append(time.perf_counter() - start)
            if results["JSON text"] != results["nested plain data"]:
                raise SystemExit("the two forms of the record gave different metadata")
    for name, values in times.items():
        print(f"  {name:18} min {min(values) * 1e3:7.1f} ms, median {statistics.median(values) * 1e3:7.1f} ms")
    ratio_min = min(times["nested plain data"]) / min(times["JSON text"])
    ratio_median = statistics.median(times["nested plain data"]) / statistics.median(times["JSON text"])
    print(f"  nested / JSON: {ratio_min:.1f} by min, {ratio_median:.1f} by median ({args.reps} rounds)")


if __name__ == "__main__":
    main()
