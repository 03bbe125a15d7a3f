"""Issue 17's corpus of hostile files through every reading command, locally and on S3 (docs/reliability.md).

Every case of :mod:`tests.hostile_corpus` (and FIFOs, devices, over-long names and bad leases) goes
through ``ckpt ls/show/verify/cp/export``, ``sample``, ``eval`` and a resuming ``train``, each command
a process of its own (forked from one warm driver, :mod:`tests.hostile_driver`, which runs under
``prlimit --as``), with a 20 s timeout. Each must end in time, with its expected exit code, an
``error:`` line when it fails, never a traceback, and a peak resident memory above the driver's of at
most twice the file's size plus the model it would build plus :data:`SLACK` (what a valid checkpoint's
commands take: measured on the control case).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_support import TINY, cli_env, run_main, sets
from tests.hostile_corpus import BASE_NAME, BUILDERS, COMMANDS, EXPECTED, build
from tests.servers import MotoServer

AS_LIMIT = 4 << 30  # the cap: prlimit --as=4GiB
TIMEOUT = 20.0
SLACK = 160 << 20
"""Memory a command may take beyond its file and model: the control case's commands take up to ~110 MiB
above the driver (torch's CPU allocator and thread pools, s3fs's client on S3)."""
MODEL_BYTES = 5_072 * 4  # the tiny experiment's model (float32), which train and sample build
LONG_NAME = f"ckpt_last_{'0' * 300}.pt"
FULL_S3 = os.environ.get("ML_PLAYGROUND_FULL_CORPUS") == "1"
S3_CASES = {
    "control (a valid checkpoint)",
    "1. shared tuples 3^16",
    "1. list nested 5,000 deep",
    "2. n_embd = 1e6",
    "2. corpus_chars = 1e10",
    "3. zeros(1).expand(2**40)",
    "3. sparse tensor",
    "4. deflated data.pkl (zip bomb)",
    "5. NaN weights",
    "5. optimizer state that does not fit",
}
"""On S3 every command of these cases runs in CI (one of each class; a command is ~1 s against moto, the
whole corpus ~3 min); ML_PLAYGROUND_FULL_CORPUS=1 runs every case there (docs/reliability.md)."""
_READ_FILE = ("show", "cp", "export", "sample", "eval")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("corpus")
    return build(_train_base(work), work / "cases")


def _train_base(work: Path) -> Path:
    """A valid checkpoint of the tiny experiment at iteration 0 (what the cases are made from)."""
    result = subprocess.run(
        [sys.executable, "-m", "ml_playground", "train", *TINY, *sets(max_iters=0),
         "--set", f"train.runtime.out_dir={work / 'base'}"],
        cwd=work, env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return work / "base" / BASE_NAME


def _commands(
    case: str, file: str, run: str, scratch: Path, *, ckpt: list[str], read: list[str], train: list[str]
) -> Iterator[dict[str, Any]]:
    key = hashlib.sha1(f"{case}|{file}".encode()).hexdigest()[:12]
    argv = {
        "ls": ["ckpt", "ls", run, *ckpt],
        "show": ["ckpt", "show", file, *ckpt],
        "verify": ["ckpt", "verify", run, *ckpt],
        "cp": ["ckpt", "cp", file, str(scratch / "cp" / key), *ckpt],
        "export": ["ckpt", "export", file, str(scratch / "export" / key / "model.safetensors"), *ckpt],
        "sample": ["sample", "--checkpoint", file, "--set", "sample.sample.max_new_tokens=20", *read],
        "eval": ["eval", "--checkpoint", file, *read],
        "train": ["train", *TINY, *sets(max_iters=1), "--set", f"train.runtime.out_dir={run}", *train],
    }
    for command in COMMANDS:
        yield {"id": f"{key}-{command}", "case": case, "command": command, "argv": argv[command], "cwd": str(scratch)}


def _drive(commands: list[dict[str, Any]], scratch: Path) -> list[dict[str, Any]]:
    spec, results = scratch / "spec.json", scratch / "results.json"
    spec.write_text(json.dumps({"timeout": TIMEOUT, "commands": commands}))
    env = {
        **cli_env(),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        ["prlimit", f"--as={AS_LIMIT}", sys.executable, "-m", "tests.hostile_driver", str(spec), str(results)],
        env=env, cwd=scratch, capture_output=True, text=True, timeout=TIMEOUT * len(commands) + 60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found: list[dict[str, Any]] = json.loads(results.read_text())
    return [{**command, **result} for command, result in zip(commands, found, strict=True)]


def _check(results: list[dict[str, Any]], sizes: dict[str, int], table: list[str]) -> None:
    problems = []
    for result in results:
        allowed = result["expected"]
        output = result["stdout"] + result["stderr"]
        growth = result["maxrss"] - result["base_rss"]
        bound = 2 * sizes[result["case"]] + MODEL_BYTES + SLACK
        label = f"{result['case']} / {result['command']} {result['argv'][:3]}"
        if result["timed_out"] or result["seconds"] > TIMEOUT:
            problems.append(f"{label}: took {result['seconds']:.1f} s")
        if result["code"] not in allowed:
            problems.append(f"{label}: exit {result['code']}, expected {sorted(allowed)}:\n{output[-1500:]}")
        if "Traceback" in output:
            problems.append(f"{label}: traceback:\n{output[-3000:]}")
        reported = "error:" in result["stderr"] or (result["command"] == "verify" and "BAD  " in result["stdout"])
        if result["code"] != 0 and not reported:  # ckpt verify reports each bad file on a BAD line
            problems.append(f"{label}: no error line:\n{output[-1500:]}")
        if growth > bound:
            problems.append(f"{label}: peak memory {growth >> 20} MiB above the driver's, bound {bound >> 20} MiB")
        table.append(
            f"{result['case']}|{result['command']}|{result['code']}|{result['seconds']:.2f}|{max(growth, 0) >> 20}"
        )
    assert not problems, "\n".join(problems)


def _expected(case: str, command: str) -> set[int]:
    code = EXPECTED[case][command]
    return {code} if code == 0 else {1, 2} if command in ("sample", "eval", "train") else {code}


def _special_local(work: Path) -> dict[str, tuple[Path, Path, dict[str, set[int]]]]:
    """Cases that are not files' contents: a FIFO under a checkpoint name, devices, an over-long name."""
    fifo_run = work / "fifo"
    fifo_run.mkdir()
    os.mkfifo(fifo_run / BASE_NAME)
    fail = {1, 2}
    reading = {command: fail for command in _READ_FILE}
    return {
        "7. a FIFO under a checkpoint name": (
            fifo_run / BASE_NAME,
            fifo_run,
            {**reading, "ls": {0}, "verify": {0}, "train": {1}},
        ),
        "7. /dev/stdin": (
            Path("/dev/stdin"),
            Path("/dev"),
            {**reading, "ls": {0, 1}, "verify": {0, 1}, "train": set()},
        ),
        "7. /proc/self/mem": (
            Path("/proc/self/mem"),
            Path("/proc/self"),
            {**reading, "ls": {0, 1}, "verify": {0, 1}, "train": set()},
        ),
        "7. a 310-byte file name": (
            fifo_run / LONG_NAME,
            fifo_run,
            {**reading, "ls": {0}, "verify": {0}, "train": set()},
        ),
    }


def _write_table(table: list[str], where: str) -> None:
    out = os.environ.get("ML_PLAYGROUND_CORPUS_TABLE")
    if out:  # the docs' table (docs/reliability.md) is generated from a run of these tests
        Path(f"{out}.{where}").write_text("\n".join(table) + "\n")


def test_verify_reports_every_file_of_a_run_even_when_some_are_hostile(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "mixed"
    run.mkdir()
    for index, file in enumerate(corpus.values()):  # only case 0 (the control) has the iteration its name says
        (run / f"ckpt_last_{index:08d}.pt").write_bytes(file.read_bytes())
    result = run_main(["ckpt", "verify", str(run)], tmp_path, capsys)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{len(corpus)} checkpoints in {run}: 1 ok, {len(corpus) - 1} bad" in result.stdout
    assert result.stdout.count("BAD  ckpt_last_") == len(corpus) - 1


def test_the_hostile_corpus_locally(corpus: dict[str, Path], tmp_path: Path) -> None:
    commands: list[dict[str, Any]] = []
    sizes = {case: file.stat().st_size for case, file in corpus.items()}
    for case, file in corpus.items():
        for command in _commands(case, str(file), str(file.parent), tmp_path, ckpt=[], read=[], train=[]):
            commands.append({**command, "expected": _expected(case, command["command"])})
    for case, (file, run, expected) in _special_local(tmp_path).items():
        sizes[case] = 0
        for command in _commands(case, str(file), str(run), tmp_path, ckpt=[], read=[], train=[]):
            if expected[command["command"]]:
                commands.append({**command, "expected": expected[command["command"]]})
    results = _drive([{**c, "expected": sorted(c["expected"])} for c in commands], tmp_path)
    table: list[str] = []
    _check(results, sizes, table)
    _write_table(table, "local")
    for result in results:  # a copy that was refused left nothing behind
        if result["command"] == "cp" and result["code"] != 0:
            target = Path(result["argv"][3])
            assert not target.exists() or not list(target.iterdir()), result["case"]
    diverged = [r for r in results if r["command"] == "train" and r["case"].endswith(("NaN weights", "inf weights"))]
    assert diverged
    assert all(r["stdout"].count("has diverged") == 1 for r in diverged)


@pytest.mark.s3
def test_the_hostile_corpus_on_s3(
    corpus: dict[str, Path], tmp_path: Path, moto_server: MotoServer, s3_bucket: str, s3_admin: Any
) -> None:
    endpoint = moto_server.endpoint
    ckpt = ["-o", f"endpoint_url={endpoint}"]
    read = ["--set", f"sample.runtime.storage_options.endpoint_url={endpoint}"]
    train = ["--set", f"train.runtime.storage_options.endpoint_url={endpoint}"]
    commands: list[dict[str, Any]] = []
    sizes = {}
    for index, (case, file) in enumerate(corpus.items()):
        if not FULL_S3 and case not in S3_CASES:
            continue
        s3_admin.put_object(Bucket=s3_bucket, Key=f"case{index:02d}/{BASE_NAME}", Body=file.read_bytes())
        run = f"s3://{s3_bucket}/case{index:02d}"
        sizes[case] = file.stat().st_size
        for command in _commands(case, f"{run}/{BASE_NAME}", run, tmp_path, ckpt=ckpt, read=read, train=train):
            commands.append({**command, "expected": sorted(_expected(case, command["command"]))})
    long_key = f"ckpt_last_1{'0' * 249}.pt"  # a valid name, and a valid key on S3, too long for a local file
    control = corpus["control (a valid checkpoint)"].read_bytes()
    for key in (BASE_NAME, long_key):
        s3_admin.put_object(Bucket=s3_bucket, Key=f"long/{key}", Body=control)
    sizes["6. an S3 key of 263 bytes copied to local disk"] = len(control)
    commands.append({
        "id": "long-cp", "case": "6. an S3 key of 263 bytes copied to local disk", "command": "cp", "expected": [1],
        "argv": ["ckpt", "cp", f"s3://{s3_bucket}/long", str(tmp_path / "long-copy"), *ckpt], "cwd": str(tmp_path),
    })  # fmt: skip
    results = _drive(commands, tmp_path)
    table: list[str] = []
    _check(results, sizes, table)
    _write_table(table, "s3")
    assert not (tmp_path / "long-copy").exists() or not list((tmp_path / "long-copy").iterdir())
    assert "263 bytes" in " ".join(next(r for r in results if r["id"] == "long-cp")["stderr"].split())


@pytest.mark.parametrize(
    ("lease", "scheme"),
    [({"pid": "x"}, "local"), ({"pid": 2**70}, "local"), ({"expires_at": "soon"}, "s3"), ({"pid": True}, "s3")],
)
def test_a_malformed_lease_is_named_and_take_over_replaces_it(
    lease: dict[str, object],
    scheme: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = {
        "host": "elsewhere",
        "pid": 1,
        "process_start": None,
        "acquired_at": "now",
        "token": "ab",
        "expires_at": 1e18,
        **lease,
    }
    if scheme == "local":
        location, extra = str(tmp_path / "run"), []
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / ".ml_playground.lease").write_text(json.dumps(record))
        lease_name = str(tmp_path / "run" / ".ml_playground.lease")
    else:
        moto, bucket, admin = (request.getfixturevalue(n) for n in ("moto_server", "s3_bucket", "s3_admin"))
        admin.put_object(Bucket=bucket, Key="run/.ml_playground.lease", Body=json.dumps(record).encode())
        location, extra = f"s3://{bucket}/run", ["--set", f"train.runtime.storage_options.endpoint_url={moto.endpoint}"]
        lease_name = f"{location}/.ml_playground.lease"
    args = ["train", *TINY, *sets(max_iters=0), "--set", f"train.runtime.out_dir={location}", *extra]
    refused = run_main(args, tmp_path, capsys)
    assert refused.returncode == 1, refused.stderr
    flat = " ".join(refused.stderr.split())
    assert "error:" in flat
    assert lease_name in flat
    assert "--take-over" in flat
    taken = run_main([*args, "--take-over"], tmp_path, capsys)
    assert taken.returncode == 0, taken.stderr


def test_the_corpus_has_a_case_for_every_class() -> None:
    classes = {case.split(".")[0] for case in BUILDERS if case[0].isdigit()}
    assert classes == {"1", "2", "3", "4", "5"}  # 6-9 are special files, copies, leases and names: below
