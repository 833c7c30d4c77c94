"""WSGI plumbing for provfw-api (webob + routes): routing, JSON bodies,
request ids, body limits, token authentication and error mapping.

Every error leaves as ``{"error": {"code": N, "message": "..."}}``; a
``ProvfwError`` keeps its status and message, anything else becomes a 500
that names the request id (the traceback goes to the log, never the client).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import routes
import webob
import webob.dec
import webob.exc
from oslo_context import context as oslo_context

from provfw import exception
from provfw.api import middleware
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
    data = request.body_file.read(limit + 1) if length is None else request.body
    if len(data) > limit:
        raise exception.BodyTooLarge(f"body: larger than the limit of {limit} bytes")
    return data


def json_body(request: webob.Request, limit: int) -> Any:
    data = read_body(request, limit)
    if not data.strip():
        raise exception.InvalidInput("body", "a JSON object is required")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise exception.InvalidInput("body", f"is not valid JSON ({exc})") from None


class Router:
    """Dispatches to ``controller.<action>(request, context, **url_args)`` through a routes.Mapper."""

    def __init__(self, mapper: routes.Mapper, controllers: dict[str, Any], authenticate: Callable):
        self.mapper = mapper
        self.controllers = controllers
        self.authenticate = authenticate

    @webob.dec.wsgify
    def __call__(self, request: webob.Request) -> webob.Response:
        # middleware.RequestLog assigned it (and the thread's log context); called bare (tests), assign one here.
        request_id = request.environ.get(middleware.REQUEST_ID_KEY) or middleware.request_id_of(
            request.headers.get("X-Request-Id"))
        try:
            response = self._dispatch(request, request_id)
        except exception.ProvfwError as exc:
            if exc.code >= 500:
                LOG.error("%s %s %s: %s", request_id, request.method, request.path, exc.message)
            response = error_response(exc.code, exc.message)
        except Exception:  # noqa: BLE001 - never leak a traceback to the client
            LOG.exception("%s %s %s failed", request_id, request.method, request.path)
            response = error_response(500, f"internal error; see the server log for request {request_id}")
        response.headers["X-Request-Id"] = request_id
        return response

    def _dispatch(self, request: webob.Request, request_id: str) -> webob.Response:
        found = self.mapper.routematch(environ=request.environ)
        if found is None:
            if self.mapper.match(request.path_info) is not None:
                raise _MethodNotAllowed(f"{request.method} is not allowed on {request.path_info}")
            raise exception.NotFound(f"no such resource: {request.path_info}")
        match, route = dict(found[0]), found[1]
        request.environ[middleware.ROUTE_KEY] = route.routepath       # the metrics' bounded route label
        controller = self.controllers[match.pop("controller")]
        action = match.pop("action")
        public = match.pop("public", False)
        context = None if public else self.authenticate(request, request_id)
        request.environ[middleware.CONTEXT_KEY] = context              # the access line's token name
        return getattr(controller, action)(request, context, **match)


class _MethodNotAllowed(exception.ProvfwError):
    code = 405
