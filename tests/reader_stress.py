"""The two processes of the reader stress test (``tests/test_reader_stress.py``), run as ``python -m``.

``writer LOCATION_JSON STOP_FILE``: saves an ~8 MiB checkpoint (last and best, keep 1 of each) every
0.5 s until STOP_FILE exists. ``reader LOCATION_JSON LOADS``: loads latest and best in turn, LOADS times,
verifies each against the content its iteration must have, and prints one JSON line of results.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from pydantic import TypeAdapter

from ml_playground.checkpoint import Checkpoint, CheckpointManager, KeepPolicy, open_store
from ml_playground.errors import CheckpointError
from ml_playground.locations import Location

ELEMENTS = 2 * 2**20  # float32: 8 MiB of model weights
INTERVAL = 0.5


def expected_weights(iteration: int) -> torch.Tensor:
    """What the checkpoint of ``iteration`` holds: different for every iteration, cheap to make."""
    return torch.arange(ELEMENTS, dtype=torch.float32) + float(iteration)


def metric(iteration: int) -> float:
    return 1000.0 - iteration  # improves at every save, so best checkpoints rotate as fast as last ones


def checkpoint(iteration: int) -> Checkpoint:
    return Checkpoint(
        model={"w": expected_weights(iteration)},
        optimizer={"state": {}, "param_groups": []},
        model_args={"elements": ELEMENTS},
        iter_num=iteration,
        best_val_loss=metric(iteration),
    )


def writer(location: Location, stop: Path) -> None:
    manager = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=1))
    iteration = 0
    while not stop.exists():
        started = time.monotonic()
        state = checkpoint(iteration)
        manager.save_best(state)
        manager.save_last(state)
        print(f"saved {iteration}", flush=True)
        iteration += 1
        time.sleep(max(0.0, INTERVAL - (time.monotonic() - started)))


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "choosing again" in record.getMessage():
            self.count += 1


def reader(location: Location, loads: int) -> dict[str, object]:
    retries = _Retries()
    logging.getLogger("ml_playground.checkpoint").addHandler(retries)
    logging.getLogger("ml_playground.checkpoint").setLevel(logging.INFO)
    manager = CheckpointManager(open_store(location))
    failures: list[str] = []
    verified = 0
    iterations: list[int] = []
    for index in range(loads):
        policy = "latest" if index % 2 == 0 else "best"
        try:
            loaded = manager.load_latest() if policy == "latest" else manager.load_best()
        except CheckpointError as exc:
            failures.append(f"{policy}: {type(exc).__name__}: {exc}")
            continue
        iterations.append(loaded.iter_num)
        if loaded.best_val_loss == metric(loaded.iter_num) and torch.equal(
            loaded.model["w"], expected_weights(loaded.iter_num)
        ):
            verified += 1
        else:
            failures.append(f"{policy}: iteration {loaded.iter_num} holds other content")
    return {
        "loads": loads,
        "verified": verified,
        "failures": failures,
        "retries": retries.count,
        "iterations": [min(iterations, default=-1), max(iterations, default=-1)],
    }


def main(argv: list[str]) -> None:
    role, location_json, arg = argv
    location: Location = TypeAdapter(Location).validate_json(location_json)
    if role == "writer":
        writer(location, Path(arg))
    else:
        print(json.dumps(reader(location, int(arg))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
