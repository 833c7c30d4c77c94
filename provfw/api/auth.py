"""Token authentication for provfw-api, with a short-lived cache of successful look-ups.

Design
------
Every request carries ``X-Auth-Token``; looking its SHA-256 up in the
database costs a connection checkout and a query per request (about a sixth
of a mutation's time in the API benchmark, docs/benchmarks.md).
``TokenAuthenticator`` remembers a token that authenticated for
``[api] token_cache_ttl`` seconds (default 10): a revocation
(``provfw-manage token revoke``) therefore takes effect within that time in
every API process, which is the trade-off Keystone's middleware makes with
its token cache.  Only successes are cached, keyed by the SHA-256 of the
secret (the secret itself is never kept); an unknown token always goes to
the database, so a new token works at once.  0 disables the cache.

Thread-safety: the cache is a dict replaced entry by entry under a lock;
look-ups outside it (a dict read is atomic).  At most ``MAX_ENTRIES`` tokens
are kept; past that the cache is emptied (tokens are few: people and tools).
"""

from __future__ import annotations

import hashlib
import threading
import time

import webob

from provfw import exception
from provfw.api import wsgi
from provfw.db import api as db

MAX_ENTRIES = 10000


class TokenAuthenticator:
    """``authenticate(request, request_id) -> wsgi.Context``; NotAuthenticated (401), Forbidden (403)."""

    def __init__(self, ttl: float = 10.0, clock=time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[str, tuple[float, str, str]] = {}     # sha256 -> (expires, name, role)
        self._lock = threading.Lock()

    def _lookup(self, secret: str) -> tuple[str, str] | None:
        key = hashlib.sha256(secret.encode()).hexdigest()
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        token = db.api_token_get_by_secret(secret)
        if token is None:
            return None
        if self.ttl > 0:
            with self._lock:
                if len(self._cache) >= MAX_ENTRIES:
                    self._cache.clear()
                self._cache[key] = (now + self.ttl, token.name, token.role)
        return token.name, token.role

    def __call__(self, request: webob.Request, request_id: str) -> wsgi.Context:
        """Authenticate ``X-Auth-Token``; reader tokens may only read (GET, HEAD)."""
        secret = request.headers.get("X-Auth-Token", "").strip()
        if not secret or len(secret) > 512:
            raise exception.NotAuthenticated()
        found = self._lookup(secret)
        if found is None:
            raise exception.NotAuthenticated()
        context = wsgi.Context(found[0], found[1], request_id)
        if request.method not in ("GET", "HEAD"):
            context.require_admin()
        return context
