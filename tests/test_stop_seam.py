"""The fault tests' seam ``ML_PLAYGROUND_TEST_STOP_AT``: a process stops itself at the n-th time its rank
reaches a stage, and nowhere else (tests/faults/test_sharded_kills.py kills ranks there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_playground.checkpoint._stop_seam import STAGES, STOP_AT_VARIABLE, reached
from ml_playground.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
from ml_playground.checkpoint._stop_seam import reached
for stage in ("parts", "manifest", "parts", "parts"):
    reached(stage)
    print(stage, flush=True)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _launch(value: str, rank: str | None) -> subprocess.Popen[str]:
    env = {key: val for key, val in os.environ.items() if key != "RANK"}
    env[STOP_AT_VARIABLE] = value
    if rank is not None:
        env["RANK"] = rank
    return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("value", "rank"), [("parts:1:2", "1"), ("parts:0:2", None)])  # no RANK: rank 0
def test_the_process_stops_the_nth_time_its_rank_reaches_the_stage_and_goes_on_when_continued(
    value: str, rank: str | None
) -> None:
    process = _launch(value, rank)
    try:
        assert process.stdout is not None
        assert [process.stdout.readline() for _ in range(2)] == ["parts\n", "manifest\n"]
        deadline = time.monotonic() + 30
        while _state(process.pid) != "T":  # stopped in the second "parts", before printing it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        assert _state(process.pid) == "T"
        os.kill(process.pid, signal.SIGCONT)
        rest, _ = process.communicate(timeout=30)
        assert rest == "parts\nparts\n"  # the third time does not stop again
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


IN_A_THREAD = """
import sys, threading, time
from ml_playground.checkpoint._stop_seam import reached

def save():  # as an async save does: the stage is reached in a background thread
    reached("rotation")
    sys.stdout.write("ran on past the stage\\n")
    sys.stdout.flush()

print("ready", flush=True)
thread = threading.Thread(target=save)
thread.start()
thread.join()
"""


def test_a_background_thread_stops_at_the_stage_itself() -> None:
    runs = []
    for _ in range(5):
        env = {key: val for key, val in os.environ.items() if key != "RANK"}
        env[STOP_AT_VARIABLE] = "rotation:0:1"
        process = subprocess.Popen([sys.executable, "-c", IN_A_THREAD], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n"
            deadline = time.monotonic() + 30
            while _state(process.pid) != "T":
                assert time.monotonic() < deadline
                time.sleep(0.001)
            os.kill(process.pid, signal.SIGKILL)  # as the fault test does, the moment it sees the stop
            runs.append(process.communicate(timeout=30)[0])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert runs == [""] * 5  # never a line written after the stage


NEVER_STOPS = """
import os
from ml_playground.checkpoint import _stop_seam
for value, rank in (("parts:1:2", "0"), ("parts:0:4", "0"), ("manifest:0:2", None)):
    os.environ[_stop_seam.STOP_AT_VARIABLE] = value
    os.environ.pop("RANK", None) if rank is None else os.environ.update(RANK=rank)
    _stop_seam._counts.clear()
    for stage in ("parts", "manifest", "parts", "parts"):
        _stop_seam.reached(stage)
    print(value, flush=True)
"""


def test_another_rank_and_a_count_never_reached_do_not_stop() -> None:
    process = subprocess.Popen([sys.executable, "-c", NEVER_STOPS], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert out.split() == ["parts:1:2", "parts:0:4", "manifest:0:2"]
    assert process.returncode == 0


def test_unset_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STOP_AT_VARIABLE, raising=False)
    for stage in STAGES:
        reached(stage)


@pytest.mark.parametrize("value", ["parts", "parts:0", "written:0:1", "parts:x:1", "parts:0:-1", "parts:0:1:2"])
def test_a_malformed_value_is_a_config_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(STOP_AT_VARIABLE, value)
    with pytest.raises(ConfigError, match=STOP_AT_VARIABLE):
        reached("parts")
