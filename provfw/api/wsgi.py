"""WSGI plumbing for provfw-api (webob + routes): routing, request validation
against the contract (``provfw.api.schemas``), request ids, body limits, token
authentication and error mapping.

Every error leaves as ``{"error": {"code": N, "message": "..."}}``; a
``ProvfwError`` keeps its status and message, anything else becomes a 500
that names the request id (the traceback goes to the log, never the client).

Before a controller runs, the Router has authenticated the caller and checked
the path parameters (404), the query string (400), the Content-Type (415), the
body's size (413), encoding and schema (400); the controller reads the checked
values with ``query()`` and ``body()``.  Nothing the client sends reaches a
controller, and so the database, unchecked.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from typing import Any, Callable

import routes
import webob
import webob.dec
import webob.exc
from oslo_context import context as oslo_context

from provfw import exception
from provfw.api import middleware, schemas
from provfw.db import api as db

LOG = logging.getLogger(__name__)

ROLE_ADMIN = "admin"
ROLE_READER = "reader"


class Context(oslo_context.RequestContext):
    """Who is calling: the token's name and role, and the request id for the audit log.

    An oslo.context RequestContext stored for the current thread, so oslo.log
    puts the request id and the token name (as the user) in every line logged
    while the request is handled.
    """

    def __init__(self, actor: str, role: str, request_id: str):
        super().__init__(request_id=request_id, user_id=actor, user_name=actor, roles=[role],
                         is_admin=role == ROLE_ADMIN, overwrite=True)
        self.actor = actor
        self.role = role

    def require_admin(self) -> None:
        if not self.is_admin:
            raise exception.Forbidden(f"token {self.actor!r} has role {self.role!r}; this action needs 'admin'")

    def audit(self, reason: str | None = None) -> db.Audit:
        return db.Audit(actor=self.actor, request_id=self.request_id, reason=reason)


def json_response(body: Any, status: int = 200) -> webob.Response:
    response = webob.Response(status=status, content_type="application/json", charset="utf-8")
    response.text = json.dumps(body, default=str)
    return response


def error_response(code: int, message: str) -> webob.Response:
    return json_response({"error": {"code": code, "message": message}}, status=code)


def read_body(request: webob.Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes; refuse bigger bodies without reading them all."""
    length = request.content_length
    if length is not None and length > limit:
        raise exception.BodyTooLarge(f"body: {length} bytes is larger than the limit of {limit} bytes")
    if length is None:
        # A chunked body has no Content-Length; eventlet's input decodes the chunks and ends with the last
        # one, but does not set wsgi.input_terminated, so webob's body_file would read it as empty.
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        data = (request.environ["wsgi.input"] if chunked else request.body_file).read(limit + 1)
    else:
        data = request.body
    if len(data) > limit:
        raise exception.BodyTooLarge(f"body: larger than the limit of {limit} bytes")
    return data


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise exception.InvalidInput(key, "is given more than once")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise exception.InvalidInput("body", f"is not valid JSON ({name} is not a JSON number)")


def _check_unicode(value: Any) -> None:
    """Refuse strings holding lone surrogates ("\\ud800" is valid JSON syntax but not Unicode text: no
    database can store it, PostgreSQL and MariaDB refuse it at the driver)."""
    stack: list[tuple[Any, str]] = [(value, "body")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise exception.InvalidInput(where, "contains a lone UTF-16 surrogate; text must be valid "
                                                    "Unicode") from None
        elif isinstance(item, dict):
            for key, child in item.items():
                name = key if where == "body" else f"{where}.{key}"
                stack.append((key, name))
                stack.append((child, name))
        elif isinstance(item, list):
            stack.extend((child, f"{'' if where == 'body' else where}[{i}]") for i, child in enumerate(item))


def decode_json(data: bytes) -> Any:
    """Decode a request body as strict JSON: UTF-8, no NaN/Infinity, no duplicate fields, no lone surrogates.

    Raises ``InvalidInput`` ("body: ..." or naming the field).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise exception.InvalidInput("body", "is not UTF-8") from None
    if not text.strip():
        raise exception.InvalidInput("body", "is empty; a JSON value is required")
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_fields)
    except RecursionError:
        raise exception.InvalidInput("body", "is nested too deeply") from None
    except ValueError as exc:   # also integers longer than Python's 4300-digit conversion limit
        raise exception.InvalidInput("body", f"is not valid JSON ({str(exc)[:200]})") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(value)
    return value


# A decoded string can hold a lone surrogate only through a \uD800-\uDFFF escape: strict UTF-8 decoding
# (above) refuses encoded surrogates.  Where the text has no such escape (a false hit, such as an escaped
# backslash before "ud800", only costs the walk), the walk over every string - 0.1 s for a 120k-entry
# import - is skipped.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


QUERY_KEY = "provfw.query"
BODY_KEY = "provfw.body"
MEDIA_KEY = "provfw.media_type"
MAX_QUERY_FIELDS = 64


def query(request: webob.Request) -> dict[str, Any]:
    """The query parameters the Router checked against the operation's schema, typed (integers as int)."""
    return request.environ[QUERY_KEY]


def body(request: webob.Request) -> Any:
    """The body the Router decoded and checked: the JSON value, or the text of a text/plain body."""
    return request.environ[BODY_KEY]


def media_type(request: webob.Request) -> str | None:
    """The media type of the body the Router accepted (``application/json`` or ``text/plain``)."""
    return request.environ.get(MEDIA_KEY)


def _path_text(request: webob.Request) -> str:
    """The request path for messages and logs, whatever bytes it holds (PEP 3333 gives them as latin-1)."""
    raw = request.environ.get("PATH_INFO", "")
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return repr(raw)


class Router:
    """Dispatches to ``controller.<action>(request, context, **url_args)`` through a routes.Mapper.

    Every action the mapper routes to must have an ``Operation`` in ``operations`` (the contract); the
    Router refuses to start otherwise.  ``body_limits(name)`` returns the byte limit an operation's
    ``body_limit`` names (default: every body is limited to 64 KiB).
    """

    METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

    def __init__(self, mapper: routes.Mapper, controllers: dict[str, Any], authenticate: Callable,
                 operations: dict[str, schemas.Operation] | None = None,
                 body_limits: Callable[[str], int] | None = None):
        self.mapper = mapper
        self.controllers = controllers
        self.authenticate = authenticate
        self.operations = schemas.OPERATIONS if operations is None else operations
        self.body_limits = body_limits or (lambda name: 64 * 1024)
        missing = sorted({route.defaults.get("action") for route in mapper.matchlist} - set(self.operations))
        if missing:
            raise exception.ConfigError(f"routes without an operation in the API contract: {missing}")

    @webob.dec.wsgify
    def __call__(self, request: webob.Request) -> webob.Response:
        # middleware.RequestLog assigned it (and the thread's log context); called bare (tests), assign one here.
        request_id = request.environ.get(middleware.REQUEST_ID_KEY) or middleware.request_id_of(
            request.headers.get("X-Request-Id"))
        try:
            response = self._dispatch(request, request_id)
        except exception.ProvfwError as exc:
            if exc.code >= 500:
                LOG.error("%s %s %s: %s", request_id, request.method, _path_text(request), exc.message)
            response = error_response(exc.code, exc.message)
            if isinstance(exc, exception.MethodNotAllowed):
                response.headers["Allow"] = ", ".join(exc.allowed)
        except Exception:  # noqa: BLE001 - never leak a traceback to the client
            LOG.exception("%s %s %s failed", request_id, request.method, _path_text(request))
            response = error_response(500, f"internal error; see the server log for request {request_id}")
        response.headers["X-Request-Id"] = request_id
        return response

    def _allowed(self, environ: dict) -> list[str]:
        return [method for method in self.METHODS
                if self.mapper.match(environ={**environ, "REQUEST_METHOD": method}) is not None]

    def _dispatch(self, request: webob.Request, request_id: str) -> webob.Response:
        found = self.mapper.routematch(environ=request.environ)
        if found is None:
            allowed = self._allowed(request.environ)
            if allowed:
                raise exception.MethodNotAllowed(f"{request.method} is not allowed on {_path_text(request)}", allowed)
            raise exception.NotFound(f"no such resource: {_path_text(request)}")
        match, route = dict(found[0]), found[1]
        request.environ[middleware.ROUTE_KEY] = route.routepath       # the metrics' bounded route label
        controller = self.controllers[match.pop("controller")]
        action = match.pop("action")
        operation = self.operations[action]
        context = None if operation.public else self.authenticate(request, request_id)
        request.environ[middleware.CONTEXT_KEY] = context              # the access line's token name
        match.update(self._path_parameters(operation, match))
        request.environ[QUERY_KEY] = self._query(operation, request)
        if operation.body is not None:
            media, value = self._body(operation, request)
            request.environ[MEDIA_KEY] = media
            request.environ[BODY_KEY] = value
        return getattr(controller, action)(request, context, **match)

    @staticmethod
    def _path_parameters(operation: schemas.Operation, match: dict[str, Any]) -> dict[str, Any]:
        """Path parameters typed by their schema; one outside its schema names no resource: 404."""
        values: dict[str, Any] = {}
        for name, schema in operation.path_params.items():
            raw = match.get(name, "")
            try:
                text = raw.encode("latin-1").decode("utf-8")
                value = schemas.coerce_parameter(name, text, schema)
                schemas.validate_parameters(operation.action, "path", {name: value})
            except (UnicodeEncodeError, UnicodeDecodeError, exception.InvalidInput):
                raise exception.NotFound(f"{name}: {raw[:40]!r} names no resource here") from None
            values[name] = value
        return values

    @staticmethod
    def _query(operation: schemas.Operation, request: webob.Request) -> dict[str, Any]:
        """The query string as the operation's parameters, typed and checked (400 naming the parameter)."""
        raw = request.environ.get("QUERY_STRING", "")
        try:
            pairs = urllib.parse.parse_qsl(raw.encode("latin-1").decode("utf-8"), keep_blank_values=True,
                                           encoding="utf-8", errors="strict", max_num_fields=MAX_QUERY_FIELDS)
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise exception.InvalidInput("query", "is not percent-encoded UTF-8") from None
        except ValueError:
            raise exception.InvalidInput("query", f"has more than {MAX_QUERY_FIELDS} parameters") from None
        values: dict[str, Any] = {}
        for name, text in pairs:
            if name in values:
                raise exception.InvalidInput(name[:40], "is given more than once")
            schema = operation.query.get(name)
            values[name] = text if schema is None else schemas.coerce_parameter(name, text, schema)
        return schemas.validate_parameters(operation.action, "query", values)

    def _body(self, operation: schemas.Operation, request: webob.Request) -> tuple[str, Any]:
        """The body, checked: 415 for a media type the operation does not take, 413 past the limit, 400 for
        bytes that are not UTF-8 (or JSON) or a value outside the schema."""
        assert operation.body is not None
        media = (request.content_type or "").lower()
        charset = (request.headers.get("Content-Type", "").lower().partition("charset=")[2].split(";")[0]
                   .strip().strip('"'))
        accepted = ", ".join(operation.body)
        if media not in operation.body:
            shown = media[:60] or "missing"
            raise exception.UnsupportedMediaType(f"Content-Type: {shown}; this operation takes {accepted}")
        if charset not in ("", "utf-8", "utf8"):
            raise exception.UnsupportedMediaType(f"Content-Type: charset {charset[:20]!r}; only utf-8 is accepted")
        data = read_body(request, self.body_limits(operation.body_limit))
        if media == schemas.JSON:
            return media, schemas.validate(operation.body[media], decode_json(data))
        try:
            return media, data.decode("utf-8")
        except UnicodeDecodeError:
            raise exception.InvalidInput("body", "is not UTF-8 text") from None
