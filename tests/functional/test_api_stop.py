"""provfw-api (eventlet) stops on SIGTERM while it is busy, every time, and finishes what it answered.

systemd stops a unit with SIGTERM and SIGKILLs it after ``TimeoutStopSec``.  The
first handler raised SystemExit from the signal handler; whenever the signal
landed in a weakref callback or a ``__del__`` (frequent under load) Python
printed "Exception ignored" and the server kept serving.  Found stopping the
API in ``benchmarks/bench_api.py``; rare (12 stops under load here did not
reproduce it), so this guards the behaviour - stop within seconds, exit 0,
no 5xx to requests in flight, and no request run whose client got no answer
(see ``provfw.cmd.api.HttpProtocol``) - rather than that race.  The handler that
replaced it logged from inside the handler and hung here once in CI (no line
after the SIGTERM); ``tests/unit/test_signals.py`` replays that race
deterministically.  Real provfw-api, PostgreSQL, RabbitMQ.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.lib import deployment as deploy
from tests.lib.stopload import Hammer, run_unanswered

pytestmark = pytest.mark.functional

CLIENTS = 6
STOPS = 4


def test_sigterm_under_load_stops_the_api_within_seconds_each_time():
    with deploy.Deployment("postgresql") as dep:
        for attempt in range(STOPS):
            dep.start_api(conductor=False)
            with Hammer(dep.port, dep.admin_token, CLIENTS, tag=f"stop{attempt}") as load:
                assert load.wait_for(50), dep.tail("api")
                sent = time.monotonic()
                dep.api.send_signal(signal.SIGTERM)
                try:
                    code = dep.api.wait(8)
                except Exception:               # noqa: BLE001 - report, then let the deployment SIGKILL it
                    pytest.fail(f"attempt {attempt}: provfw-api still running 8 s after SIGTERM:\n{dep.tail('api')}")
            took = time.monotonic() - sent
            log = dep.tail("api", 100_000)
            assert code == 0, dep.tail("api")
            assert took < 3.0, f"attempt {attempt}: stopping took {took:.1f} s"
            assert load.failures == [], f"5xx answers while stopping: {load.failures}\n{dep.tail('api')}"
            assert run_unanswered(log, load.unanswered) == [], f"run, but never answered: {load.unanswered}"
            assert dep.tail("api", 5).count("provfw-api stopped") == 1, dep.tail("api")
