"""A faulty wire for the lease's fault tests: an HTTP proxy, on a thread, in front of moto's S3 server.

Each request is forwarded as is unless the test's ``decide(request)`` names a fault for it:

- ``"cut"``: the connection is closed before the request is forwarded (a network partition);
- ``"drop"``: the request is forwarded, its reply thrown away and the connection closed (a lost reply:
  the write landed, its writer cannot know);
- ``("hold", seconds)``: the request waits that long before it is forwarded (a PUT in flight);
- ``("late", seconds)``: the reply waits that long after the server answered;
- ``"no-if-match"``: forwarded without its ``If-Match`` header (a server that ignores it);
- ``("date", seconds)``: the reply's ``Date`` moved by that much (a proxy or server whose clock is off);
- ``("modified", seconds)``: the reply's ``Last-Modified`` moved by that much (a server node whose clock is off).

``decide`` may return a list of them. ``log`` keeps (method, key, what was done, time.time() when the
server answered, or None) for each request, in the order the server answered them.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass(frozen=True)
class Request:
    method: str
    key: str          # the object's key in its bucket ('' for the bucket itself)
    headers: dict     # lower-case names


class S3Proxy:
    """``with S3Proxy(moto_endpoint) as proxy:``; point a client at ``proxy.endpoint``."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.decide = lambda request: None
        self.log: list[tuple[str, str, str, float | None, float]] = []   # method, key, what, answered, arrived
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)

    def __enter__(self) -> S3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, method: str, key: str, what: str, answered: float | None, arrived: float) -> None:
        """Log a request: when the server answered it (None: cut) and when it arrived here."""
        with self._lock:
            self.log.append((method, key, what, answered, arrived))


def _faults(decided) -> list:
    if decided is None:
        return []
    return list(decided) if isinstance(decided, list) else [decided]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as botocore's and aiohttp's connection pools expect
    owner: S3Proxy

    def log_message(self, *args) -> None:   # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():   # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _relay(self) -> None:
        arrived = time.time()
        body = self._body()
        path = urlsplit(self.path).path
        key = unquote(path.lstrip("/").partition("/")[2])
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        faults = _faults(self.owner.decide(Request(self.command, key, headers)))
        names = {f if isinstance(f, str) else f[0]: (None if isinstance(f, str) else f[1]) for f in faults}
        what = ",".join(names) or "forwarded"
        if "cut" in names:
            self.owner.record(self.command, key, what, None, arrived)
            return self._hang_up()
        if "hold" in names:
            time.sleep(names["hold"])
        if "no-if-match" in names:
            headers.pop("if-match", None)
        headers["content-length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        self.owner.record(self.command, key, what, time.time(), arrived)
        if "drop" in names:
            return self._hang_up()
        if "late" in names:
            time.sleep(names["late"])
        self.send_response_only(reply.status, reply.reason)
        for name, value in reply.getheaders():
            lower = name.lower()
            if lower in HOP_BY_HOP or (lower == "content-length" and self.command != "HEAD"):
                continue
            for header, fault in (("date", "date"), ("last-modified", "modified")):
                if lower == header and fault in names:
                    value = formatdate(parsedate_to_datetime(value).timestamp() + names[fault], usegmt=True)
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay
