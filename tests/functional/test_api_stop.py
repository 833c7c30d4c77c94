"""provfw-api (eventlet) stops on SIGTERM while it is busy, every time, and finishes what it answered.

systemd stops a unit with SIGTERM and SIGKILLs it after ``TimeoutStopSec``.  The
first handler raised SystemExit from the signal handler; whenever the signal
landed in a weakref callback or a ``__del__`` (frequent under load) Python
printed "Exception ignored" and the server kept serving.  Found stopping the
API in ``benchmarks/bench_api.py``; rare (12 stops under load here did not
reproduce it), so this guards the behaviour - stop within seconds, exit 0,
no 5xx to requests in flight - rather than that race.  The handler that
replaced it logged from inside the handler and hung here once in CI (no line
after the SIGTERM); ``tests/unit/test_signals.py`` replays that race
deterministically.  Real provfw-api, PostgreSQL, RabbitMQ.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest

from tests.lib import deployment as deploy

pytestmark = pytest.mark.functional

CLIENTS = 6
STOPS = 4


def _hammer(port: int, token: str, index: int, stop: threading.Event, answers: list, failures: list) -> None:
    """Block and unblock one address over one keep-alive connection until the server goes away."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"X-Auth-Token": token, "Content-Type": "application/json"}
    address = f"198.51.100.{index + 1}"
    paths = ("/v1/block-external-addresses", "/v1/remove-external-address-block")
    n = 0
    while not stop.is_set():
        try:
            conn.request("POST", paths[n % 2], json.dumps({"cidr": address}), headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            return                                  # the server closed the connection: stopping
        if response.status >= 500:
            failures.append(response.status)
        answers.append(response.status)
        n += 1


def test_sigterm_under_load_stops_the_api_within_seconds_each_time():
    with deploy.Deployment("postgresql") as dep:
        for attempt in range(STOPS):
            dep.start_api(conductor=False)
            stop, answers, failures = threading.Event(), [], []
            clients = [threading.Thread(target=_hammer, args=(dep.port, dep.admin_token, i, stop, answers, failures))
                       for i in range(CLIENTS)]
            for client in clients:
                client.start()
            deadline = time.monotonic() + 10
            while len(answers) < 50 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(answers) >= 50, dep.tail("api")
            sent = time.monotonic()
            dep.api.send_signal(signal.SIGTERM)
            try:
                code = dep.api.wait(8)
            except Exception:               # noqa: BLE001 - report, then let the deployment SIGKILL it
                pytest.fail(f"attempt {attempt}: provfw-api still running 8 s after SIGTERM:\n{dep.tail('api')}")
            finally:
                stop.set()
                for client in clients:
                    client.join(15)
            took = time.monotonic() - sent
            assert code == 0, dep.tail("api")
            assert took < 3.0, f"attempt {attempt}: stopping took {took:.1f} s"
            assert failures == [], f"5xx answers while stopping: {failures}\n{dep.tail('api')}"
            assert dep.tail("api", 5).count("provfw-api stopped") == 1, dep.tail("api")
