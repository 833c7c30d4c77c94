"""What an operator sees of provfw-api: access log lines, request ids in every line, request metrics, the
conductor's scrape-time gauges, and the health check."""

from __future__ import annotations

import io
import json
import logging
import secrets

import pytest
import webob
from oslo_log import formatters
from prometheus_client import exposition
from prometheus_client.parser import text_string_to_metric_families

from provfw import metrics
from provfw.api import router
from provfw.compute import api as compute_api
from provfw.conductor import manager as conductor_manager
from provfw.conductor import metrics as conductor_metrics
from provfw.db import api as db
from provfw.rules import make_spec

pytestmark = pytest.mark.functional


@pytest.fixture
def app(conf, sqlite_db):
    conf.set_override("control_exchange", "ops-test-" + secrets.token_hex(4))
    yield router.build_app(conf, compute_api.ComputeAPI(conf))


def call(app, method: str, path: str, token: str | None = None, body=None, headers=None) -> webob.Response:
    request = webob.Request.blank(path, method=method)
    if token:
        request.headers["X-Auth-Token"] = token
    if body is not None:
        request.body = json.dumps(body).encode()
        request.content_type = "application/json"
    for key, value in (headers or {}).items():
        request.headers[key] = value
    response = request.get_response(app)
    response.body                     # read it all, as a server does (webob then closes the app's iterable)
    return response


@pytest.fixture
def log_lines(conf):
    """Everything logged under 'provfw' while the test runs, formatted by oslo.log's ContextFormatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatters.ContextFormatter(project="provfw", version="test", config=conf))
    logger = logging.getLogger("provfw")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: stream.getvalue().splitlines()
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_each_request_logs_one_access_line_with_its_request_id_and_token_name(app, log_lines):
    token = db.api_token_create("alice-" + secrets.token_hex(2), "admin")
    name = db.api_token_get_by_secret(token).name
    response = call(app, "POST", "/v1/block-external-addresses", token, {"cidr": "203.0.113.0/24"},
                    headers={"X-Request-Id": "req-ops-1"})
    assert response.status_int == 200 and response.headers["X-Request-Id"] == "req-ops-1"
    access = [line for line in log_lines() if "provfw.api.access" in line]
    assert len(access) == 1
    line = access[0]
    assert " INFO provfw.api.access " in line
    assert f"POST /v1/block-external-addresses status=200 bytes={len(response.body)} duration_ms=" in line
    assert f"token={name} request_id=req-ops-1" in line


def test_lines_logged_by_the_code_handling_a_request_carry_its_request_id_and_token(app, log_lines):
    token = db.api_token_create("bob-" + secrets.token_hex(2), "admin")
    name = db.api_token_get_by_secret(token).name
    call(app, "POST", "/v1/block-external-addresses", token, {"cidr": "198.51.100.0/24"},
         headers={"X-Request-Id": "req-ops-2"})
    # The audit line is logged by the db layer after commit: nothing passed it the request id.
    audit = [line for line in log_lines() if "provfw.audit" in line]
    assert len(audit) == 1 and f"[None req-ops-2 {name} " in audit[0]
    assert json.loads(audit[0].split("] ", 1)[1])["action"] == "cidr.block"


def test_an_unauthenticated_request_is_logged_without_a_token_and_gets_a_fresh_request_id(app, log_lines):
    response = call(app, "GET", "/v1/provider-fw-rules", headers={"X-Request-Id": "has spaces in it"})
    assert response.status_int == 401
    request_id = response.headers["X-Request-Id"]
    assert request_id.startswith("req-") and request_id != "has spaces in it"
    (line,) = [line for line in log_lines() if "provfw.api.access" in line]
    assert "GET /v1/provider-fw-rules status=401" in line and f"token=- request_id={request_id}" in line


def sample(registry, name: str, labels: dict) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_request_metrics_are_labelled_by_route_template_never_by_raw_path(app):
    token = db.api_token_create("carol-" + secrets.token_hex(2), "reader")
    route = {"route": "/v1/provider-fw-rules/{id}", "method": "GET", "status": "404"}
    before = sample(metrics.API, "provfw_api_requests_total", route)
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    before_unmatched = sample(metrics.API, "provfw_api_requests_total", unmatched)
    timed = {"route": "/v1/provider-fw-rules/{id}", "method": "GET"}
    count_before = sample(metrics.API, "provfw_api_request_seconds_count", timed)
    for rule_id in (12345, 67890):
        assert call(app, "GET", f"/v1/provider-fw-rules/{rule_id}", token).status_int == 404
    assert call(app, "GET", "/no/such/thing", token).status_int == 404
    assert sample(metrics.API, "provfw_api_requests_total", route) == before + 2
    assert sample(metrics.API, "provfw_api_requests_total", unmatched) == before_unmatched + 1
    assert sample(metrics.API, "provfw_api_request_seconds_count", timed) == count_before + 2
    # Every label value of every sample: a raw path would make one series per id (an unbounded label). The
    # values alone, since a *_created timestamp can spell 12345 by chance (1.796138123456655e+09 once did).
    exported = exposition.generate_latest(metrics.API).decode()
    labels = {value for family in text_string_to_metric_families(exported)
              for sample_ in family.samples for value in sample_.labels.values()}
    assert "/v1/provider-fw-rules/{id}" in labels
    assert not any("12345" in value or "67890" in value or "/no/such/thing" in value for value in labels)


def test_health_answers_ok_with_the_generation(app):
    response = call(app, "GET", "/healthz")
    assert response.status_int == 200 and response.json == {"status": "ok", "generation": 0}


def test_health_answers_503_naming_a_database_without_the_schema(app, tmp_path):
    db.configure(f"sqlite:///{tmp_path}/never-synced.sqlite")           # reachable, no tables
    response = call(app, "GET", "/healthz")
    assert response.status_int == 503
    assert response.json == {"status": "unavailable",
                             "reason": "the database has no provfw schema: run 'provfw-manage db sync'"}


def scrape(collector) -> dict:
    registry = metrics.registry_for()
    registry.register(collector)
    found = {}
    for family in text_string_to_metric_families(exposition.generate_latest(registry).decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_the_conductor_collector_reads_generation_rules_and_host_lag_from_the_database_on_scrape(conf, sqlite_db):
    manager = conductor_manager.ConductorManager(conf)
    collector = conductor_metrics.ConductorCollector(manager, conf.compute.service_down_time)
    db.provider_fw_rules_create_many([make_spec("203.0.113.0/24", "tcp"), make_spec("203.0.113.0/24", "udp"),
                                      make_spec("198.51.100.0/24", "tcp")])
    db.provider_fw_rule_create(make_spec("192.0.2.0/24"))
    db.service_update("hv-1", heartbeat=True, applied_generation=2, rule_count=4)
    db.service_update("hv-2", heartbeat=True, applied_generation=1, rule_count=3)
    manager.stats["requests"] += 7
    values = scrape(collector)
    assert values[("provfw_database_up", ())] == 1
    assert values[("provfw_generation", ())] == 2
    assert values[("provfw_active_rules", (("protocol", "tcp"),))] == 2
    assert values[("provfw_active_rules", (("protocol", "all"),))] == 1
    assert values[("provfw_active_rules", (("protocol", "icmp"),))] == 0
    assert values[("provfw_service_up", (("host", "hv-1"),))] == 1
    assert values[("provfw_service_generation_lag", (("host", "hv-1"),))] == 0
    assert values[("provfw_service_generation_lag", (("host", "hv-2"),))] == 1
    assert values[("provfw_conductor_requests_total", ())] == 7

    db.provider_fw_rule_destroy_by_cidr("203.0.113.0/24")
    values = scrape(collector)                         # read again on the next scrape: nothing cached
    assert values[("provfw_generation", ())] == 3
    assert values[("provfw_active_rules", (("protocol", "tcp"),))] == 1
    assert values[("provfw_service_generation_lag", (("host", "hv-2"),))] == 2


def test_the_conductor_collector_reports_database_down_instead_of_failing_the_scrape(conf, sqlite_db, tmp_path):
    manager = conductor_manager.ConductorManager(conf)
    collector = conductor_metrics.ConductorCollector(manager, conf.compute.service_down_time)
    db.configure(f"sqlite:///{tmp_path}/not-migrated.sqlite")     # no tables: every read fails
    values = scrape(collector)
    assert values[("provfw_database_up", ())] == 0
    assert ("provfw_generation", ()) not in values


def test_the_wsgi_application_starts_no_background_thread(sqlite_db, tmp_path, monkeypatch):
    import importlib
    import threading

    from psycopg2 import extensions

    from provfw import conf as provfw_conf

    config = tmp_path / "provfw.conf"
    config.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\n[database]\nconnection = {sqlite_db.url}\n")
    monkeypatch.setenv("PROVFW_CONFIG_FILE", str(config))        # read by the module's own application too
    before = set(threading.enumerate())
    try:
        wsgi_app = importlib.import_module("provfw.api.wsgi_app")
        application = wsgi_app.init_application()
        token = db.api_token_create("threads-" + secrets.token_hex(2), "admin")
        blocked = call(application, "POST", "/v1/block-external-addresses", token, {"cidr": "192.0.2.0/24"})
        assert blocked.status_int == 200
        assert call(application, "GET", "/healthz").status_int == 200
        started = [thread.name for thread in set(threading.enumerate()) - before]
        assert started == [], f"the request process runs background threads: {started}"
        # psycopg2 waits with time limits in the server's threads (tests/functional/test_psycopg_wait.py)
        assert extensions.get_wait_callback().__module__ == "provfw.cmd.psycopg_wait"
    finally:
        extensions.set_wait_callback(None)
        provfw_conf.CONF.reset()
        provfw_conf.CONF.clear()


def test_with_use_json_each_line_is_a_json_object_carrying_the_request_id_and_token(app):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatters.JSONFormatter())
    logger = logging.getLogger("provfw.api.access")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        token = db.api_token_create("json-" + secrets.token_hex(2), "reader")
        name = db.api_token_get_by_secret(token).name
        call(app, "GET", "/v1/provider-fw-rules", token, headers={"X-Request-Id": "req-json-1"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["context"]["request_id"] == "req-json-1" and record["context"]["user_name"] == name
    assert record["extra"]["http_status"] == 200 and record["extra"]["route"] == "/v1/provider-fw-rules"
    assert record["extra"]["token_name"] == name and record["levelname"] == "INFO"
