"""Two writers on one local run location: the second is refused while the first lives; a dead
writer's lease is taken over at once; taking over a live one is explicit, and its old holder stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ml_playground.checkpoint import CheckpointManager, FileOps, KeepPolicy, LocalStore, WriterLease
from ml_playground.checkpoint._lease import LEASE_NAME
from ml_playground.errors import CheckpointError, LocationLockedError
from tests.conftest import make_checkpoint
from tests.faults._support import fork_with_pipe

# Python >= 3.12 warns when forking a process with threads; the children here touch none of them.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*use of fork\(\) may lead to deadlocks:DeprecationWarning")


def _manager(run: Path) -> CheckpointManager:
    return CheckpointManager(LocalStore(run, create=True), KeepPolicy(last=2, best=1))


@contextmanager
def _child(body: Callable[[int], None]) -> Iterator[tuple[int, int]]:
    """Fork a child running ``body(write_fd)``; yield (pid, read_fd); SIGKILL and reap it at the end."""
    pid, read_fd = fork_with_pipe(body)
    try:
        yield pid, read_fd
    finally:
        with _suppress_lookup():
            os.kill(pid, signal.SIGKILL)
        with _suppress_lookup(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(read_fd)


@contextmanager
def _suppress_lookup(*extra: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, *extra):
        pass


def _expect(fd: int, want: bytes, timeout: float = 30) -> bytes:
    deadline, got = time.monotonic() + timeout, b""
    os.set_blocking(fd, False)
    while time.monotonic() < deadline and not got.endswith(want):
        try:
            chunk = os.read(fd, 256)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        if not chunk:
            break
        got += chunk
    assert got.endswith(want), f"child said {got!r}, expected {want!r}"
    return got


def _holding_writer(run: Path) -> Callable[[int], None]:
    """A child that takes the lease, saves once, says "H" and keeps running (as a training job would)."""
    checkpoint = make_checkpoint(1)  # built before the fork: torch's thread pool does not survive one

    def body(fd: int) -> None:
        manager = _manager(run)
        manager.acquire_writer()
        manager.save_last(checkpoint)
        os.write(fd, b"H")
        time.sleep(60)

    return body


def test_a_second_writer_is_refused_while_the_first_lives(run_dir: Path) -> None:
    with _child(_holding_writer(run_dir)) as (pid, fd):
        _expect(fd, b"H")
        with pytest.raises(LocationLockedError) as caught:
            _manager(run_dir).acquire_writer()
        message = str(caught.value)
        assert str(run_dir) in message
        assert f"pid {pid} on host {os.uname().nodename}" in message
        assert "force=True" in message
        assert [i.filename for i in _manager(run_dir).checkpoints()] == ["ckpt_last_00000001.pt"]


def test_a_writer_killed_with_sigkill_blocks_nobody(run_dir: Path) -> None:
    with _child(_holding_writer(run_dir)) as (pid, fd):
        _expect(fd, b"H")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    start = time.monotonic()
    manager = _manager(run_dir)
    with manager.acquire_writer():
        manager.save_last(make_checkpoint(2))
    assert time.monotonic() - start < 5
    assert not (run_dir / LEASE_NAME).exists()


def test_a_killed_but_unreaped_writer_is_dead(run_dir: Path) -> None:
    with _child(_holding_writer(run_dir)) as (pid, fd):
        _expect(fd, b"H")
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)  # a zombie until reaped at the end of the block
        with _manager(run_dir).acquire_writer() as lease:
            assert lease.holder.pid == os.getpid()


def test_forcing_takes_over_a_live_lease_and_the_old_writer_stops(run_dir: Path) -> None:
    first, third = make_checkpoint(1), make_checkpoint(3)

    def old_writer(fd: int) -> None:
        manager = _manager(run_dir)
        manager.acquire_writer()
        manager.save_last(first)
        os.write(fd, b"H")
        time.sleep(0.5)  # meanwhile the parent forces the lease over
        try:
            manager.save_last(third)
        except LocationLockedError as exc:
            os.write(fd, b"L" if "taken over by pid" in str(exc) else b"?")
        else:
            os.write(fd, b"S")
        time.sleep(60)

    with _child(old_writer) as (_, fd):
        _expect(fd, b"H")
        manager = _manager(run_dir)
        with manager.acquire_writer(force=True):
            manager.save_last(make_checkpoint(2))
            _expect(fd, b"L")
            assert [i.filename for i in manager.checkpoints()] == ["ckpt_last_00000002.pt", "ckpt_last_00000001.pt"]


def test_a_lease_from_another_host_expires_only_after_its_ttl(run_dir: Path) -> None:
    run_dir.mkdir()
    record = {"host": "other-host", "pid": 1, "process_start": 1, "acquired_at": "2026-01-01T00:00:00+00:00"}
    (run_dir / LEASE_NAME).write_text(json.dumps({**record, "token": "0123"}))
    with pytest.raises(LocationLockedError, match="other-host.*refreshed its lease 0 s ago"):
        WriterLease(run_dir, ttl=30)
    old = time.time() - 31
    os.utime(run_dir / LEASE_NAME, (old, old))
    with WriterLease(run_dir, ttl=30) as lease:
        assert json.loads((run_dir / LEASE_NAME).read_text())["token"] == lease.holder.token


def test_the_holder_refreshes_its_lease(run_dir: Path) -> None:
    run_dir.mkdir()
    with WriterLease(run_dir, ttl=0.4):
        old = time.time() - 100
        os.utime(run_dir / LEASE_NAME, (old, old))
        time.sleep(0.3)
        assert time.time() - (run_dir / LEASE_NAME).stat().st_mtime < 1


def test_two_writers_in_one_process_are_refused_too(run_dir: Path) -> None:
    first = _manager(run_dir)
    with first.acquire_writer(), pytest.raises(LocationLockedError, match="its process is alive"):
        _manager(run_dir).acquire_writer()


def test_the_lease_file_is_not_a_checkpoint_and_is_released(run_dir: Path) -> None:
    manager = _manager(run_dir)
    with manager.acquire_writer():
        manager.save_last(make_checkpoint(0))
        assert [i.filename for i in manager.checkpoints()] == ["ckpt_last_00000000.pt"]
        assert (run_dir / LEASE_NAME).exists()
    assert not (run_dir / LEASE_NAME).exists()
    with _manager(run_dir).acquire_writer():  # free again
        pass


def test_a_foreign_lease_file_is_a_clear_error(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / LEASE_NAME).write_text("not json")
    with pytest.raises(CheckpointError, match=f"{LEASE_NAME} is not a writer lease"):
        WriterLease(run_dir)


@pytest.mark.timeout(120)
def test_writers_racing_for_a_free_location_never_both_win(run_dir: Path) -> None:
    run_dir.mkdir()
    rounds, contenders, doubles = 15, 4, 0  # each round: exactly one of four simultaneous starters wins
    for _ in range(rounds):
        go_read, go_write = os.pipe()

        def contender(fd: int, go: int = go_read) -> None:
            os.read(go, 1)  # all start together
            try:
                WriterLease(run_dir)
            except LocationLockedError:
                os.write(fd, b"0")
            else:
                os.write(fd, b"1")
            time.sleep(60)  # keep holding: a winner that exits would look dead

        with contextlib.ExitStack() as stack:
            fds = [stack.enter_context(_child(contender))[1] for _ in range(contenders)]
            os.write(go_write, b"x" * contenders)
            outcomes = [_read_one(fd) for fd in fds]
        os.close(go_read)
        os.close(go_write)
        (run_dir / LEASE_NAME).unlink()
        doubles += outcomes.count(b"1") != 1
    assert doubles == 0


def _read_one(fd: int) -> bytes:
    os.set_blocking(fd, False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 1)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        return data
    raise AssertionError("a contender never answered")


def test_a_lease_taken_over_during_a_save_stops_the_rotation_after_it(tmp_path: Path) -> None:
    # the lease was checked only before the write: a writer whose lease was taken over during a long
    # save still rotated, deleting files from its stale view of a location that is no longer its own
    run = tmp_path / "run"
    armed, takeover = [False], []

    class TakenOverWhileWriting(FileOps):
        def fsync(self, fd: int) -> None:
            if armed[0] and not takeover:
                takeover.append(_manager(run).acquire_writer(force=True))
            super().fsync(fd)

    old = CheckpointManager(LocalStore(run, create=True, file_ops=TakenOverWhileWriting()), KeepPolicy(last=1, best=0))
    with old.acquire_writer():
        old.save_last(make_checkpoint(1))
        armed[0] = True
        with pytest.raises(LocationLockedError, match="ckpt_last_00000002.pt was saved, but rotation failed"):
            old.save_last(make_checkpoint(2))
    assert sorted(path.name for path in run.glob("ckpt_*")) == ["ckpt_last_00000001.pt", "ckpt_last_00000002.pt"]
    takeover[0].release()
