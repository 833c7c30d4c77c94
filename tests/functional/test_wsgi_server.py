"""provfw.api.wsgi_app under gunicorn (gthread workers, a real subprocess) on PostgreSQL reached through a
TCP proxy the test can cut: the API serves, logs each request, and its health check and every other route
answer 503 with the reason while the database is unreachable, then 200 again once it is back."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
import requests

from provfw.db import api as db
from tests.lib import services
from tests.lib.deployment import free_port
from tests.lib.tcpproxy import TcpProxy

pytestmark = pytest.mark.functional

BIN = os.path.dirname(sys.executable)


def wait_for(url: str, proc: subprocess.Popen, log, timeout: float = 60.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=2)
        except requests.RequestException:
            assert proc.poll() is None, f"gunicorn exited:\n{log()}"
            assert time.monotonic() < deadline, f"no answer from {url} in {timeout}s:\n{log()}"
            time.sleep(0.2)


@pytest.fixture
def gunicorn_api(pg_db, tmp_path):
    services.require_tools(os.path.join(BIN, "gunicorn"))
    proxy = TcpProxy("127.0.0.1", 5432)
    url = pg_db.url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert url != pg_db.url
    config = tmp_path / "provfw.conf"
    config.write_text(f"""[DEFAULT]
state_path = {tmp_path}/state
[database]
connection = {url}
[metrics]
api_port = 0
""")
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    log_file = open(log_path, "wb")
    # XDG_RUNTIME_DIR: gunicorn 25.1+'s control socket goes there, not to the ~/.gunicorn every instance shares
    env = {**os.environ, "PROVFW_CONFIG_FILE": str(config), "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = subprocess.Popen([os.path.join(BIN, "gunicorn"), "--workers", "2", "--worker-class", "gthread",
                             "--threads", "4", "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
                             "provfw.api.wsgi_app:application"],
                            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        yield {"url": base, "proxy": proxy, "proc": proc, "log": lambda: log_path.read_text()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        log_file.close()
        proxy.close()


def test_gunicorn_serves_the_api_and_logs_each_request_with_its_request_id_and_token(gunicorn_api):
    api = gunicorn_api
    assert wait_for(api["url"] + "/healthz", api["proc"], api["log"]).status_code == 200
    name = "gunicorn-" + secrets.token_hex(3)
    token = db.api_token_create(name, "admin")
    headers = {"X-Auth-Token": token, "X-Request-Id": "req-gunicorn-1"}
    blocked = requests.post(api["url"] + "/v1/block-external-addresses", json={"cidr": "203.0.113.0/24"},
                            headers=headers, timeout=10)
    assert blocked.status_code == 200, blocked.text
    assert blocked.headers["X-Request-Id"] == "req-gunicorn-1"
    listed = requests.get(api["url"] + "/v1/external-address-blocks", headers={"X-Auth-Token": token}, timeout=10)
    assert listed.json()["blocks"] == [{"cidr": "203.0.113.0/24", "rules": 3}]
    assert [r.action for r in db.audit_get_all()] == ["cidr.block"]
    deadline = time.monotonic() + 5
    while "request_id=req-gunicorn-1" not in api["log"]() and time.monotonic() < deadline:
        time.sleep(0.1)
    access = [line for line in api["log"]().splitlines() if "request_id=req-gunicorn-1" in line]
    assert len(access) == 1 and "provfw.api.access" in access[0], api["log"]()
    assert "POST /v1/block-external-addresses status=200 " in access[0] and f"token={name} " in access[0]
    assert f"[None req-gunicorn-1 {name} " in access[0]              # oslo.log's context prefix


def test_health_answers_503_with_the_reason_while_the_database_is_cut_and_200_once_it_is_back(gunicorn_api):
    api = gunicorn_api
    assert wait_for(api["url"] + "/healthz", api["proc"], api["log"]).status_code == 200
    used, unused = db.api_token_create("used-" + secrets.token_hex(3), "admin"), \
        db.api_token_create("unused-" + secrets.token_hex(3), "admin")
    for _ in range(4):                      # each of the 2 workers caches the token (token_cache_ttl: 10 s)
        assert requests.get(api["url"] + "/v1/provider-fw-rules", headers={"X-Auth-Token": used},
                            timeout=10).status_code == 200
    api["proxy"].cut()
    try:
        down = requests.get(api["url"] + "/healthz", timeout=30)
        assert down.status_code == 503, down.text
        assert down.json() == {"status": "unavailable", "reason": "database unreachable (OperationalError)"}
        # Every other route says the same, so that clients retry: a 503 naming the database, not a generic 500,
        # and for a token the API could not look up, not a 401 that says the token is wrong.
        unreachable = {"error": {"code": 503, "message": "database unreachable (OperationalError)"}}
        for method, path, token, body in (("GET", "/v1/provider-fw-rules", used, None),
                                          ("POST", "/v1/block-external-addresses", used, {"cidr": "192.0.2.0/24"}),
                                          ("GET", "/v1/provider-fw-rules", unused, None)):
            answer = requests.request(method, api["url"] + path, json=body, headers={"X-Auth-Token": token},
                                      timeout=30)
            assert (answer.status_code, answer.json()) == (503, unreachable), (method, path, answer.text)
    finally:
        api["proxy"].restore()
    deadline = time.monotonic() + 20
    while (up := requests.get(api["url"] + "/healthz", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, up.text
        time.sleep(0.2)
    assert up.json()["status"] == "ok"


def test_with_provfw_gunicorn_conf_the_master_serves_the_sum_of_every_workers_request_metrics(sqlite_db, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    services.require_tools(os.path.join(BIN, "gunicorn"))
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "provfw.conf"
    config.write_text(f"""[DEFAULT]
state_path = {tmp_path}/state
[database]
connection = {sqlite_db.url}
[api]
bind_port = {port}
[metrics]
api_port = {metrics_port}
""")
    token = db.api_token_create("metrics-" + secrets.token_hex(3), "reader")
    log_path = tmp_path / "gunicorn.log"
    env = {**os.environ, "PROVFW_CONFIG_FILE": str(config), "PROVFW_API_WORKERS": "3",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([os.path.join(BIN, "gunicorn"), "-c", "python:provfw.api.gunicorn_conf",
                                 "provfw.api.wsgi_app:application"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            assert wait_for(base + "/healthz", proc, log_path.read_text).status_code == 200
            # Fresh connections, so the requests spread over the workers.
            headers = {"X-Auth-Token": token, "Connection": "close"}
            for _ in range(30):
                assert requests.get(base + "/v1/provider-fw-rules", headers=headers, timeout=10).status_code == 200
            pids = {line.split("pid: ")[1].split(")")[0] for line in log_path.read_text().splitlines()
                    if "Booting worker with pid" in line}
            assert len(pids) == 3, log_path.read_text()
            text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for family in text_string_to_metric_families(text) for s in family.samples}
            route = (("method", "GET"), ("route", "/v1/provider-fw-rules"), ("status", "200"))
            assert values[("provfw_api_requests_total", route)] == 30
            assert not any(name.startswith(("provfw_rules_applied", "provfw_conductor_")) for name, _ in values)
            files = os.listdir(tmp_path / "prometheus")
            assert len({f.rsplit("_", 1)[1] for f in files if f.startswith("counter_")}) >= 2   # several writers
            # gunicorn's control socket is this API's own, not the one ~/.gunicorn/gunicorn.ctl of every instance
            assert (tmp_path / "state" / "gunicorn-api.ctl").is_socket(), log_path.read_text()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
    assert os.listdir(tmp_path / "prometheus"), "a directory the operator named stays, with its files"


def test_without_a_multiprocess_directory_gunicorn_conf_makes_one_and_removes_it_at_exit(sqlite_db, tmp_path):
    # Found by stop 28's newcomer: each run left a /tmp/provfw-api-metrics-* directory behind.
    services.require_tools(os.path.join(BIN, "gunicorn"))
    port = free_port()
    config = tmp_path / "provfw.conf"
    config.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\n[database]\nconnection = {sqlite_db.url}\n"
                      f"[api]\nbind_port = {port}\n[metrics]\napi_port = 0\n")
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(PROVFW_CONFIG_FILE=str(config), PROVFW_API_WORKERS="1", TMPDIR=str(tmp_path))
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([os.path.join(BIN, "gunicorn"), "-c", "python:provfw.api.gunicorn_conf",
                                 "provfw.api.wsgi_app:application"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            assert wait_for(f"http://127.0.0.1:{port}/healthz", proc, log_path.read_text).status_code == 200
            made = [path for path in tmp_path.iterdir() if path.name.startswith("provfw-api-metrics-")]
            assert len(made) == 1 and any(made[0].iterdir()), log_path.read_text()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
    assert not made[0].exists(), log_path.read_text()
