"""Expiry end to end: a rule with a ttl stops being enforced on every host within a second of its expiry,
with provfw-api and every conductor stopped and one host cut off from the broker, and each worker does it
from its own timer, without a full rebuild."""

from __future__ import annotations

import datetime
import signal
import subprocess
import time

import pytest

from provfw import rules
from provfw.virt.firewall import ipset, sets
from tests.lib import deployment as deploy
from tests.lib import netns, services
from tests.lib.tcpproxy import TcpProxy

pytestmark = pytest.mark.e2e


def ipset_holds(ns: str, spec: rules.RuleSpec) -> bool:
    name = ipset.DRIVER_SETS.name(sets.match_key(spec))
    return subprocess.run(["ip", "netns", "exec", ns, "ipset", "test", name, ipset.member(spec.cidr)],
                          capture_output=True).returncode == 0


def _via(proxy: TcpProxy, url: str) -> str:
    credentials, _, rest = url.partition("://")[2].rpartition("@")
    return f"rabbit://{credentials}@127.0.0.1:{proxy.port}/{rest.partition('/')[2]}"


def test_expired_rules_stop_on_every_host_within_a_second_with_api_conductor_and_broker_away():
    services.require_root_netns()
    services.require_tools("ipset", "iptables-restore", "ping")
    services.require_rabbitmq()
    with netns.RoutedTopology() as topo_a, netns.RoutedTopology() as topo_b, \
            deploy.Deployment("postgresql", firewall_driver="ipset", hosts=["hv-exp-a", "hv-exp-b"]) as dep, \
            TcpProxy("127.0.0.1", 5672) as bus:
        dep.start_api()
        dep.start_worker("hv-exp-a", topo_a.hv)
        dep.start_worker("hv-exp-b", topo_b.hv, transport_url=_via(bus, dep.compute_url("hv-exp-b")))
        src = topo_a.ATTACKER4[0]
        spec = rules.make_spec(src, "all")
        keeper = rules.make_spec("198.51.100.0/24", "all")   # a rule without expiry keeps the set alive
        dep.client.create_rule(keeper.cidr, "all")
        rule = dep.client.create_rule(src, "all", ttl=6)     # covers the set-up below (about 3 s)
        expires_at = datetime.datetime.fromisoformat(rule["expires_at"].rstrip("Z")).replace(
            tzinfo=datetime.timezone.utc).timestamp()
        dep.wait_in_sync()
        for topo in (topo_a, topo_b):
            assert ipset_holds(topo.hv, spec)
        assert topo_a.blocked(src, topo_a.INSTANCE4)

        # The API and every conductor go away, and host b loses the broker: the workers' own timers must do
        # the rest.
        deploy._stop(dep.api, signal.SIGTERM)
        dep.api = None
        dep.stop_conductors()
        bus.cut()
        wait = expires_at - time.time()
        assert wait > 0.2, "the set-up took longer than the ttl; raise the ttl"
        time.sleep(max(0.0, wait - 0.2))
        for topo in (topo_a, topo_b):
            took = netns.wait_until(lambda: not ipset_holds(topo.hv, spec), 3.0, 0.02)
            assert took is not None
            assert time.time() - expires_at <= 1.0, f"still enforced {time.time() - expires_at:.2f}s after expiry"
            assert ipset_holds(topo.hv, keeper)
        assert topo_a.reachable(src, topo_a.INSTANCE4)
        # Each worker expired the rule from its own timer (the delta path), not from a database change.
        for host in ("hv-exp-a", "hv-exp-b"):
            log = dep.tail("compute-" + host, 200)
            assert "stopped enforcing 1 expired rule(s)" in log
