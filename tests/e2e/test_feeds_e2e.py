"""End to end: a feed the real provfw-conductor fetches from a local HTTP server, and replace-syncs that reach a
real provfw-compute worker's kernel, checked with real packets between namespaces (PostgreSQL, RabbitMQ)."""

from __future__ import annotations

import time

import pytest

from tests.lib import deployment as deploy
from tests.lib import netns, services
from tests.lib.httpserver import FeedServer

pytestmark = pytest.mark.e2e

HOST = "hv-feeds-1"
FEEDS_CONF = """
[feeds]
poll_interval = 0.2
min_interval = 1
"""


@pytest.fixture(scope="module")
def setup():
    services.require_root_netns()
    services.require_tools("iptables-restore", "ip6tables-restore", "ping")
    services.require_rabbitmq()
    server = FeedServer()
    try:
        with netns.RoutedTopology() as topo, \
                deploy.Deployment("postgresql", extra_conf=FEEDS_CONF, hosts=[HOST]) as dep:
            dep.start_api()
            dep.start_worker(HOST, topo.hv)
            yield dep, topo, server
    finally:
        server.close()


def listing(*addresses: str) -> bytes:
    return ("# NOC honeypot list\n" + "\n".join(addresses) + "\n").encode()


def wait(predicate, timeout: float = 10.0) -> float | None:
    return netns.wait_until(predicate, timeout, interval=0.05)


def wait_synced(dep, name: str, before: str | None, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        feed = dep.client.get_feed(name)
        if feed["last_sync"] != before and not feed["syncing"]:
            return feed
        time.sleep(0.1)
    raise AssertionError(f"feed {name} not synced: {dep.client.get_feed(name)}\n{dep.tail('conductor-0')}")


def test_a_feed_fetched_by_the_conductor_blocks_on_the_worker_and_a_changed_list_moves_the_block(setup):
    dep, topo, server = setup
    first, second = topo.ATTACKER4
    published = server.publish("/noc.txt", listing(first, "203.0.113.0/24", "198.51.100.7"))
    assert topo.reachable(first, topo.INSTANCE4)

    dep.client.create_feed("noc", server.url("/noc.txt"), 3600, description="honeypots")
    feed = wait_synced(dep, "noc", None)
    assert (feed["last_status"], feed["rules"], feed["counts"]["added"]) == ("ok", 3, 3), feed
    took = wait(lambda: topo.blocked(first, topo.INSTANCE4, timeout=0.3))
    assert took is not None, f"the feed's block did not reach the worker: {dep.tail('compute-' + HOST)}"
    assert topo.reachable(second, topo.INSTANCE4)

    # The publisher drops the first attacker and lists the second: one replace-sync moves the block.
    published.set(listing(second, "203.0.113.0/24", "198.51.100.7"))
    generation = dep.client.generation()
    dep.client.sync_feed("noc")
    feed = wait_synced(dep, "noc", feed["last_sync"])
    assert (feed["last_status"], feed["counts"]["added"], feed["counts"]["removed"]) == ("ok", 1, 1), feed
    assert feed["last_generation"] == generation + 1
    assert wait(lambda: topo.blocked(second, topo.INSTANCE4, timeout=0.3)) is not None
    assert topo.reachable(first, topo.INSTANCE4)
    dep.wait_in_sync(HOST)

    # An unchanged list is a 304 and moves nothing.
    dep.client.update_feed("noc", interval=1)
    time.sleep(2.5)
    statuses = server.answered("/noc.txt")
    assert statuses[:2] == [200, 200] and 304 in statuses[2:], statuses
    assert dep.client.generation() == generation + 1

    # The publisher fails: the last good list stays in force and the failure is reported.
    published.status = 503
    feed = wait_synced(dep, "noc", dep.client.get_feed("noc")["last_sync"])
    feed = dep.client.get_feed("noc")
    assert feed["last_status"] == "fetch_error" and "HTTP 503" in feed["last_error"]
    assert topo.blocked(second, topo.INSTANCE4)

    # Unsubscribing releases the rules on every host.
    dep.client.update_feed("noc", enabled=False)
    removed = dep.client.delete_feed("noc")
    assert (removed["removed"], removed["deleted"]) == (3, 3)
    assert wait(lambda: topo.reachable(second, topo.INSTANCE4, timeout=0.3)) is not None


def test_an_import_replace_sync_reaches_the_worker_in_one_generation(setup):
    dep, topo, _ = setup
    v6 = topo.ATTACKER6[0]
    answer = dep.client.import_rules([v6, "2001:db8:bad::/48"], source="incident-7", mode="replace")
    assert (answer["added"], answer["source"]) == (2, "import:incident-7")
    assert wait(lambda: topo.blocked(v6, topo.INSTANCE6, timeout=0.3)) is not None
    assert topo.reachable(topo.ATTACKER6[1], topo.INSTANCE6)
    # A renewal reaches the worker without touching the kernel rule: still blocked, one generation later.
    renewed = dep.client.import_rules([v6, "2001:db8:bad::/48"], source="incident-7", mode="replace", ttl=86400)
    assert (renewed["renewed"], renewed["generation"]) == (0, answer["generation"])    # never -> 1 day: shorter
    released = dep.client.import_rules([], source="incident-7", mode="replace")
    assert (released["removed"], released["deleted"], released["generation"]) == (2, 2, answer["generation"] + 1)
    assert wait(lambda: topo.reachable(v6, topo.INSTANCE6, timeout=0.3)) is not None
    dep.wait_in_sync(HOST)
