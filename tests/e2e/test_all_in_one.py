"""End to end on embedded defaults: ``provfw-all-in-one`` (SQLite, in-process bus) driven by the ``provfw`` CLI,
enforcing on a hypervisor namespace with real packets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from prometheus_client.parser import text_string_to_metric_families

from tests.lib import deployment as deploy
from tests.lib import netns, services

pytestmark = pytest.mark.e2e

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def aio(tmp_path_factory):
    services.require_root_netns()
    services.require_tools("iptables-restore", "ping")
    workdir = tmp_path_factory.mktemp("aio")
    port, metrics_port = deploy.free_port(), deploy.free_port()
    # systemd's side of sd_notify: a datagram socket whose messages the tests read, with a 2 s watchdog.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notifications: list[tuple[float, str]] = []

    def listen() -> None:
        while True:
            try:
                data = notify.recv(4096)
            except OSError:
                return
            notifications.extend((time.monotonic(), line) for line in data.decode().split("\n"))

    threading.Thread(target=listen, daemon=True).start()
    with netns.RoutedTopology() as topo:
        config = deploy.all_in_one_config(workdir, port, metrics_port, host="aio-host", dataplane_netns=topo.hv,
                                          firewall_driver="iptables")
        log = open(workdir / "aio.log", "wb")
        env = {**os.environ, "NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": "2000000"}
        proc = subprocess.Popen([os.path.join(BIN, "provfw-all-in-one"), "--config-file", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    requests.get(url + "/healthz", timeout=1).raise_for_status()
                    break
                except requests.RequestException:
                    assert proc.poll() is None, (workdir / "aio.log").read_text()
                    time.sleep(0.1)
            token = (workdir / "state" / "admin-token").read_text().strip()
            assert oct((workdir / "state" / "admin-token").stat().st_mode & 0o777) == "0o600"
            yield {"url": url, "token": token, "topo": topo, "workdir": workdir,
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "notifications": notifications,
                   "proc": proc}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            notify.close()


def cli(aio, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([os.path.join(BIN, "provfw"), "--url", aio["url"], "--token", aio["token"], *args],
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_block_and_unblock_on_the_all_in_one(aio):
    topo = aio["topo"]
    src, other = topo.ATTACKER4
    assert cli(aio, "block", src, "--description", "from the CLI").stdout.startswith(f"blocked {src}/32: 3 rules added")
    took = netns.wait_until(lambda: deploy.kernel_has_source(topo.hv, f"{src}/32"), 1.0, 0.01)
    assert took is not None, "the in-process bus did not deliver the cast within a second"
    assert topo.blocked(src, topo.INSTANCE4)
    assert topo.reachable(other, topo.INSTANCE4)
    duplicate = cli(aio, "block", src, check=False)
    assert duplicate.returncode == 1 and "Duplicate rule" in duplicate.stderr
    assert cli(aio, "unblock", src).stdout.startswith(f"unblocked {src}/32: 3 rules deleted")
    assert netns.wait_until(lambda: not deploy.kernel_has_source(topo.hv, f"{src}/32"), 1.0, 0.01) is not None
    assert topo.reachable(src, topo.INSTANCE4)


def test_cli_import_reports_counts_and_the_worker_applies_them(aio):
    feed = aio["workdir"] / "feed.txt"
    # 198.19/16: the benchmarking range outside the topology's 198.18.1/24 and 198.18.2/24 (100.64/10, used
    # before, is carrier-grade NAT space, which the API refuses to block by default).
    lines = ["# test feed"] + [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(2000)] + ["bogus", "198.19.0.1"]
    feed.write_text("\n".join(lines) + "\n")
    result = cli(aio, "import", str(feed), "--chunk", "1000", "--progress", "-o", "json")
    import json

    summary = json.loads(result.stdout)
    assert (summary["added"], summary["duplicate"], summary["refused"]) == (2000, 1, 1)
    assert summary["refused_lines"][0]["line"] == 2002
    assert "2003/2003 lines" in result.stderr  # the progress bar reached the end
    generation = summary["generation"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        (svc,) = json.loads(cli(aio, "services", "--json").stdout)
        if svc["applied_generation"] == generation:
            break
        time.sleep(0.1)
    assert svc["applied_generation"] == generation and svc["rule_count"] == 2000 and svc["last_error"] is None
    assert deploy.kernel_has_source(aio["topo"].hv, "198.19.7.250/32")


def test_cli_without_a_token_explains_how_to_get_one(aio):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVFW_")}
    env["HOME"] = str(aio["workdir"])
    result = subprocess.run([os.path.join(BIN, "provfw"), "--url", aio["url"], "rules"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2 and "provfw-manage token create" in result.stderr


def scrape(aio) -> dict:
    """{(name, ((label, value), ...)): value} from the all-in-one's one metrics endpoint."""
    found = {}
    text = requests.get(aio["metrics"], timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(values: dict, name: str) -> float:
    return sum(value for (sample, _labels), value in values.items() if sample == name)


def test_blocking_a_cidr_moves_the_generation_the_applied_generation_and_the_apply_histogram(aio):
    before = scrape(aio)
    assert before[("provfw_database_up", ())] == 1 and before[("provfw_bus_connected", ())] == 1
    assert before[("provfw_applied_generation", ())] == before[("provfw_generation", ())]
    applies = total(before, "provfw_dataplane_apply_seconds_count")
    src = "203.0.113.99"
    assert cli(aio, "block", src).returncode == 0
    deadline = time.monotonic() + 10
    while True:
        after = scrape(aio)
        if after[("provfw_applied_generation", ())] == before[("provfw_generation", ())] + 1:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.1)
    assert after[("provfw_generation", ())] == before[("provfw_generation", ())] + 1
    assert after[("provfw_rules_applied", ())] == before[("provfw_rules_applied", ())] + 3
    assert total(after, "provfw_dataplane_apply_seconds_count") > applies
    assert after[("provfw_active_rules", (("protocol", "tcp"),))] == before[("provfw_active_rules",
                                                                             (("protocol", "tcp"),))] + 1
    route = (("method", "POST"), ("route", "/v1/block-external-addresses"), ("status", "200"))
    assert after[("provfw_api_requests_total", route)] == before.get(("provfw_api_requests_total", route), 0) + 1
    deadline = time.monotonic() + 15                  # the conductor writes the worker's report within ~1 s
    while scrape(aio)[("provfw_service_generation_lag", (("host", "aio-host"),))] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cli(aio, "unblock", src)


def test_systemd_hears_ready_after_the_first_apply_and_then_watchdog_pings(aio):
    deadline = time.monotonic() + 10
    while sum(1 for _at, line in aio["notifications"] if line == "WATCHDOG=1") < 3:
        assert time.monotonic() < deadline, aio["notifications"]
        time.sleep(0.1)
    lines = [line for _at, line in aio["notifications"]]
    assert lines.count("READY=1") == 1
    assert lines.index("READY=1") < lines.index("WATCHDOG=1")
    # Nothing but STATUS lines before READY: READY=1 came with the first apply, not before it.
    assert all(line.startswith("STATUS=") for line in lines[:lines.index("READY=1")])
    pings = [at for at, line in aio["notifications"] if line == "WATCHDOG=1"]
    assert all(0.5 < later - earlier < 2.0 for earlier, later in zip(pings, pings[1:]))     # WatchdogSec/2 = 1 s


def test_sigterm_stops_the_all_in_one_cleanly_and_the_kernel_keeps_the_rules(aio):
    # Last in this module: it stops the shared all-in-one.  SIGTERM is systemd's stop; it used to kill the
    # process outright (exit -15, the worker and conductor never stopped, nothing logged).
    assert cli(aio, "block", "198.51.100.77").returncode == 0
    assert deploy.netns_wait(lambda: deploy.kernel_has_source(aio["topo"].hv, "198.51.100.77/32"), 10)
    proc = aio["proc"]
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0 and time.monotonic() - started < 5
    log = (aio["workdir"] / "aio.log").read_text()
    assert "signal 15: stopping the API, the worker and the conductor" in log
    assert log.index("provfw-all-in-one stopped: the kernel keeps the rules last applied") > log.index("signal 15")
    assert any(line == "STOPPING=1" for _, line in aio["notifications"])
    assert deploy.kernel_has_source(aio["topo"].hv, "198.51.100.77/32")            # still enforced
    # A clean stop closes the database: SQLite checkpoints its write-ahead log and removes -wal / -shm.
    assert sorted(path.name for path in (aio["workdir"] / "state").glob("provfw.sqlite*")) == ["provfw.sqlite"]
