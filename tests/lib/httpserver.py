"""A real HTTP server on 127.0.0.1 for feed tests: serves block-list files as a publisher would.

Each path is a ``Published`` list: its bytes, whether the server honours
conditional requests (ETag / Last-Modified -> 304), and how it misbehaves
on demand (an error status, a trickle, a lying or missing Content-Length, a
gzip Content-Encoding).  Every request is recorded (path and the
conditional headers it carried), so tests can tell a 304 from a download.
"""

from __future__ import annotations

import dataclasses
import email.utils
import gzip
import hashlib
import http.server
import os
import threading
import time

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


def data_file(*parts: str) -> bytes:
    """The bytes of tests/data/<parts...>."""
    with open(os.path.join(DATA, *parts), "rb") as handle:
        return handle.read()


@dataclasses.dataclass
class Published:
    body: bytes
    status: int = 200
    etag: bool = True
    last_modified: bool = True
    gzip: bool = False
    content_length: bool = True
    trickle: float = 0.0                 # seconds between 1-byte writes
    modified_at: float = dataclasses.field(default_factory=lambda: time.time() - 3600)

    def set(self, body: bytes) -> None:
        self.body = body
        self.modified_at = time.time()

    @property
    def tag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


class FeedServer:
    """``url(path)``; ``publish(path, body, **options)``; ``requests`` lists (path, headers, status) answered."""

    def __init__(self):
        self.lists: dict[str, Published] = {}
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):      # keep test output clean
                pass

            def do_GET(self):                   # noqa: N802 - http.server's naming
                with server._lock:
                    published = server.lists.get(self.path)
                if published is None:
                    return self._send(404, b"not found\n")
                if published.status != 200:
                    return self._send(published.status, b"<html><body>temporarily unavailable</body></html>\n")
                headers = {}
                if published.etag:
                    headers["ETag"] = published.tag
                    if self.headers.get("If-None-Match") == published.tag:
                        return self._send(304, b"", headers)
                if published.last_modified:
                    headers["Last-Modified"] = email.utils.formatdate(published.modified_at, usegmt=True)
                    since = self.headers.get("If-Modified-Since")
                    if since and not published.etag:
                        parsed = email.utils.parsedate_to_datetime(since).timestamp()
                        if int(published.modified_at) <= parsed:
                            return self._send(304, b"", headers)
                body = published.body
                if published.gzip:
                    body = gzip.compress(body)
                    headers["Content-Encoding"] = "gzip"
                self._send(200, body, headers, published.content_length, published.trickle)

            def _send(self, status, body, headers=None, length=True, trickle=0.0):
                with server._lock:
                    server.requests.append((self.path, dict(self.headers.items()), status))
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if length or status == 304:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if status == 304:
                    return
                try:
                    if trickle:
                        for i in range(len(body)):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(trickle)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="feed-server", daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def publish(self, path: str, body: bytes, **options) -> Published:
        published = Published(body, **options)
        with self._lock:
            self.lists[path] = published
        return published

    def answered(self, path: str) -> list[int]:
        """The statuses of the GETs of ``path`` so far, in order."""
        with self._lock:
            return [status for p, _, status in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
