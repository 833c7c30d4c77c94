"""End to end: concurrent admins on PostgreSQL, and a set-driver host that ends holding exactly the live rules.

Regression test for what already holds (issue 8): 12 clients each make 150
mixed ``block_ips`` / ``unblock_ips`` calls at once against a real
provfw-api (with a conductor and one provfw-compute worker using the ipset
driver in a hypervisor namespace).  The CIDRs come from one small shared
pool, so clients collide all the time: duplicates (409) and unblocks of
nothing (404) are the expected answers; a 5xx or a dropped connection is a
failure.  Once the worker reports the final generation, the members of
the kernel's sets (``ipset save``, read in the namespace) must equal the live
rules read through the db layer.  Measured before this test existed: 172
operations/s, kernel == database.
"""

from __future__ import annotations

import collections
import ipaddress
import random
import threading
import time

import pytest

from provfw.adminclient import AdminClient, AdminClientError, APIUnreachable
from provfw.db import api as db
from provfw.rules import RuleSpec
from provfw.virt.firewall import ipset
from provfw.virt.firewall.sets import match_key
from tests.lib import deployment as deploy
from tests.lib import netns, services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

HOST = "hv-concurrent"
CLIENTS = 12
CALLS = 150
# 40 IPv4 hosts and 20 IPv6 networks shared by every client: most calls collide with another client's.
POOL = ([str(ipaddress.ip_address("100.64.7.0") + i) for i in range(40)]
        + [f"2001:db8:7:{i:x}::/64" for i in range(20)])


def _kernel_members(ns: str) -> set[tuple[str, str]]:
    """(set, member) for every member of provfw's live sets, read from ``ipset save`` in ``ns``."""
    text = netns.netns_exec(ns, "ipset", "save").stdout
    live = {line.split()[1] for line in text.splitlines()
            if line.startswith("create pfw") and not line.split()[1].endswith(("-t", "-check"))}
    return {(words[1], words[2]) for words in (line.split() for line in text.splitlines())
            if words[:1] == ["add"] and words[1] in live}


def _expected_members(rows) -> set[tuple[str, str]]:
    specs = [RuleSpec(r.cidr, r.protocol, r.from_port, r.to_port) for r in rows]
    return {(ipset.DRIVER_SETS.name(match_key(s)), ipset.member(s.cidr)) for s in specs}


def test_twelve_concurrent_clients_end_with_no_server_error_and_the_kernel_holding_exactly_the_live_rules():
    services.require_root_netns()
    services.require_tools("ipset", "iptables-restore")
    services.require_rabbitmq()
    with netns.RoutedTopology(listener=False) as topo, \
            deploy.Deployment("postgresql", firewall_driver="ipset", hosts=[HOST]) as dep:
        dep.start_api()
        dep.start_worker(HOST, topo.hv)
        answers: collections.Counter = collections.Counter()
        failures: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(CLIENTS + 1)

        def client(number: int) -> None:
            api = AdminClient(dep.url, dep.admin_token, timeout=60)
            chance = random.Random(number)
            start.wait()
            for _ in range(CALLS):
                cidr = chance.choice(POOL)
                action = chance.choice(("block", "block", "unblock"))
                try:
                    (api.block_ips if action == "block" else api.unblock_ips)(cidr)
                    outcome = f"{action} 2xx"
                except AdminClientError as exc:
                    outcome = f"{action} {exc.status}"
                    if exc.status >= 500:
                        with lock:
                            failures.append(f"{action} {cidr}: {exc.status} {exc}")
                except APIUnreachable as exc:
                    outcome = f"{action} unreachable"
                    with lock:
                        failures.append(f"{action} {cidr}: {exc}")
                with lock:
                    answers[outcome] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.monotonic()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - began
        total = sum(answers.values())
        print(f"{total} calls by {CLIENTS} clients in {seconds:.1f}s: {total / seconds:.0f} ops/s; {dict(answers)}")

        assert failures == [], f"{len(failures)} server errors, e.g. {failures[:5]}\n{dep.tail('api')}"
        assert total == CLIENTS * CALLS
        assert set(answers) <= {"block 2xx", "block 409", "unblock 2xx", "unblock 404"}, answers
        assert answers["block 2xx"] > 100 and answers["unblock 2xx"] > 100, answers    # real contention, not a no-op

        dep.wait_in_sync(HOST, timeout=60)
        db.configure(dep.database.url)
        live = db.provider_fw_rule_get_all()
        assert len(live) % 3 == 0 and live, "block_ips makes three rules per CIDR"
        assert _kernel_members(topo.hv) == _expected_members(live)
        (service,) = [s for s in dep.client.services()["services"] if s["host"] == HOST]
        assert service["rule_count"] == len(live) and service["quarantine"] == [] and service["last_error"] is None
