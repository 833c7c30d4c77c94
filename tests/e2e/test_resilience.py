"""Resilience end to end: a provfw-compute worker that loses the message bus,
whose conductor loses the database, or that is killed with SIGKILL, keeps
enforcing what it last applied and converges when it can.

RabbitMQ and PostgreSQL are shared with other tests running at the same time,
so they are never stopped: the process under test reaches them through a
``TcpProxy`` that the test cuts (every connection reset, new ones refused) and
restores.  provfw-api talks to both directly, as on a real control node.
Enforcement is checked with real packets: a UDP flood from the blocked source
runs through every cut, and an nftables counter in the instance namespace must
stay at zero.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import urllib.parse

import pytest
import sqlalchemy as sa

from tests.lib.traffic import Flood, InstanceCounter
from tests.lib import deployment as deploy
from tests.lib import netns, services
from tests.lib.tcpproxy import TcpProxy

pytestmark = pytest.mark.e2e

RECONCILE_INTERVAL = 2  # what Deployment configures for every worker
CONSUMING = "fanout consumer consuming"  # logged by FanoutConsumer each time it (re)connects
RESILIENCE_HOSTS = ("hv-res-bus", "hv-res-bus-slow", "hv-res-db", "hv-res-kill")   # one worker per test


@pytest.fixture(scope="module")
def setup():
    services.require_root_netns()
    services.require_tools("iptables-restore", "ip6tables-restore", "iptables-save", "ping", "nft")
    services.require_rabbitmq()
    with netns.RoutedTopology() as topo, deploy.Deployment("postgresql", hosts=RESILIENCE_HOSTS) as dep:
        dep.start_api()
        yield dep, topo, InstanceCounter(topo)


# ----------------------------------------------------------------------------- helpers

def _bus_url_via(proxy: TcpProxy, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{proxy.listen_host}:{proxy.port}" if credentials else f"{proxy.listen_host}:{proxy.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _db_url_via(proxy: TcpProxy, url: str) -> str:
    return sa.engine.make_url(url).set(host=proxy.listen_host, port=proxy.port).render_as_string(hide_password=False)


def _bus_proxy(dep) -> TcpProxy:
    parts = urllib.parse.urlsplit(dep.transport_url.split(",")[0])
    return TcpProxy(parts.hostname, parts.port or 5672)


def _db_proxy(dep) -> TcpProxy:
    url = sa.engine.make_url(dep.database.url)
    return TcpProxy(url.host, url.port or 5432)


class WorkerLog:
    """The worker's log from the moment this object is made (a restarted worker appends to the same file)."""

    def __init__(self, dep, host: str):
        self.path = os.path.join(dep.dir, f"compute-{host}.log")
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def text(self) -> str:
        with open(self.path, errors="replace") as handle:
            handle.seek(self.offset)
            return handle.read()

    def count(self, needle: str) -> int:
        return self.text().count(needle)

    def wait_for(self, needle: str, timeout: float, times: int = 1) -> float | None:
        return netns.wait_until(lambda: self.count(needle) >= times, timeout, interval=0.02)


def _kernel(topo, cidr: str, present: bool, timeout: float) -> float | None:
    return netns.wait_until(lambda: deploy.kernel_has_source(topo.hv, cidr) == present, timeout, interval=0.01)


def _provider_state(topo) -> str:
    """The hypervisor's filter tables, both families, without counters or timestamps."""
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        text = netns.netns_exec(topo.hv, tool, "-t", "filter").stdout
        out += [re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(out)


def _tcp_blocked(topo, src: str) -> bool:
    dst = topo.INSTANCE6 if ":" in src else topo.INSTANCE4
    return not topo.can_connect(src, dst, timeout=0.3)


def _service(dep, host: str) -> tuple[dict, int]:
    info = dep.client.services()
    (row,) = [s for s in info["services"] if s["host"] == host]
    return row, info["generation"]


@contextlib.contextmanager
def _flood(topo, counter, src: str):
    """Flood the instance with UDP from ``src`` for the duration; yields a dict filled with sent/arrived."""
    before = counter.packets()
    flood = Flood(topo, src)
    result: dict = {}
    try:
        yield result
    finally:
        result["sent"] = flood.stop()
        result["arrived"] = counter.packets() - before


def _assert_no_leak(flood: dict, what: str) -> None:
    assert flood["sent"] > 1000, f"the flood sent only {flood['sent']} packets"
    assert flood["arrived"] == 0, f"{flood['arrived']} of {flood['sent']} packets from the blocked source " \
                                  f"reached the instance {what}"


@contextlib.contextmanager
def _worker(dep, topo, host: str, blocked: list[str], **kwargs):
    """A worker for one test; unblocks what the test blocked, then stops the worker."""
    dep.start_worker(host, topo.hv, **kwargs)
    try:
        yield dep.workers[host]
    finally:
        for src in blocked:
            with contextlib.suppress(Exception):
                dep.client.unblock_ips(src)
        if host in dep.workers:
            dep.stop_worker(host)


# ----------------------------------------------------------------------------- broker

def test_while_the_broker_is_cut_the_worker_keeps_enforcing_shows_down_and_converges_when_it_returns(setup):
    """The bus is a worker's only link (no database credentials): cut off, it enforces what it had."""
    dep, topo, counter = setup
    host, (a, b) = "hv-res-bus", topo.ATTACKER4
    log = WorkerLog(dep, host)
    with _bus_proxy(dep) as bus, _worker(dep, topo, host, [a, b],
                                         transport_url=_bus_url_via(bus, dep.compute_url(host))) as proc:
        assert log.wait_for(CONSUMING, 5.0) is not None, log.text()
        assert bus.active_connections >= 1, "the worker's consumer does not go through the proxy"
        dep.client.block_ips(a)
        assert _kernel(topo, f"{a}/32", True, 2.0) is not None, "the cast for A was not applied"

        with _flood(topo, counter, a) as flood:
            bus.cut()
            assert log.wait_for("lost the bus", 2.0) is not None, log.text()
            dep.client.block_ips(b)  # the API publishes on RabbitMQ directly; this worker misses the cast
            # Its reports stop too: after service_down_time (5 s) the API shows it down.
            assert netns.wait_until(lambda: _service(dep, host)[0]["state"] == "down", 10.0, 0.2) is not None
            assert proc.poll() is None, "the worker died when the broker went away"
            assert deploy.kernel_has_source(topo.hv, f"{a}/32")
            assert not deploy.kernel_has_source(topo.hv, f"{b}/32")
        _assert_no_leak(flood, "while the broker was cut")
        assert _tcp_blocked(topo, a)

        accepted = bus.accepted
        restored = time.monotonic()
        bus.restore()
        assert log.wait_for(CONSUMING, 10.0, times=2) is not None, f"the consumer never reconnected: {log.text()}"
        assert bus.accepted > accepted
        assert _kernel(topo, f"{b}/32", True, RECONCILE_INTERVAL + 3.0) is not None, log.text()
        dep.wait_in_sync(host, timeout=5.0)
        row, generation = _service(dep, host)
        assert row["state"] == "up" and row["applied_generation"] == generation and row["last_error"] is None
        assert _tcp_blocked(topo, a) and _tcp_blocked(topo, b)
        print(f"converged {time.monotonic() - restored:.2f}s after the broker returned")


def test_after_the_broker_returns_the_consumer_resyncs_and_casts_apply_at_once(setup):
    """With a 10-minute periodic check, only a cast or the reconnect resync can apply anything in seconds."""
    dep, topo, counter = setup
    host, (a, b), c = "hv-res-bus-slow", topo.ATTACKER4, topo.ATTACKER6[0]
    log = WorkerLog(dep, host)
    with _bus_proxy(dep) as bus, _worker(dep, topo, host, [a, b, c], extra="reconcile_interval = 600",
                                         transport_url=_bus_url_via(bus, dep.compute_url(host))) as proc:
        assert log.wait_for(CONSUMING, 5.0) is not None, log.text()
        assert bus.active_connections >= 1, "the worker's consumer does not go through the proxy"
        dep.client.block_ips(a)
        assert _kernel(topo, f"{a}/32", True, 2.0) is not None, "the cast for A was not applied"

        bus.cut()
        assert log.wait_for("lost the bus", 2.0) is not None, log.text()
        dep.client.block_ips(b)
        # Control: the cast is really lost and nothing else applies B while the bus is cut.
        assert _kernel(topo, f"{b}/32", True, 1.0) is None, "B applied while cut: the test proves nothing"
        assert proc.poll() is None and deploy.kernel_has_source(topo.hv, f"{a}/32")

        restored = time.monotonic()
        bus.restore()
        assert log.wait_for(CONSUMING, 10.0, times=2) is not None, f"the consumer never reconnected: {log.text()}"
        reconnected = time.monotonic() - restored
        # On reconnect the worker checks the generation: B arrives without waiting 600 s.
        assert _kernel(topo, f"{b}/32", True, 2.0) is not None, f"B not applied after reconnecting: {log.text()}"

        dep.client.block_ips(c)
        took = _kernel(topo, f"{c}/128", True, 2.0)
        assert took is not None, f"a cast after the reconnect was not applied within 2 s: {log.text()}"
        assert _tcp_blocked(topo, b) and _tcp_blocked(topo, c)
        print(f"consumer reconnected {reconnected:.2f}s after restore; next cast applied in {took * 1000:.0f} ms")


# ----------------------------------------------------------------------------- database

def test_while_the_database_is_cut_hosts_still_apply_casts_and_their_state_catches_up_when_it_returns(setup):
    """Workers have no database; the conductor does.  Cut the conductor's database: a cast that carries the
    change is applied on the host at once, the host's state report waits in the conductor, and a host that
    must ask the conductor keeps what it enforces until the database is back."""
    dep, topo, counter = setup
    host, (a, b), c = "hv-res-db", topo.ATTACKER4, topo.ATTACKER6[0]
    log = WorkerLog(dep, host)
    dep.stop_conductors()
    assert dep.tail("conductor-0", 1).rstrip().endswith("provfw-conductor stopped")
    with _db_proxy(dep) as database:
        dep.start_conductor(database_url=_db_url_via(database, dep.database.url))
        try:
            with _worker(dep, topo, host, [a, b, c]) as proc:
                assert database.active_connections >= 1, "the conductor does not reach the database via the proxy"
                dep.client.block_ips(a)
                assert _kernel(topo, f"{a}/32", True, 2.0) is not None

                with _flood(topo, counter, a) as flood:
                    database.cut()
                    row_before, _ = _service(dep, host)
                    dep.client.block_ips(b)       # the API has its own database path; the cast carries the rules
                    assert _kernel(topo, f"{b}/32", True, 2.0) is not None, \
                        f"a cast carrying the change needs no database: {log.text()}"
                    assert proc.poll() is None, "the worker died when the database went away"
                    time.sleep(RECONCILE_INTERVAL + 1.0)     # periodic checks reach a conductor without a database
                    row_cut, generation = _service(dep, host)
                    assert deploy.kernel_has_source(topo.hv, f"{a}/32")
                _assert_no_leak(flood, "while the database was cut")
                # The conductor cannot write reports: the row is frozen behind the host.
                assert row_cut["applied_generation"] == row_before["applied_generation"] < generation
                assert _tcp_blocked(topo, a) and _tcp_blocked(topo, b)

                restored = time.monotonic()
                database.restore()
                dep.wait_in_sync(host, timeout=RECONCILE_INTERVAL + 10.0)
                row, generation = _service(dep, host)
                assert row["applied_generation"] == generation and row["state"] == "up"
                dep.client.block_ips(c)
                assert _kernel(topo, f"{c}/128", True, 2.0) is not None
                print(f"state caught up {time.monotonic() - restored:.2f}s after the database returned")
        finally:
            dep.stop_conductors()
            dep.start_conductor()


# ----------------------------------------------------------------------------- SIGKILL

class _KernelSampler:
    """Reads the hypervisor's iptables in a loop; counts samples without the DROP for ``cidr`` or the first jump."""

    def __init__(self, topo, cidr: str):
        self.topo, self.cidr = topo, cidr
        self.samples = self.missing = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            lines = netns.netns_exec(self.topo.hv, "iptables-save", "-t", "filter").stdout.splitlines()
            forward = [line for line in lines if line.startswith("-A FORWARD ")]
            jump_first = bool(forward) and forward[0].endswith("-j nova-provider")
            dropped = any(line.startswith(f"-A nova-provider -s {self.cidr} ") for line in lines)
            self.samples += 1
            if not (jump_first and dropped):
                self.missing += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_worker_killed_with_sigkill_leaves_its_rules_and_a_new_one_converges_without_flushing(setup):
    dep, topo, counter = setup
    host, (a, b) = "hv-res-kill", topo.ATTACKER4
    with _worker(dep, topo, host, [a, b]):
        dep.client.block_ips(a)
        assert _kernel(topo, f"{a}/32", True, 2.0) is not None

        with _flood(topo, counter, a) as flood:
            dep.stop_worker(host, signal.SIGKILL)
            assert deploy.kernel_has_source(topo.hv, f"{a}/32"), "SIGKILL removed the rule"
            dep.client.block_ips(b)  # cast to nobody: the new worker must find it in the database
            sampler = _KernelSampler(topo, f"{a}/32")
            try:
                dep.start_worker(host, topo.hv)  # waits until it reports the current generation
                time.sleep(0.2)
            finally:
                sampler.stop()
        _assert_no_leak(flood, "across the SIGKILL and the restart")
        assert sampler.samples >= 10, f"only {sampler.samples} kernel samples during the restart"
        assert sampler.missing == 0, f"A or the FORWARD jump was missing in {sampler.missing} of " \
                                     f"{sampler.samples} samples during the restart"
        assert deploy.kernel_has_source(topo.hv, f"{b}/32")
        assert _tcp_blocked(topo, a) and _tcp_blocked(topo, b)
        row, generation = _service(dep, host)
        assert row["applied_generation"] == generation and row["last_error"] is None
        print(f"restart: {sampler.samples} kernel samples, none missing; {flood['sent']} flood packets, 0 through")
