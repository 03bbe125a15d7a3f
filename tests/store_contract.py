"""The store contract: one suite every CheckpointStore runs.

A store's own test module subclasses ``StoreContract`` and provides a ``store`` fixture (an empty,
writable store) and, where the store can be reopened from another handle, ``reopen`` (a second
store object on the same location, as another process would have). Known gaps are ``xfail`` with
a reason in that module.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from ml_playground.checkpoint import CheckpointStore
from ml_playground.checkpoint._store import TEMP_PREFIX
from ml_playground.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, every byte value


class Boom(Exception):
    pass


def write_bytes(store: CheckpointStore, name: str, data: bytes, chunk: int = 65536) -> None:
    """Save ``data`` under ``name`` through the store's atomic write, in ``chunk``-sized writes."""
    with store.write(name) as stream:
        for start in range(0, len(data), chunk):
            stream.write(data[start : start + chunk])


def read_bytes(store: CheckpointStore, name: str) -> bytes:
    with store.open(name) as stream:
        return stream.read()


class StoreContract:
    """Inherit this in a store's test module and provide the ``store`` and ``reopen`` fixtures."""

    @pytest.fixture
    def reopen(self, store: CheckpointStore) -> Callable[[], CheckpointStore]:
        return lambda: store

    def test_new_store_is_empty(self, store: CheckpointStore) -> None:
        assert store.list() == []

    def test_write_then_read_round_trips_bytes(self, store: CheckpointStore) -> None:
        write_bytes(store, "ckpt_last_00000001.pt", PAYLOAD)
        assert read_bytes(store, "ckpt_last_00000001.pt") == PAYLOAD

    def test_list_reports_committed_names_and_sizes(self, store: CheckpointStore) -> None:
        write_bytes(store, "b.pt", b"bb")
        write_bytes(store, "a.pt", b"a")
        listed = {obj.name: obj.size for obj in store.list()}
        assert listed == {"a.pt": 1, "b.pt": 2}

    def test_exception_in_write_leaves_nothing(self, store: CheckpointStore) -> None:
        with pytest.raises(Boom), store.write("ckpt_last_00000001.pt") as stream:
            stream.write(PAYLOAD)
            raise Boom
        assert store.list() == []

    def test_keyboard_interrupt_in_write_leaves_nothing_and_propagates(self, store: CheckpointStore) -> None:
        with pytest.raises(KeyboardInterrupt), store.write("ckpt_last_00000001.pt") as stream:
            stream.write(PAYLOAD)
            raise KeyboardInterrupt
        assert store.list() == []

    def test_failed_write_keeps_earlier_objects_intact(self, store: CheckpointStore) -> None:
        write_bytes(store, "ckpt_last_00000001.pt", PAYLOAD)
        with pytest.raises(Boom), store.write("ckpt_last_00000002.pt") as stream:
            stream.write(b"partial")
            raise Boom
        assert [obj.name for obj in store.list()] == ["ckpt_last_00000001.pt"]
        assert read_bytes(store, "ckpt_last_00000001.pt") == PAYLOAD

    def test_object_is_invisible_until_the_write_completes(
        self, store: CheckpointStore, reopen: Callable[[], CheckpointStore]
    ) -> None:
        other = reopen()
        with store.write("ckpt_last_00000001.pt") as stream:
            stream.write(PAYLOAD)
            assert [obj.name for obj in other.list()] == []
            with pytest.raises(CheckpointNotFoundError):
                read_bytes(other, "ckpt_last_00000001.pt")
        assert [obj.name for obj in other.list()] == ["ckpt_last_00000001.pt"]

    def test_existing_name_is_never_overwritten(self, store: CheckpointStore) -> None:
        write_bytes(store, "ckpt_last_00000001.pt", PAYLOAD)
        with pytest.raises(CheckpointExistsError):
            write_bytes(store, "ckpt_last_00000001.pt", b"other")
        assert read_bytes(store, "ckpt_last_00000001.pt") == PAYLOAD

    def test_open_missing_raises_not_found_naming_it(self, store: CheckpointStore) -> None:
        with pytest.raises(CheckpointNotFoundError, match="ckpt_last_00000009.pt"):
            read_bytes(store, "ckpt_last_00000009.pt")

    def test_delete_removes_and_missing_delete_raises(self, store: CheckpointStore) -> None:
        write_bytes(store, "x.pt", b"x")
        store.delete("x.pt")
        assert store.list() == []
        with pytest.raises(CheckpointNotFoundError):
            store.delete("x.pt")

    def test_listing_is_fresh_across_handles(
        self, store: CheckpointStore, reopen: Callable[[], CheckpointStore]
    ) -> None:
        other = reopen()
        assert other.list() == []
        write_bytes(store, "a.pt", b"a")
        assert [obj.name for obj in other.list()] == ["a.pt"]
        store.delete("a.pt")
        assert other.list() == []

    def test_open_stream_is_seekable(self, store: CheckpointStore) -> None:
        write_bytes(store, "a.pt", PAYLOAD)
        with store.open("a.pt") as stream:
            stream.seek(1000)
            assert stream.read(10) == PAYLOAD[1000:1010]
            stream.seek(0, io.SEEK_END)
            assert stream.tell() == len(PAYLOAD)

    def test_empty_object_round_trips(self, store: CheckpointStore) -> None:
        write_bytes(store, "empty.pt", b"")
        assert read_bytes(store, "empty.pt") == b""

    def test_temporaries_are_never_listed(self, store: CheckpointStore) -> None:
        with store.write("a.pt") as stream:
            stream.write(b"a")
            assert all(not obj.name.startswith(TEMP_PREFIX) for obj in store.list())
        assert [obj.name for obj in store.list()] == ["a.pt"]

    def test_errors_are_package_errors(self, store: CheckpointStore) -> None:
        with pytest.raises(CheckpointError):
            store.delete("never-written.pt")
