"""SIGKILL a child in the middle of a save, at >= 300 points spread over the whole save, and audit.

The parent (which has already imported torch) forks a child per kill. The child saves a ~4.5 MiB
checkpoint as "best" then as "last" through ``CheckpointManager`` over earlier checkpoints, so
rotation is in flight, and reports each completed file operation on a pipe. One sweep runs the path
``train`` runs: the writer lease held, the asynchronous saver on, rotation from the manager's own view
of the names (no listing per save); there the next writer takes the dead child's lease over. The parent kills it
either right after its N-th operation plus a random sub-millisecond-to-milliseconds delay (so every
stage is hit: before the first byte, mid-write, after fsync, after the rename, mid-rotation, after
completion) or after a random delay over the whole save. After each kill it checks:

- every ``ckpt_*`` name loads, verifies and holds exactly what was saved under it;
- the previous newest checkpoint is intact, unless a newer committed one of its kind replaced it;
- temporaries are never listed; the next writer removes them;
- after the next successful save, exactly the checkpoints the keep policy names remain.
"""

from __future__ import annotations

import collections
import os
import random
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ml_playground.checkpoint import (
    AsyncCheckpointSaver,
    Checkpoint,
    CheckpointManager,
    CheckpointName,
    CheckpointSaver,
    FileOps,
    KeepPolicy,
    LocalStore,
    SyncCheckpointSaver,
)
from tests.faults._support import audit_all_load, big_checkpoint, expected_kept, fork_with_pipe, temporaries

pytestmark = [
    pytest.mark.slow,
    # Python >= 3.12 warns when forking a process with threads; the child here touches none of them.
    pytest.mark.filterwarnings(r"ignore:.*use of fork\(\) may lead to deadlocks:DeprecationWarning"),
]

KILLS_PER_POLICY = 110
STAGES = {
    b"S": "before the first byte",
    b"o": "temp file created, empty",
    b"w": "mid-write",
    b"f": "fsynced, before rename",
    b"c": "closed, before rename",
    b"r": "renamed, before directory fsync",
    b"d": "committed, before/mid rotation",
    b"u": "mid-rotation (after a delete)",
    b"D": "after the whole save",
}


class ProgressOps(FileOps):
    """Reports every completed file operation as one byte on a pipe, so the parent can kill at a stage."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _tell(self, code: bytes) -> None:
        os.write(self._fd, code)

    def open(self, path: Path) -> int:
        fd = super().open(path)
        self._tell(b"o")
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        written = super().write(fd, data)
        self._tell(b"w")
        return written

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self._tell(b"f")

    def close(self, fd: int) -> None:
        super().close(fd)
        self._tell(b"c")

    def rename_no_replace(self, src: Path, dst: Path) -> None:
        super().rename_no_replace(src, dst)
        self._tell(b"r")

    def fsync_dir(self, path: Path) -> None:
        super().fsync_dir(path)
        self._tell(b"d")

    def unlink(self, path: Path) -> None:
        super().unlink(path)
        self._tell(b"u")


@dataclass(frozen=True)
class Path_:
    """How the child saves: plainly, or as ``train`` does (lease held, async saver, rotation from the view)."""

    keep: KeepPolicy
    as_train_does: bool = False


def _child(run: Path, fd: int, checkpoint: Checkpoint, path: Path_) -> None:
    # No parallel tensor work here: the checkpoint was built before the fork, because a forked child
    # that enters torch's OpenMP pool can deadlock. Saving only copies bytes and hashes them; the async
    # saver's snapshot copies tensors, on this one thread.
    torch.set_num_threads(1)
    manager = CheckpointManager(LocalStore(run, file_ops=ProgressOps(fd)), path.keep)
    if path.as_train_does:
        manager.acquire_writer()
        manager.checkpoints()  # what train does before it saves: the view is listed once, under the lease
    os.write(fd, b"S")
    saver: CheckpointSaver = AsyncCheckpointSaver(manager) if path.as_train_does else SyncCheckpointSaver(manager)
    saver.save_best(checkpoint)
    saver.save_last(checkpoint)
    saver.close()
    os.write(fd, b"D")
    time.sleep(5)  # the parent kills us here at the latest


def _fork_saver(run: Path, iter_num: int, path: Path_) -> tuple[int, int]:
    checkpoint = big_checkpoint(iter_num)
    return fork_with_pipe(lambda write_fd: _child(run, write_fd, checkpoint, path))


def _read_events(fd: int, want: int, deadline: float) -> bytes:
    seen = b""
    while len(seen) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        chunk = os.read(fd, want - len(seen))
        if not chunk:
            break
        seen += chunk
    return seen


def _drain(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def _calibrate(run: Path, iter_num: int, path: Path_) -> tuple[int, float]:
    """Let one child run a whole save: how many operations it reports and how long it takes."""
    start = time.monotonic()
    pid, fd = _fork_saver(run, iter_num, path)
    try:
        events = b""
        while not events.endswith(b"D"):
            more = _read_events(fd, 1, start + 30)
            assert more, f"calibration child stalled after {events!r}"
            events += more
        elapsed = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    return len(events), elapsed


def _save_next(run: Path, iter_num: int, path: Path_) -> list[CheckpointName]:
    """The next writer; as train does, it takes the dead child's lease over."""
    manager = CheckpointManager(LocalStore(run), path.keep)
    lease = manager.acquire_writer() if path.as_train_does else None
    checkpoint = big_checkpoint(iter_num)
    saved = [manager.save_best(checkpoint), manager.save_last(checkpoint)]
    if lease is not None:
        lease.release()
    return [name for name in saved if name is not None]


@pytest.mark.timeout(170)
@pytest.mark.parametrize(
    "path",
    [Path_(KeepPolicy(last=1, best=1)), Path_(KeepPolicy(last=2, best=2)), Path_(KeepPolicy(last=2, best=1), True)],
    ids=["keep1", "keep2", "as-train-does-lease-async-view"],
)
def test_sigkill_during_save_never_loses_or_exposes_a_checkpoint(
    tmp_path: Path, path: Path_, record_property: pytest.RecordProperty
) -> None:
    keep = path.keep
    run = tmp_path / "run"
    seen: set[CheckpointName] = set()
    iter_num = 0
    for _ in range(keep.last + 1):  # earlier checkpoints, so the first kill already has rotation in flight
        seen.update(_save_next(run if run.exists() else _mkdir(run), iter_num, path))
        iter_num += 1
    events_per_save, save_seconds = _calibrate(run, iter_num, path)
    seen.update(_names(run))
    iter_num += 1

    rng = random.Random(20261128)
    kills = violations = leftovers = 0
    stages: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    for round_index in range(KILLS_PER_POLICY):
        latest = CheckpointManager(LocalStore(run), keep).latest()
        assert latest is not None
        newest_before = latest.name
        pid, fd = _fork_saver(run, iter_num, path)
        start = time.monotonic()
        events = b""
        try:
            if round_index % 3 == 2:  # a kill at a random time over the whole save
                time.sleep(rng.uniform(0, save_seconds * 1.1))
            else:  # a kill right after the N-th operation, N cycling over the whole save
                target = (round_index * 7) % (events_per_save + 1) or 1
                events = _read_events(fd, target, start + 30)
                time.sleep(rng.choice((0.0, rng.uniform(0, 0.0005), rng.uniform(0, 0.005))))
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            events += _drain(fd)
            os.close(fd)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            problems.append(f"round {round_index}: child was not killed (status {status})")
            violations += 1
            continue
        kills += 1
        stages[STAGES.get(events[-1:], "before the child started")] += 1

        names, found = audit_all_load(run)
        if newest_before not in names and not any(
            n.kind is newest_before.kind and n.iter_num > newest_before.iter_num for n in names
        ):
            found.append(f"previous newest {newest_before.filename} vanished without a committed successor")
        seen.update(names)
        leftovers += bool(temporaries(run))

        seen.update(_save_next(run, iter_num + 1, path))  # the next writer
        if temporaries(run):
            found.append(f"the next writer left temporaries {temporaries(run)}")
        remaining, wanted = set(_names(run)), expected_kept(seen, keep)
        if remaining != wanted:
            found.append(
                f"keep invariant: {sorted(n.filename for n in remaining)} != {sorted(n.filename for n in wanted)}"
            )
        if found:
            violations += 1
            problems.extend(f"round {round_index}: {p}" for p in found)
        iter_num += 2

    summary = (
        f"SIGKILL {path}: kills={kills} violations={violations} rounds-with-leftover-temp={leftovers} "
        f"ops-per-save={events_per_save} save-seconds={save_seconds:.3f} stages={dict(stages)}"
    )
    print(summary)
    record_property("sigkill_summary", summary)
    assert problems == []
    assert violations == 0
    assert kills == KILLS_PER_POLICY
    # docs/reliability.md: 2 x 12 file operations and 2 deletes, between the start and end markers
    assert events_per_save == 28, events_per_save
    assert leftovers > 0, "no kill left a temporary behind: the cleanup path was never exercised"
    assert len(stages) >= 6, f"kills did not spread over the save: {dict(stages)}"


def _mkdir(run: Path) -> Path:
    run.mkdir(parents=True)
    return run


def _names(run: Path) -> list[CheckpointName]:
    return [info.name for info in CheckpointManager(LocalStore(run)).checkpoints()]
