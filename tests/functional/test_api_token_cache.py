"""``[api] token_cache_ttl``: what a revocation (``provfw-manage token revoke``) does to an API process that has
the token cached - it stops working within the TTL, at once with 0 - through the real application and
database (``provfw.api.auth``, docs/operations.md)."""

from __future__ import annotations

import secrets
import time

import pytest

from provfw.api import router
from provfw.compute import api as compute_api
from provfw.db import api as db
from tests.functional.test_api_operations import call

pytestmark = pytest.mark.functional


@pytest.fixture
def make_app(conf, sqlite_db):
    conf.set_override("control_exchange", "cache-test-" + secrets.token_hex(4))

    def make(ttl: float):
        conf.set_override("token_cache_ttl", ttl, group="api")
        return router.build_app(conf, compute_api.ComputeAPI(conf))
    return make


def new_token(role: str = "reader") -> tuple[str, str]:
    name = f"cache-{secrets.token_hex(3)}"
    return name, db.api_token_create(name, role)


def test_with_no_cache_a_revoked_token_is_refused_at_once(make_app):
    app = make_app(0)
    name, token = new_token()
    assert call(app, "GET", "/v1/provider-fw-rules", token).status_int == 200
    db.api_token_revoke(name)
    assert call(app, "GET", "/v1/provider-fw-rules", token).status_int == 401


def test_a_revoked_token_keeps_working_until_its_cache_entry_expires_and_no_longer(make_app):
    ttl = 1.0
    app = make_app(ttl)
    name, token = new_token()
    cached_at = time.monotonic()                                      # the entry expires ttl after its look-up
    assert call(app, "GET", "/v1/provider-fw-rules", token).status_int == 200
    db.api_token_revoke(name)
    statuses = []
    while time.monotonic() - cached_at < ttl + 1.0:
        statuses.append((time.monotonic() - cached_at, call(app, "GET", "/v1/provider-fw-rules", token).status_int))
        time.sleep(0.05)
    refused = [when for when, status in statuses if status == 401]
    assert refused, statuses
    assert all(status == 200 for when, status in statuses if when < refused[0])      # then never accepted again
    assert all(status == 401 for when, status in statuses if when >= refused[0])
    assert ttl <= refused[0] <= ttl + 0.5, refused[0]


def test_the_cache_keeps_a_tokens_role_and_never_remembers_a_refusal(make_app):
    app = make_app(60)
    _, reader = new_token("reader")
    assert call(app, "GET", "/v1/provider-fw-rules", reader).status_int == 200
    assert call(app, "POST", "/v1/block-external-addresses", reader, {"cidr": "203.0.113.0/24"}).status_int == 403
    assert call(app, "GET", "/v1/provider-fw-rules", "not-a-token").status_int == 401
    _, admin = new_token("admin")                                     # a new token works at once
    assert call(app, "POST", "/v1/block-external-addresses", admin, {"cidr": "203.0.113.0/24"}).status_int == 200
