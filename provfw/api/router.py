"""The provfw-api WSGI application: URL map -> AdminController, inside the request-log middleware.

Every route here has an ``Operation`` in ``provfw/api/schemas.py`` (what it takes and answers, and whether it
is public); the Router refuses to start otherwise, and a test keeps this map and the published OpenAPI
document in step.
"""

from __future__ import annotations

import routes
from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.api import admin, auth, middleware, wsgi
from provfw.compute import api as compute_api


def build_mapper() -> routes.Mapper:
    mapper = routes.Mapper()

    def connect(path: str, action: str, method: str) -> None:
        mapper.connect(path, controller="admin", action=action, conditions={"method": [method]})

    connect("/", "versions", "GET")
    connect("/healthz", "health", "GET")
    connect("/v1/openapi.json", "openapi", "GET")
    connect("/v1/provider-fw-rules", "index", "GET")
    connect("/v1/provider-fw-rules", "create", "POST")
    connect("/v1/provider-fw-rules/import", "import_rules", "POST")
    connect("/v1/provider-fw-rules/{id}", "show", "GET")
    connect("/v1/provider-fw-rules/{id}", "delete", "DELETE")
    connect("/v1/provider-fw-sources", "sources", "GET")
    connect("/v1/feeds", "feed_index", "GET")
    connect("/v1/feeds", "feed_create", "POST")
    connect("/v1/feeds/{name}", "feed_show", "GET")
    connect("/v1/feeds/{name}", "feed_update", "PATCH")
    connect("/v1/feeds/{name}", "feed_delete", "DELETE")
    connect("/v1/feeds/{name}/sync", "feed_sync", "POST")
    connect("/v1/block-external-addresses", "block_external_addresses", "POST")
    connect("/v1/external-address-blocks", "list_blocks", "GET")
    connect("/v1/remove-external-address-block", "remove_block", "POST")
    connect("/v1/services", "services", "GET")
    connect("/v1/audit-log", "audit_log", "GET")
    return mapper


def build_app(conf: cfg.ConfigOpts = provfw_conf.CONF, compute: compute_api.ComputeAPI | None = None):
    """The WSGI app; ``compute`` defaults to a ComputeAPI on ``conf.transport_url``.

    The router sits inside ``middleware.RequestLog`` (request id and log
    context, access log line, request metrics).
    """
    controller = admin.AdminController(conf, compute or compute_api.ComputeAPI(conf))
    authenticate = auth.TokenAuthenticator(conf.api.token_cache_ttl)
    return middleware.RequestLog(wsgi.Router(build_mapper(), {"admin": controller}, authenticate,
                                             body_limits=lambda option: getattr(conf.api, option)))
