"""Loopback HTTP servers for the http(s) store's tests (issue 15, item 4).

- :class:`PresignGateway`: what S3 does with a presigned GET URL and moto does not: it checks the
  SigV4 query signature (with botocore's own signer, so a URL changed on the way fails) and the
  expiry, answering S3's own 403 error documents; a good request is relayed to the moto server
  (Range and If-Match included). HEAD is refused as S3 refuses it (the method is signed). It counts
  the bytes it sends back, headers included.
- :class:`ObjectServer`: one object in memory, with the behaviours the store must survive: Range
  ignored, no ETag, a weak ETag, If-Match ignored, the object replaced during a read.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.servers import TEST_REGION

_RELAYED = ("Range", "If-Match")


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.sent = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def count(self, method: str, headers: dict[str, str], sent: int) -> None:
        with self._lock:
            self.requests.append((method, headers))
            self.sent += sent

    def __enter__(self) -> Any:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def owner(self) -> Any:
        return self.server.owner  # type: ignore[attr-defined]

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        head = sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + 64
        self.owner.count(self.command, {k: v for k, v in self.headers.items()}, head + len(body))
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body)), "Connection": "close"}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>0</RequestId></Error>"
    ).encode()


class PresignGateway(_Server):
    """S3's checks of presigned GET URLs in front of the moto server at ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        super().__init__(_GatewayHandler)


class _GatewayHandler(_Handler):
    def do_GET(self) -> None:
        self.relay()

    def do_HEAD(self) -> None:
        self.relay()

    def relay(self) -> None:
        refused = self.refusal()
        if refused is not None:
            self.reply(403, {"Content-Type": "application/xml"}, s3_error(*refused))
            return
        connection = http.client.HTTPConnection(self.owner.upstream, timeout=30)
        try:
            headers = {key: self.headers[key] for key in _RELAYED if key in self.headers}
            connection.request(self.command, self.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() not in ("content-length", "connection")}
            self.reply(response.status, kept, body)
        finally:
            connection.close()

    def refusal(self) -> tuple[str, str] | None:
        """S3's answer to a request its presigned query does not allow (None: allowed)."""
        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        signature = query.pop("X-Amz-Signature", None)
        if signature is None or "X-Amz-Date" not in query or "X-Amz-Expires" not in query:
            return "AccessDenied", "Access Denied"
        signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if time.time() > signed_at.timestamp() + int(query["X-Amz-Expires"]):
            return "AccessDenied", "Request has expired"
        request = AWSRequest(method=self.command, url=f"http://{self.headers['Host']}{parts.path}", headers={})
        request.context["timestamp"] = query["X-Amz-Date"]  # add_auth() would take the time now: sign as then
        auth = S3SigV4QueryAuth(Credentials("testing", "testing"), "s3", TEST_REGION, int(query["X-Amz-Expires"]))
        auth._modify_request_before_signing(request)  # the query parameters presigning adds
        expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
        if expected != signature:
            return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature"
        return None


class ObjectServer(_Server):
    """Serves ``data`` at any path, honouring Range and If-Match unless told otherwise."""

    def __init__(self, data: bytes, *, etag: str | None = '"v1"') -> None:
        self.data = data
        self.etag = etag
        self.ranges = True
        self.honour_if_match = True
        self.on_get: Callable[[int], None] | None = None  # called with the number of GETs so far
        self.failure: tuple[int, bytes] | None = None  # answer every GET with this status and body
        super().__init__(_ObjectHandler)

    def replace(self, data: bytes, etag: str | None) -> None:
        self.data, self.etag = data, etag


class _ObjectHandler(_Handler):
    def do_HEAD(self) -> None:
        self.reply(405, {}, b"")

    def do_GET(self) -> None:
        owner: ObjectServer = self.owner
        gets = sum(method == "GET" for method, _ in owner.requests) + 1
        if owner.on_get is not None:
            owner.on_get(gets)
        if owner.failure is not None:
            self.reply(owner.failure[0], {"Content-Type": "application/xml"}, owner.failure[1])
            return
        data, etag = owner.data, owner.etag
        tag = {"ETag": etag} if etag is not None else {}
        wanted = self.headers.get("If-Match")
        if owner.honour_if_match and wanted is not None and wanted != etag:
            self.reply(412, {}, b"precondition failed")
            return
        spec = self.headers.get("Range")
        if not owner.ranges or spec is None:
            self.reply(200, tag, data)
            return
        first, _, last = spec.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last), len(data) - 1)
        if start >= len(data):
            self.reply(416, {**tag, "Content-Range": f"bytes */{len(data)}"}, b"")
            return
        self.reply(206, {**tag, "Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start : end + 1])
