"""The WSGI middleware around provfw-api's router: request id, access log line, request metrics.

Design
------
``RequestLog(app)`` is the outermost layer, so it sees every request,
including the ones the router refuses:

* **Request id.** A client's ``X-Request-Id`` (printable, at most 64
  characters) is kept, anything else replaced by ``req-<uuid4>``; it is put in
  ``environ["provfw.request_id"]`` for the router (audit records, the
  ``X-Request-Id`` answer header) and in an oslo.context ``RequestContext``
  stored for the current thread (greenthread under eventlet), which
  oslo.log's formatters read: every line logged while the request is handled,
  by any module, carries ``[request_id token-name ...]`` (text) or the
  ``context`` fields (JSON), without passing anything down.  The router
  replaces that context with the authenticated one (``wsgi.Context``), which
  adds the token name.
* **Access log.** One INFO line on the ``provfw.api.access`` logger when the
  answer's last byte was handed to the server (``close()``), as
  ``METHOD PATH status=N bytes=N duration_ms=F token=NAME request_id=ID``
  (``token=-`` for unauthenticated requests); the fields are also attached to
  the record as ``record.extra``, the dict oslo.log's JSONFormatter publishes
  under ``"extra"``.
* **Metrics.** ``provfw_api_requests_total{route,method,status}`` and
  ``provfw_api_request_seconds{route,method}``; ``route`` is the routes
  template the router matched (``/v1/provider-fw-rules/{id}``) or
  ``unmatched``, never the raw path, so label values stay bounded.

Thread-safety: no shared state besides prometheus_client's metrics; the
context is thread-local.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable, Iterable

from oslo_context import context as oslo_context

from provfw import metrics

ACCESS_LOG = logging.getLogger("provfw.api.access")

REQUEST_ID_KEY = "provfw.request_id"
ROUTE_KEY = "provfw.route"
CONTEXT_KEY = "provfw.context"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_id_of(header: str | None) -> str:
    """The client's request id when it is printable and at most 64 characters, else a new ``req-<uuid4>``."""
    if header and len(header) <= 64 and header.isprintable() and " " not in header:
        return header
    return f"req-{uuid.uuid4()}"


class RequestLog:
    """WSGI middleware: request id + oslo.context, one access line and the request metrics per request."""

    def __init__(self, app: Callable):
        self.app = app

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.monotonic()
        request_id = request_id_of(environ.get("HTTP_X_REQUEST_ID"))
        environ[REQUEST_ID_KEY] = request_id
        oslo_context.RequestContext(request_id=request_id, overwrite=True)
        status: list[str] = []

        def capture(status_line: str, headers, exc_info=None):
            status[:] = [status_line]
            return start_response(status_line, headers, exc_info)

        try:
            body = self.app(environ, capture)
        except BaseException:
            # The server answers 500 itself; count and log it as such.
            _finish(environ, "500 Internal Server Error", 0, started)
            raise
        return _Body(body, environ, status, started)


class _Body:
    """The answer's iterable; counts the bytes and finishes the request's log line and metrics on close()."""

    def __init__(self, body: Iterable[bytes], environ: dict, status: list[str], started: float):
        self._body = body
        self._environ = environ
        self._status = status
        self._started = started
        self._bytes = 0
        self._done = False

    def __iter__(self):
        for chunk in self._body:
            self._bytes += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if not self._done:
                self._done = True
                _finish(self._environ, self._status[0] if self._status else "500 Internal Server Error",
                        self._bytes, self._started)


def _finish(environ: dict, status_line: str, size: int, started: float) -> None:
    seconds = time.monotonic() - started
    status = int(status_line.split(" ", 1)[0])
    method = environ.get("REQUEST_METHOD", "")
    route = environ.get(ROUTE_KEY) or "unmatched"
    label_method = method if method in METHODS else "other"
    metrics.API_REQUESTS.labels(route, label_method, str(status)).inc()
    metrics.API_REQUEST_SECONDS.labels(route, label_method).observe(seconds)
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if environ.get("QUERY_STRING"):
        path += "?" + environ["QUERY_STRING"]
    context = environ.get(CONTEXT_KEY)
    token = getattr(context, "actor", None) or "-"
    request_id = environ.get(REQUEST_ID_KEY)
    ACCESS_LOG.info("%s %s status=%d bytes=%d duration_ms=%.1f token=%s request_id=%s", method, path, status, size,
                    seconds * 1000.0, token, request_id,
                    extra={"extra": {"http_method": method, "http_path": path, "http_status": status,
                                     "http_bytes": size, "duration_ms": round(seconds * 1000.0, 3),
                                     "token_name": token, "route": route}})
