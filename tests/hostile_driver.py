"""Run many ``ml-playground`` commands from one warm process: ``python -m tests.hostile_driver SPEC RESULTS``.

The driver imports the package (torch, s3fs) once, then runs every command of SPEC (a JSON list of
``{"id", "argv", "cwd"}``) in a forked child, as a fresh ``ml-playground`` process would run it, with
stdin from /dev/null and stdout/stderr into files. A child that outlives ``timeout`` seconds is killed.
RESULTS gets, per command: its exit status, wall time, output, the child's peak resident memory
(``ru_maxrss`` from ``wait4``) and the driver's own resident memory when it forked (the child starts
with those pages). Run it under ``prlimit --as=BYTES``: every child inherits the cap.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(argv: list[str], cwd: str, out: Path, err: Path) -> None:
    code = 70
    try:
        os.chdir(cwd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        from ml_playground.cli import main

        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # what an uncaught error would do in a real process: a traceback, exit 1
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def run(command: dict[str, Any], scratch: Path, timeout: float) -> dict[str, Any]:
    out, err = scratch / f"{command['id']}.out", scratch / f"{command['id']}.err"
    sys.stdout.flush()
    sys.stderr.flush()
    base = _rss()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(command["argv"], command["cwd"], out, err)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - started > timeout:
            os.kill(pid, signal.SIGKILL)
            done, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    return {
        "id": command["id"],
        "code": os.waitstatus_to_exitcode(status),
        "seconds": time.monotonic() - started,
        "timed_out": timed_out,
        "maxrss": usage.ru_maxrss * 1024,
        "base_rss": base,
        "stdout": out.read_text(errors="replace"),
        "stderr": err.read_text(errors="replace"),
    }


def main() -> None:
    spec_path, results_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    import s3fs  # noqa: F401  (imported once here, not in every child)

    import ml_playground.checkpoint.stores.s3
    import ml_playground.cli  # noqa: F401

    scratch = results_path.parent / "outputs"
    scratch.mkdir(exist_ok=True)
    results = [run(command, scratch, spec["timeout"]) for command in spec["commands"]]
    results_path.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
