"""End to end: real provfw-api and provfw-compute processes on RabbitMQ and
PostgreSQL, a worker whose dataplane is a hypervisor namespace, and real
packets from an attacker namespace to an instance namespace."""

from __future__ import annotations

import time

import pytest

from provfw.adminclient import AdminClientError
from tests.lib import deployment as deploy
from tests.lib import netns, services

pytestmark = pytest.mark.e2e

HOST = "hv-e2e-1"


@pytest.fixture(scope="module")
def setup():
    services.require_root_netns()
    services.require_tools("iptables-restore", "ip6tables-restore", "ping")
    services.require_rabbitmq()
    with netns.RoutedTopology() as topo, deploy.Deployment("postgresql", hosts=[HOST]) as dep:
        dep.start_api()
        dep.start_worker(HOST, topo.hv)
        yield dep, topo


def _wait_kernel(topo, cidr: str, present: bool, timeout: float = 1.0) -> float | None:
    return netns.wait_until(lambda: deploy.kernel_has_source(topo.hv, cidr) == present, timeout, interval=0.01)


@pytest.mark.parametrize("family", [4, 6])
def test_block_ips_drops_the_attacker_within_a_second_and_unblock_lets_it_back(setup, family):
    dep, topo = setup
    attackers = topo.ATTACKER4 if family == 4 else topo.ATTACKER6
    instance = topo.INSTANCE4 if family == 4 else topo.INSTANCE6
    blocked_src, other_src = attackers
    cidr = f"{blocked_src}/{32 if family == 4 else 128}"
    assert topo.reachable(blocked_src, instance)

    result = dep.client.block_ips(blocked_src, description="e2e")
    assert result["status"] == "OK" and result["message"] == "Added 3 rules"
    took = _wait_kernel(topo, cidr, True)
    assert took is not None, f"DROP for {cidr} not in the hypervisor's kernel within 1 s: {dep.tail('compute-' + HOST)}"
    assert topo.blocked(blocked_src, instance), "blocked source still reaches the instance"
    assert topo.reachable(other_src, instance), "an unblocked address was caught by the block"

    result = dep.client.unblock_ips(blocked_src)
    assert result["message"] == "Deleted 3 rules"
    assert _wait_kernel(topo, cidr, False) is not None
    assert topo.reachable(blocked_src, instance)


def test_services_report_the_worker_in_sync(setup):
    dep, _ = setup
    dep.wait_in_sync(HOST)
    (service,) = [s for s in dep.client.services()["services"] if s["host"] == HOST]
    assert service["state"] == "up" and service["in_sync"] and service["last_error"] is None
    assert service["driver"] == "libvirt/iptables"


def test_reader_token_may_list_but_not_block(setup):
    dep, _ = setup
    from provfw.adminclient import AdminClient

    reader = AdminClient(dep.url, dep.reader_token)
    before = reader.generation()
    reader.list_rules()
    with pytest.raises(AdminClientError) as err:
        reader.block_ips("198.51.100.0/24")
    assert err.value.status == 403
    assert reader.generation() == before


def test_a_worker_that_was_down_converges_when_it_returns(setup):
    """Casts are hints: changes made while a worker is down reach it from the database at start."""
    dep, topo = setup
    src, instance = topo.ATTACKER4[0], topo.INSTANCE4
    dep.stop_worker(HOST)
    try:
        dep.client.block_ips(src)
        # The stopped worker left the kernel as it was: nothing new was enforced, nothing was flushed.
        assert not deploy.kernel_has_source(topo.hv, f"{src}/32")
    finally:
        dep.start_worker(HOST, topo.hv)
    assert deploy.kernel_has_source(topo.hv, f"{src}/32")
    assert topo.blocked(src, instance)
    dep.client.unblock_ips(src)
    assert _wait_kernel(topo, f"{src}/32", False) is not None


def test_a_stopped_worker_keeps_enforcing_what_it_applied(setup):
    dep, topo = setup
    src, instance = topo.ATTACKER4[1], topo.INSTANCE4
    dep.client.block_ips(src)
    assert _wait_kernel(topo, f"{src}/32", True) is not None
    dep.stop_worker(HOST)
    try:
        assert dep.tail(f"compute-{HOST}", 1).rstrip().endswith(
            "provfw-compute stopped: the kernel keeps the rules last applied")
        time.sleep(0.2)
        assert topo.blocked(src, instance), "stopping the worker opened the block"
    finally:
        dep.start_worker(HOST, topo.hv)
        dep.client.unblock_ips(src)
    assert _wait_kernel(topo, f"{src}/32", False) is not None


def test_bulk_import_through_the_real_api_on_postgresql(setup):
    """Past the bulk threshold the import takes the COPY path, which must work under eventlet."""
    dep, topo = setup
    feed = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(2500)]     # benchmarking range, not the topology's
    result = dep.client.import_rules(feed, protocol="udp", description="feed")
    assert (result["added"], result["duplicate"], result["refused"]) == (2500, 0, 0)
    dep.wait_in_sync(HOST)
    assert deploy.kernel_has_source(topo.hv, "198.19.9.250/32")
    for cidr in feed[:1] + feed[-1:]:
        dep.client.unblock_ips(cidr)
    assert dep.client.list_rules(cidr="198.19.0.1") == []
