"""Reader stress test (issue 15, item 3): a writer process saves an ~8 MiB checkpoint every 0.5 s with
keep.last = 1 (and keep.best = 1, the metric improving at every save), while a reader process loads
latest and best in turn, 200 times: no load fails, and every load holds exactly the content of its
iteration (checksums verified by the load, content compared by the reader).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_playground.locations import LocalLocation, Location
from tests.cli_support import cli_env
from tests.servers import S3LocationFactory

LOADS = 200


def _stress(location: Location, tmp_path: Path) -> dict[str, object]:
    stop = tmp_path / "stop"
    env = cli_env()
    command = [sys.executable, "-m", "tests.reader_stress"]
    cwd = Path(__file__).resolve().parent.parent
    writer = subprocess.Popen(
        [*command, "writer", location.model_dump_json(), str(stop)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        first = writer.stdout.readline()  # the first checkpoint exists: the reader starts
        assert first.startswith("saved"), first
        started = time.monotonic()
        reader = subprocess.run(
            [*command, "reader", location.model_dump_json(), str(LOADS)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        elapsed = time.monotonic() - started
    finally:
        stop.touch()
        try:
            _, writer_errors = writer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            writer.kill()
            _, writer_errors = writer.communicate(timeout=10)
    assert reader.returncode == 0, reader.stderr
    assert writer.returncode == 0, writer_errors
    result: dict[str, object] = json.loads(reader.stdout.strip().splitlines()[-1])
    result["seconds"] = round(elapsed, 1)
    print(f"reader stress on {location.url}: {result}")  # the figures docs/reliability.md quotes
    return result


def _assert_no_failures(result: dict[str, object]) -> None:
    assert result["failures"] == []
    assert result["verified"] == LOADS
    first, last = result["iterations"]  # type: ignore[misc]
    assert last > first  # the writer moved on while the reader read


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_reader_never_trips_on_rotation_on_local_disk(tmp_path: Path) -> None:
    _assert_no_failures(_stress(LocalLocation(path=tmp_path / "run"), tmp_path))


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(300)
def test_a_reader_never_trips_on_rotation_on_s3(s3_location: S3LocationFactory, tmp_path: Path) -> None:
    _assert_no_failures(_stress(s3_location(), tmp_path))
