"""A tiny loopback TCP proxy that can cut connections mid-stream, for network-fault tests.

The client talks to the proxy; the proxy relays to the real server. Two faults:

- ``cut_after_bytes``: a connection that has sent more than this many bytes to the server in total is
  closed on both sides at once (a connection dying mid-upload). ``cuts`` limits how many connections
  are cut (``None``: every one that crosses the threshold).
- ``cut_when``: a predicate on the first bytes of a request; every connection carrying a request it matches
  is closed before the request reaches the server (e.g. one rank's uploads: a fault of one writer).
- ``drop_response_when``: a predicate on the first bytes of a request; when it matches, the request
  reaches the server but the connection is closed before the response returns (the outcome is
  unknown to the client). ``drops`` limits how often.

``received`` counts the bytes relayed from the server to the client (responses, headers included):
what a load fetched over the wire. ``requests`` holds the request lines relayed, in order (e.g.
``b"PUT /bucket/key HTTP/1.1"``): what a copy wrote, and when.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType


class CuttingProxy:
    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.cut_after_bytes: int | None = None
        self.cuts: int | None = None
        self.cut_when: Callable[[bytes], bool] | None = None
        self.drop_response_when: Callable[[bytes], bool] | None = None
        self.drops = 0
        self.cut_count = 0
        self.drop_count = 0
        self.received = 0
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                _shut(sock)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                self._open.update((client, server))
            state = _Connection(client, server)
            threading.Thread(target=self._upward, args=(state,), daemon=True).start()
            threading.Thread(target=self._downward, args=(state,), daemon=True).start()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cut_after_bytes is None or (self.cuts is not None and self.cut_count >= self.cuts):
                return False
            self.cut_count += 1
            return True

    def _take_drop(self, head: bytes) -> bool:
        with self._lock:
            if self.drop_response_when is None or self.drop_count >= self.drops or not self.drop_response_when(head):
                return False
            self.drop_count += 1
            return True

    def _upward(self, state: _Connection) -> None:
        sent = 0
        try:
            while True:
                data = state.client.recv(65536)
                if not data:
                    break
                if self.cut_when is not None and self.cut_when(data[:512]):
                    with self._lock:
                        self.cut_count += 1
                    state.close()
                    return
                if self._take_drop(data[:512]):
                    state.drop_response = True
                threshold = self.cut_after_bytes
                if threshold is not None and sent + len(data) > threshold and self._take_cut():
                    state.close()
                    return
                if data.startswith(_METHODS):
                    with self._lock:
                        self.requests.append(data.split(b"\r\n", 1)[0])
                state.server.sendall(data)
                sent += len(data)
        except OSError:
            pass
        state.close()

    def _downward(self, state: _Connection) -> None:
        try:
            while True:
                data = state.server.recv(65536)
                if not data:
                    break
                if state.drop_response:
                    interim, data = _split_interim(data)
                    if interim:  # "100 Continue" only invites the body: pass it on
                        state.client.sendall(interim)
                    if data:
                        break  # the server answered the request; the client never hears it
                    continue
                state.client.sendall(data)
                with self._lock:
                    self.received += len(data)
        except OSError:
            pass
        state.close()


_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")


class _Connection:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.drop_response = False

    def close(self) -> None:
        _shut(self.client)
        _shut(self.server)


def _split_interim(data: bytes) -> tuple[bytes, bytes]:
    """Split leading ``HTTP/1.1 100 Continue`` responses off ``data``."""
    marker = b"HTTP/1.1 100 Continue\r\n\r\n"
    cut = 0
    while data.startswith(marker, cut):
        cut += len(marker)
    return data[:cut], data[cut:]


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
