"""End to end on embedded defaults: ``provfw-all-in-one`` (SQLite, in-process bus) driven by the ``provfw`` CLI,
enforcing on a hypervisor namespace with real packets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.lib import deployment as deploy
from tests.lib import netns, services

pytestmark = pytest.mark.e2e

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def aio(tmp_path_factory):
    services.require_root_netns()
    services.require_tools("iptables-restore", "ping")
    workdir = tmp_path_factory.mktemp("aio")
    port = deploy.free_port()
    with netns.RoutedTopology() as topo:
        config = workdir / "provfw.conf"
        config.write_text(f"""[DEFAULT]
state_path = {workdir}/state
[api]
bind_port = {port}
[compute]
host = aio-host
dataplane_netns = {topo.hv}
firewall_driver = iptables
""")
        log = open(workdir / "aio.log", "wb")
        proc = subprocess.Popen([os.path.join(BIN, "provfw-all-in-one"), "--config-file", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
            yield {"url": url, "token": token, "topo": topo, "workdir": workdir}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


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
