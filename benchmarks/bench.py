#!/usr/bin/env python3
"""Benchmark: our checkpoint store against the baselines and physical limits, on the same bytes, in one run.

    python benchmarks/bench.py --sizes 64,512 --reps 3 --out bench.json       (= the `run` command)
    python benchmarks/bench.py report bench.json                               (tables + target ratios)
    tox -e bench -- --sizes 64 --reps 1

Every phase (one save or one load) runs in its own process (``worker``), so peak RSS is the phase's own:
VmHWM is reset through /proc/self/clear_refs at the phase's start and read at its end. Saves are durable
(fsync of file and directory inside the phase); loads read from a cold disk (page cache dropped, needs
root) and then touch every page of every tensor, so lazy loads pay their I/O inside the phase. S3
scenarios run against a ``moto_server`` this script starts on 127.0.0.1. Read docs/performance.md for
the method and for why ``hot`` is the memory mode to compare (this VM's balloon makes first touches slow).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MIB = 2**20
sys.path.insert(0, str(HERE))

# group -> (needs moto, [(save scenario, [load scenarios reading what it wrote])])
GROUPS: dict[str, tuple[bool, list[tuple[str, list[str]]]]] = {
    "raw": (False, [("raw_write", ["raw_read"])]),
    "raw_wb": (False, [("raw_write_wb", [])]),
    "torch": (False, [("torch_save", ["torch_load", "torch_load_mmap"])]),
    "ours": (
        False,
        [("ours_save", ["ours_load", "ours_load_mmap", "ours_load_mmap_verified"]), ("ours_save_nohash", [])],
    ),
    "async": (False, [("snapshot_copy", []), ("async_save", [])]),
    "s3_raw": (True, [("s3_raw_pipe", ["s3_raw_cat"])]),
    "s3_ours": (True, [("ours_s3_save", ["ours_s3_load", "ours_s3_load_weights"])]),
}
ORDER = [
    "raw_write", "raw_write_wb", "torch_save", "ours_save", "ours_save_nohash", "snapshot_copy", "async_save",
    "raw_read", "torch_load", "torch_load_mmap", "ours_load", "ours_load_mmap", "ours_load_mmap_verified",
    "s3_raw_pipe", "ours_s3_save", "s3_raw_cat", "ours_s3_load", "ours_s3_load_weights",
]  # fmt: skip
CHILD_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "PYTHONWARNINGS": "ignore",
}


def fsspec_store_available() -> bool:
    return importlib.util.find_spec("ml_playground.checkpoint.stores._fsspec") is not None


def payload_bytes(size_mb: int) -> int:
    """Tensor bytes of the synthetic checkpoint (params + exp_avg + exp_avg_sq + a 4-byte step per param)."""
    from _state import gpt_config

    cfg = gpt_config(size_mb)
    d, vocab, block, layers = cfg["n_embd"], cfg["vocab_size"], cfg["block_size"], cfg["n_layer"]
    n_params = 2 * vocab * d + block * d + 2 * d + layers * (12 * d * d + 13 * d)
    return 3 * 4 * n_params + 4 * (5 + layers * 12)


# ------------------------------------------------------------------ worker


def worker(args: argparse.Namespace) -> None:
    from _measure import Phase, drop_caches
    from _scenarios import SETUPS, Context

    ctx = Context(args.scenario, args.size_mb, Path(args.dir), args.payload_bytes, args.endpoint)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    body, cleanup = SETUPS[args.scenario](ctx)
    result: dict[str, Any] = {
        "scenario": args.scenario,
        "size_mb": args.size_mb,
        "setup_s": time.perf_counter() - started,
    }
    iterations = {}
    for index, mode in enumerate(args.modes.split(",")):
        if index > 0:  # free what the previous iteration produced, so 'hot' reuses just-freed memory
            cleanup()
            gc.collect()
            if ctx.drop_caches_between:
                result["dropped_caches"] = drop_caches()
        with warnings.catch_warnings(), Phase(args.server_pid) as phase:
            warnings.simplefilter("ignore")
            extra = body(phase)
        iterations[mode] = {**phase.result(), **extra}
    result["iters"] = iterations
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ orchestrator


class Moto:
    """A moto_server on 127.0.0.1 with one bucket; its TMPDIR (spilled objects) under ``tmpdir``."""

    def __init__(self, tmpdir: Path, bucket: str = "bench") -> None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        binary = str(Path(sys.executable).parent / "moto_server")
        env = dict(os.environ, TMPDIR=str(tmpdir), **CHILD_ENV)
        self.process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        import boto3

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1",
        )  # fmt: skip
        client.create_bucket(Bucket=bucket)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_worker(
    scenario: str, size_mb: int, workdir: Path, args: argparse.Namespace, moto: Moto | None
) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "worker", "--scenario", scenario, "--size-mb", str(size_mb),
        "--dir", str(workdir), "--payload-bytes", str(payload_bytes(size_mb)), "--modes", args.modes,
    ]  # fmt: skip
    if moto is not None:
        cmd += ["--endpoint", moto.endpoint, "--server-pid", str(moto.process.pid)]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=dict(os.environ, **CHILD_ENV)
        )
    except subprocess.TimeoutExpired:
        return {"scenario": scenario, "size_mb": size_mb, "ok": False, "error": f"timeout after {args.timeout}s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            result.update(ok=True, proc_wall_s=time.perf_counter() - started)
            return result
    tail = done.stderr.strip().splitlines()[-3:]
    return {"scenario": scenario, "size_mb": size_mb, "ok": False, "error": f"rc={done.returncode}: {tail}"}


def orchestrate(args: argparse.Namespace) -> None:
    from _measure import drop_caches

    data = Path(args.data)
    sizes = [int(s) for s in args.sizes.split(",")]
    s3_sizes = {int(s) for s in args.s3_sizes.split(",") if s}
    groups = list(GROUPS) if args.groups == "all" else args.groups.split(",")
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv, "python": sys.version.split()[0],
        "nproc": os.cpu_count(), "modes": args.modes, "skipped": [],
    }  # fmt: skip
    import torch

    meta["torch"] = torch.__version__
    if "s3_ours" in groups and not fsspec_store_available():
        message = "S3 store (ml_playground.checkpoint.stores._fsspec) is not in this checkout: s3_ours skipped"
        print(message, flush=True)
        meta["skipped"].append(message)
        groups.remove("s3_ours")
    results: list[dict[str, Any]] = []

    def save() -> None:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    started = time.perf_counter()
    for size in sizes:
        for rep in range(args.reps):
            for group in groups:
                needs_moto, plan = GROUPS[group]
                if needs_moto and size not in s3_sizes:
                    continue
                workdir = data / str(size) / group
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir(parents=True)
                moto = Moto(data / "moto_tmp") if needs_moto else None
                try:
                    for save_scenario, loads in plan:
                        result = run_worker(save_scenario, size, workdir, args, moto)
                        _log(result, rep)
                        results.append({**result, "rep": rep, "group": group})
                        if not result["ok"]:
                            continue
                        for load in loads:
                            drop_caches()
                            result = run_worker(load, size, workdir, args, moto)
                            _log(result, rep)
                            results.append({**result, "rep": rep, "group": group})
                finally:
                    if moto is not None:
                        moto.stop()
                    shutil.rmtree(workdir, ignore_errors=True)
                    shutil.rmtree(data / "moto_tmp", ignore_errors=True)
                save()
    meta["total_s"] = time.perf_counter() - started
    save()
    print(f"total {meta['total_s']:.0f} s -> {args.out}\n", flush=True)
    print(render(json.loads(Path(args.out).read_text())))


def _log(result: dict[str, Any], rep: int) -> None:
    if not result["ok"]:
        print(f"FAIL {result['size_mb']} {result['scenario']}: {result['error']}", flush=True)
        return
    for mode, it in result["iters"].items():
        marks = " ".join(f"{k} {v:.2f}" for k, v in it.get("marks", {}).items())
        print(
            f"{result['size_mb']:>5} rep{rep} {result['scenario']:<24} {mode:<5} {it['wall_s']:7.2f} s "
            f"{it['payload'] / MIB / it['wall_s']:7.0f} MiB/s peak+ {it['peak_over_base_mib']:6.0f} MiB {marks}",
            flush=True,
        )


# ------------------------------------------------------------------ report


def _collect(data: dict[str, Any]) -> dict[tuple[int, str, str], list[dict[str, Any]]]:
    rows: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for result in data["results"]:
        if result.get("ok"):
            for mode, it in result["iters"].items():
                rows.setdefault((result["size_mb"], result["scenario"], mode), []).append(it)
    return rows


def render(data: dict[str, Any]) -> str:
    rows = _collect(data)
    med = statistics.median
    out = []
    modes = [m for m in ("hot", "first") if any(key[2] == m for key in rows)]
    sizes = sorted({key[0] for key in rows})
    for mode in modes:
        out += [
            f"\n### memory mode: {mode}\n",
            "| params | scenario | payload MiB | n | wall s (median) | min..max | MiB/s | peak+ MiB | x payload "
            "| CPU/wall | breakdown (median s) |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for size in sizes:
            for scenario in ORDER:
                its = rows.get((size, scenario, mode))
                if not its:
                    continue
                walls = [it["wall_s"] for it in its]
                wall, payload = med(walls), its[0]["payload"] / MIB
                peak = med([it["peak_over_base_mib"] for it in its])
                cpu = med([it["cpu_s"] / it["wall_s"] for it in its])
                parts = {key: med([it["marks"][key] for it in its]) for key in its[0]["marks"]}
                if "checksum_s" in its[0]:
                    parts["checksums"] = med([it["checksum_s"] for it in its])
                    parts["checksum wait"] = med([it["checksum_wait_s"] for it in its])
                if "verify_s" in its[0]:
                    parts["verify"] = med([it["verify_s"] for it in its])
                breakdown = ", ".join(f"{key} {value:.3f}" for key, value in parts.items())
                spread = f"{min(walls):.2f}..{max(walls):.2f}"
                out.append(
                    f"| {size} MB | {scenario} | {payload:.0f} | {len(its)} | {wall:.3f} | {spread} "
                    f"| {payload / wall:.0f} | {peak:.0f} | {peak / payload:.3f} | {cpu:.2f} | {breakdown} |"
                )
    out.append(targets(rows))
    failures = [r for r in data["results"] if not r.get("ok")]
    if failures or data["meta"].get("skipped"):
        out.append("\nFailures and skips:\n")
        out += [f"- {r['size_mb']} MB {r['scenario']}: {r['error']}" for r in failures]
        out += [f"- {message}" for message in data["meta"].get("skipped", [])]
    return "\n".join(out)


def targets(rows: dict[tuple[int, str, str], list[dict[str, Any]]]) -> str:
    """The issue's targets as ratios of medians from the same run: 'hot' times, 'first' peaks."""
    med = statistics.median

    def get(size: int, scenario: str, what: str = "wall", mode: str = "hot") -> float | None:
        its = rows.get((size, scenario, mode)) or rows.get((size, scenario, "first"))
        if not its:
            return None
        if what == "wall":
            return med([it["wall_s"] for it in its])
        if what == "peak":
            first = rows.get((size, scenario, "first")) or its
            return med([it["peak_over_base_mib"] / (it["payload"] / MIB) for it in first])
        if what in ("checksum_s", "checksum_wait_s"):
            return med([it[what] for it in its])
        return med([it["marks"][what] for it in its])

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    lines = [
        "\n### targets (hot medians; peaks from 'first')\n",
        "| params | target | measured | goal | met |",
        "|---|---|---:|---|---|",
    ]

    def add(size: int, name: str, value: float | None, goal: str, ok: bool | None) -> None:
        if value is not None:
            verdict = "—" if ok is None else "yes" if ok else "no"
            lines.append(f"| {size} MB | {name} | {value:.3f} | {goal} | {verdict} |")

    for size in sorted({key[0] for key in rows}):
        save = get(size, "ours_save")
        t1 = ratio(get(size, "raw_write"), save)
        add(size, "1. save throughput vs raw write+fsync+rename", t1, ">= 0.85", t1 is not None and t1 >= 0.85)
        wb = ratio(get(size, "raw_write_wb"), save)
        add(size, "1. (same, vs raw write with our early writeback)", wb, "(reference)", wb is not None and wb >= 0.85)
        ts = ratio(get(size, "raw_write"), get(size, "torch_save"))
        add(size, "1. (torch.save+fsync+rename vs raw, for reference)", ts, "(0.60 in BASELINE)", None)
        peak = get(size, "ours_save", "peak")
        add(size, "1. save peak extra memory / checkpoint", peak, "<= 0.05", peak is not None and peak <= 0.05)
        t2 = ratio(get(size, "raw_read"), get(size, "ours_load"))
        add(size, "2. verified full load throughput vs raw read", t2, ">= 0.9", t2 is not None and t2 >= 0.9)
        mm = ratio(get(size, "ours_load_mmap", "call"), get(size, "ours_load"))
        add(size, "2. mmap load call (verify deferred) / full load", mm, "<= 0.1", mm is not None and mm <= 0.1)
        t5 = ratio(get(size, "async_save", "stall"), get(size, "snapshot_copy"))
        add(size, "5. async save stall / snapshot copy alone", t5, "<= 1.2", t5 is not None and t5 <= 1.2)
        t8 = ratio(get(size, "ours_save", "checksum_wait_s"), save)
        add(size, "8. save's wait for the checksums / save time", t8, "<= 0.05", t8 is not None and t8 <= 0.05)
        nohash = get(size, "ours_save_nohash")
        ab = None if save is None or nohash is None else (save - nohash) / save
        add(size, "8. (save - save without hashing) / save time", ab, "<= 0.05 (A/B, noisy)", None)
        work = ratio(get(size, "ours_save", "checksum_s"), save)
        add(size, "8. (hashing work, overlapped, / save time)", work, "(reference)", None)
        t3 = ratio(get(size, "ours_s3_save"), get(size, "s3_raw_pipe"))
        add(size, "3. S3 save time / raw pipe", t3, "<= 1.0", t3 is not None and t3 <= 1.0)
        p3 = get(size, "ours_s3_save", "peak")
        add(size, "3. S3 save client peak / checkpoint", p3, "bounded (parts x size)", None)
        t4 = ratio(get(size, "ours_s3_load"), get(size, "s3_raw_cat"))
        add(size, "4. S3 load time / raw cat", t4, "<= 1.0", t4 is not None and t4 <= 1.0)
        p4 = get(size, "ours_s3_load", "peak")
        add(size, "4. S3 load client peak / checkpoint", p4, "<= 1.2", p4 is not None and p4 <= 1.2)
        weights = rows.get((size, "ours_s3_load_weights", "hot")) or rows.get((size, "ours_s3_load_weights", "first"))
        model_bytes = weights[-1]["payload"] if weights else None  # what a weights load returns
        for scenario, what in (("ours_s3_load", "full load"), ("ours_s3_load_weights", "weights load")):
            its = rows.get((size, scenario, "hot")) or rows.get((size, scenario, "first")) or []
            fetched = its[-1].get("requests", {}).get("bytes_fetched") if its else None
            t7 = ratio(fetched, model_bytes)
            add(size, f"7. bytes fetched by a {what} / model bytes", t7, "<= 1.1", t7 is not None and t7 <= 1.1)
        t7t = ratio(get(size, "ours_s3_load_weights"), get(size, "ours_s3_load"))
        add(size, "7. (ref.) S3 weights load time / full load time", t7t, "(reference)", None)
        s3_loads = (("ours_s3_save", "save"), ("ours_s3_load", "load"), ("ours_s3_load_weights", "weights load"))
        for scenario, what in s3_loads:
            its = rows.get((size, scenario, "hot")) or rows.get((size, scenario, "first")) or []
            if its and "requests" in its[-1]:
                counted = ", ".join(f"{op} {n}" for op, n in sorted(its[-1]["requests"].items()))
                lines.append(f"| {size} MB | 6. S3 requests per {what} (one run) | {counted} | count | — |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("run", "worker", "report"):
        argv = ["run", *argv]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure (the default command)")
    run.add_argument("--sizes", default="64,512", help="MiB of fp32 params; the checkpoint is ~3x (AdamW state)")
    run.add_argument("--s3-sizes", default="64", help="sizes at which the S3 groups run (moto is slow)")
    run.add_argument("--reps", type=int, default=3)
    run.add_argument("--groups", default="all", help="comma list of: " + ",".join(GROUPS))
    run.add_argument("--modes", default="first,hot", help="memory modes run in order in each worker")
    run.add_argument("--data", default="/tmp/ml_playground_bench")
    run.add_argument("--out", default="bench_results.json")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    work = sub.add_parser("worker", help="internal: one phase of one scenario")
    work.add_argument("--scenario", required=True)
    work.add_argument("--size-mb", type=int, required=True)
    work.add_argument("--dir", required=True)
    work.add_argument("--payload-bytes", type=int, required=True)
    work.add_argument("--modes", default="first,hot")
    work.add_argument("--endpoint")
    work.add_argument("--server-pid", type=int)
    report = sub.add_parser("report", help="tables and target ratios from a results JSON")
    report.add_argument("results")
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args)
    elif args.command == "run":
        orchestrate(args)
    else:
        print(render(json.loads(Path(args.results).read_text())))


if __name__ == "__main__":
    main()
