"""Sharded (FSDP2) checkpoints against torch.distributed.checkpoint's own writers and reader, side by side (issue 14).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/sharded_save.py --reps 5 \\
        --modes local,load,s3 --keep /tmp/sharded_keep
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 1 benchmarks/sharded_save.py --reps 5 \\
        --modes load --from /tmp/sharded_keep        # the same checkpoints loaded at another world size

One torchrun job, one process per rank (gloo on CPU), the same sharded state (a GPT-shaped model and AdamW,
``benchmarks/_fsdp_state.py``), modes alternated round after round (the order reversed every other round):

- ``local``: ``ours`` = the training flow's synchronous sharded save (rank 0's ``prepare_save``, every rank's
  parts through ``checkpoint.sharded.save`` into a ``LocalStore``: xxh3 digests, fsync, atomic commit, then
  the manifest; rank 0's ``committed``) against ``dcp`` = ``dcp.save`` with ``FileSystemWriter`` (its defaults:
  one file per rank, fsync) into a directory of the same file system;
- ``s3``: the same two into a moto server this script starts on 127.0.0.1: ``ours`` through ``S3Store``
  (multipart uploads, ``part_size_mib`` x ``max_concurrency`` in flight), ``dcp`` through ``FsspecWriter``
  (s3fs);
- ``load``: ``ours`` = the manifest read and validated (its ``ShardIndex``) and ``checkpoint.sharded.load_into``
  (every item verified against its digest; ``ours, manifest read before``: the same with the manifest read and
  validated before the timing) against
  ``dcp`` = ``dcp.load`` with ``FileSystemReader`` (unverified, its metadata read inside), into the same (zeroed)
  tensors, from checkpoints saved once before the rounds (or by an earlier run: ``--from``, possibly at another
  world size). ``--cache cold`` (default) evicts the checkpoints' files from the page cache before every load
  (``posix_fadvise(DONTNEED)`` on those files only: nothing else on the machine is touched).

A round's time is the slowest rank's, from a barrier to its return; each rank's peak RSS above its RSS at the
start (VmHWM reset through /proc/self/clear_refs, after ``malloc_trim(0)`` gave the memory freed earlier back to
the OS, so that reusing it counts as growth) is recorded too. Minimums (what the code can do) and medians
are printed, with the ratios ours / dcp. Each save goes to a fresh directory (or prefix); deleting the previous
one is outside the timing. Every load is checked against the saved values.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fsdp_state
from _measure import proc_status, reset_peak
from bench import Moto

from ml_playground.checkpoint import Checkpoint, CheckpointKind, CheckpointManager, LocalStore, open_store, sharded
from ml_playground.locations import RemoteLocation, StorageOptions

MIB = 2**20
_LIBC = ctypes.CDLL("libc.so.6")
BUCKET = "sharded-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="local,load", help="any of local, s3, load (comma-separated)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--s3-n-layer", type=int, default=2, help="S3 state: fewer layers (moto holds 4-5x a part)")
    parser.add_argument("--s3-part-mib", type=int, default=8, help="the second S3 mode's part size")
    parser.add_argument("--s3-in-flight", type=int, default=2, help="the second S3 mode's parts in flight")
    parser.add_argument("--s3-modes", default="ours,bounded,dcp", help="which S3 modes, in round 0's order")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ml_playground_sharded_bench"))
    parser.add_argument("--keep", type=Path, help="keep the checkpoints the loads read here (for --from)")
    parser.add_argument("--from", dest="source", type=Path, help="load the checkpoints an earlier run kept here")
    parser.add_argument("--json", type=Path, help="write every measurement here (rank 0)")
    return parser.parse_args()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        dist.init_process_group("gloo")
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.results: dict[str, Any] = {"world_size": self.world, "loadavg_start": os.getloadavg()}

    # ---------------------------------------------------------------- measuring
    def timed(self, action: Callable[[], object]) -> tuple[float, list[float]]:
        """The slowest rank's time for ``action`` (every rank runs it) and every rank's peak RSS growth (MiB)."""
        gc.collect()
        _LIBC.malloc_trim(0)  # memory freed earlier goes back to the OS: reusing it shows as growth
        dist.barrier()
        base = proc_status()["VmRSS"]
        reset_peak()
        start = time.perf_counter()
        action()
        elapsed = time.perf_counter() - start
        peak = proc_status()["VmHWM"] - base
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, (elapsed, peak))
        return max(t for t, _ in every), [p for _, p in every]

    def alternate(
        self,
        group: str,
        modes: dict[str, Callable[[int], Callable[[], object]]],
        check: Callable[[str], None] | None = None,
    ) -> None:
        """``modes[name](rep)`` prepares a round (untimed) and returns the timed action; ``check(name)`` runs
        after it (untimed)."""
        times: dict[str, list[float]] = {name: [] for name in modes}
        peaks: dict[str, list[list[float]]] = {name: [] for name in modes}
        for rep in range(self.args.reps):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for name in order:
                action = modes[name](rep)
                seconds, peak = self.timed(action)
                if check is not None:
                    check(name)
                times[name].append(seconds)
                peaks[name].append(peak)
        self.results[group] = {"times": times, "peaks_mib": peaks, "loadavg": os.getloadavg()}

    def decide(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def fresh(self, path: Path) -> Path:
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        return path

    # ---------------------------------------------------------------- saves
    def ours_save(self, store: Any, iter_num: int, state: dict[str, Any]) -> Callable[[], object]:
        manager = CheckpointManager(store) if self.rank == 0 else None

        def save() -> None:
            meta = None
            name = None
            if manager is not None:
                meta = Checkpoint(
                    model={},
                    optimizer={},
                    model_args=self.cfg,
                    iter_num=iter_num,
                    best_val_loss=1.0,
                    world_size=self.world,
                )
                name = manager.prepare_save(CheckpointKind.LAST, meta)
                assert name is not None
            filename = self.decide(None if name is None else name.filename)
            factory = None if meta is None else (lambda record: dataclasses.replace(meta, shards=record))
            parts = sharded.save(store, filename, state, manifest=factory)
            if manager is not None and name is not None:
                manager.committed(name, parts)

        return save

    def local(self, state: dict[str, Any]) -> None:
        root = self.args.dir / "local"

        def ours(rep: int) -> Callable[[], object]:
            self.fresh(root)
            return self.ours_save(LocalStore(root / f"ours-{rep}", create=True), rep + 1, state)

        def theirs(rep: int) -> Callable[[], object]:
            target = self.fresh(root) / f"dcp-{rep}"
            return lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(str(target)))

        self.alternate("local", {"ours": ours, "dcp": theirs})
        self.fresh(root)

    def s3(self, state: dict[str, Any]) -> None:
        os.environ.update(CREDENTIALS)
        moto = Moto(self.args.dir / "moto", bucket=BUCKET) if self.rank == 0 else None
        endpoint = self.decide(moto.endpoint if moto else None)
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        options["client_kwargs"] = {"region_name": "us-east-1"}
        admin = _admin(endpoint) if self.rank == 0 else None

        def clear() -> None:
            if admin is not None:
                _empty(admin)
            dist.barrier()

        def ours_with(**chosen: int) -> Callable[[int], Callable[[], object]]:
            def ours(rep: int) -> Callable[[], object]:
                clear()
                tag = "-".join(map(str, chosen.values()))
                options = StorageOptions(endpoint_url=endpoint, **chosen)  # type: ignore[arg-type]
                location = RemoteLocation(scheme="s3", root=f"{BUCKET}/ours{tag}-{rep}", storage_options=options)
                return self.ours_save(open_store(location, create=True), rep + 1, state)

            return ours

        def theirs(rep: int) -> Callable[[], object]:
            clear()
            url = f"s3://{BUCKET}/dcp-{rep}"
            return lambda: dcp.save(state, storage_writer=FsspecWriter(url, **options))

        try:
            small = {"part_size_mib": self.args.s3_part_mib, "max_concurrency": self.args.s3_in_flight}
            bounded = f"ours, {small['part_size_mib']} MiB x {small['max_concurrency']}"
            every = {"ours": ours_with(), bounded: ours_with(**small), "dcp": theirs}
            chosen = {"ours": "ours", "bounded": bounded, "dcp": "dcp"}
            wanted = [chosen[m] for m in self.args.s3_modes.split(",")]
            self.alternate("s3", {name: every[name] for name in wanted})
            clear()
        finally:
            if moto is not None:
                moto.stop()

    # ---------------------------------------------------------------- loads
    def load(self, state: dict[str, Any]) -> None:
        source = self.args.source or self.args.keep or self.args.dir / "keep"
        if self.args.source is None:  # save one checkpoint of each kind to load, untimed
            self.fresh(source)
            self.ours_save(LocalStore(source / "ours", create=True), 1, state)()
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(source / "dcp")))
        expected = _fsdp_state.fingerprint(state)
        store = LocalStore(source / "ours")
        filename = self.decide(CheckpointManager(store).checkpoints()[0].filename if self.rank == 0 else None)
        manager = CheckpointManager(store)
        saved_at = self.decide(manager.load_manifest(filename).world_size if self.rank == 0 else None)
        self.results["load_saved_at"] = saved_at

        def prepared(action: Callable[[], object]) -> Callable[[], object]:
            _fsdp_state.zero(state)
            if self.args.cache == "cold" and self.rank == 0:
                _evict(source)
            dist.barrier()
            return action

        def index_of(manifest: Checkpoint) -> sharded.ShardIndex:  # what the training flow's resume reads
            return sharded.ShardIndex.of(manifest.shards, filename, f"{store.url}/{filename}")

        def ours(rep: int) -> Callable[[], object]:
            return prepared(
                lambda: sharded.load_into(store, filename, index_of(manager.load_manifest(filename)), state)
            )

        def given(rep: int) -> Callable[[], object]:  # the manifest read (and decoded) before, untimed
            index = index_of(manager.load_manifest(filename))
            return prepared(lambda: sharded.load_into(store, filename, index, state))

        def theirs(rep: int) -> Callable[[], object]:
            return prepared(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(str(source / "dcp"))))

        def check(name: str) -> None:
            if not _fsdp_state.same(_fsdp_state.fingerprint(state), expected):
                raise SystemExit(f"rank {self.rank}: the {name} load did not restore the saved values")

        self.alternate("load", {"ours": ours, "ours, manifest read before": given, "dcp": theirs}, check)
        if self.args.source is None and self.args.keep is None:
            self.fresh(source)

    # ---------------------------------------------------------------- running
    def run(self) -> None:
        args = self.args
        modes = args.modes.split(",")
        if any(m in modes for m in ("local", "load")):
            self.cfg = _fsdp_state.shape(args.n_layer, args.n_embd, args.vocab)
            model, optimizer = _fsdp_state.build(self.cfg, self.world)
            state = _fsdp_state.state(model, optimizer)
            self.describe("state", state)
            if "local" in modes:
                self.local(state)
            if "load" in modes:
                self.load(state)
            del model, optimizer, state
        if "s3" in modes:
            self.cfg = _fsdp_state.shape(args.s3_n_layer, args.n_embd, args.vocab)
            model, optimizer = _fsdp_state.build(self.cfg, self.world)
            state = _fsdp_state.state(model, optimizer)
            self.describe("s3_state", state)
            self.s3(state)
        self.results["loadavg_end"] = os.getloadavg()
        if self.rank == 0:
            _report(self.results)
            if args.json:
                args.json.write_text(json.dumps(self.results, indent=1))
        dist.barrier()
        dist.destroy_process_group()

    def describe(self, key: str, state: dict[str, Any]) -> None:
        mine = (_fsdp_state.shard_bytes(state), _fsdp_state.largest_tensor_bytes(state))
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine)
        self.results[key] = {"shape": self.cfg, "shard_bytes": [s for s, _ in every], "largest": [x for _, x in every]}


def _evict(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _admin(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )  # fmt: skip


def _empty(admin: Any) -> None:
    for upload in admin.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
        admin.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            admin.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def _report(results: dict[str, Any]) -> None:
    print(f"world size {results['world_size']}, load average at start {results['loadavg_start']}")
    for key in ("state", "s3_state"):
        if key in results:
            info = results[key]
            shards = ", ".join(f"{s / MIB:.1f}" for s in info["shard_bytes"])
            largest = max(x / s for x, s in zip(info["largest"], info["shard_bytes"], strict=True))
            print(f"{key}: {info['shape']}; shard per rank {shards} MiB; largest tensor {largest:.1%} of a shard")
    for group in ("local", "s3", "load"):
        if group not in results:
            continue
        data = results[group]
        shard = results["s3_state" if group == "s3" else "state"]["shard_bytes"]
        print(f"\n{group} (load average after: {data['loadavg']})")
        for mode, seconds in data["times"].items():
            peaks = data["peaks_mib"][mode]
            per_rank = [max(p[r] for p in peaks) for r in range(len(shard))]
            share = ", ".join(f"{p:.1f} MiB ({p * MIB / s:.1%})" for p, s in zip(per_rank, shard, strict=True))
            print(
                f"  {mode:27s} min {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s;  "
                + " ".join(f"{s:.2f}" for s in seconds)
            )
            print(f"  {'':27s} peak RSS growth per rank, max over rounds: {share}")
        theirs = data["times"].get("dcp")
        for mode, ours in data["times"].items():
            if mode != "dcp" and theirs is not None:
                print(
                    f"  {mode} / dcp: {min(ours) / min(theirs):.3f} by min, "
                    f"{statistics.median(ours) / statistics.median(theirs):.3f} by median"
                )
    if "load_saved_at" in results:
        print(f"\nloads read checkpoints saved at world size {results['load_saved_at']}")


if __name__ == "__main__":
    Bench(_arguments()).run()
