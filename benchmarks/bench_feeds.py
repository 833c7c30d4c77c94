#!/usr/bin/env python3
"""Block-list sync benchmark (issue 10): replace-sync with 1 % churn against importing the whole list again.

Part ``e2e`` (root: network namespaces) starts real ``provfw-api``, ``provfw-conductor`` and 3
``provfw-compute`` processes with the ipset driver (RabbitMQ, PostgreSQL), each managing its own hypervisor
namespace, and replace-syncs the list (default: the 120,430 IPsum addresses) as ``import:bench``.  Then, for
each round, 1 % of the entries leave the list and as many new ones arrive, and it measures:

* the API call (the list's text is sent whole, parsed, diffed and written in one transaction);
* the generation delta hosts read (``provider_fw_changes_since``: rules added + removed);
* the API server's own time for the call (its access log's ``duration_ms``);
* the time from the call until all 3 hosts enforce the new generation: the latest of the workers' ``applied
  generation N`` log lines, which a worker writes once its kernel accepted the change (the same measure as
  ``bench_e2e_scale.py``); then that host 1's kernel holds an added entry and no longer a removed one
  (``ipset test``, checked once, after the measurement);
* the time until all 3 hosts' state reports reached the database (``provfw services``), which adds the
  conductor's batching of reports (``[conductor] report_flush_interval``, 0.2 s in the tests' deployments).

The same churn is then applied the two ways an operator had before replace-sync: importing the whole new
list again (``mode=add``: the 1,200 new entries arrive, the 1,200 stale ones stay blocked), and wiping the
source and importing it again (two generations; every host rebuilds 120k entries).

Part ``db`` (no root) times the database layer alone on SQLite, PostgreSQL and MariaDB: the replace-sync of
a churned list, and ``provfw why``'s query (rules containing an address) at 120k rules.

    sudo .venv/bin/python benchmarks/bench_feeds.py [--feed PATH] [--rounds 3] [--churn 0.01] [--part e2e|db|all]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import machine  # noqa: E402
from benchmarks.feed import DEFAULT_IPSUM, load_specs  # noqa: E402
from provfw import rules  # noqa: E402
from provfw.db import api as db  # noqa: E402
from provfw.db import migration  # noqa: E402
from provfw.virt.firewall import ipset, sets  # noqa: E402
from tests.lib import deployment as deploy  # noqa: E402
from tests.lib import netns, services  # noqa: E402

HOSTS = 3
SOURCE = "bench"
# New entries come from 45.0.0.0/8, which the IPsum snapshot barely touches; drawn addresses already listed
# are skipped.
NEW_FROM = (int(ipaddress.IPv4Address("45.0.0.0")), int(ipaddress.IPv4Address("46.0.0.0")))


def churned(current: list[str], fraction: float, rnd: random.Random, listed: set[str]) -> tuple[list, list, list]:
    """(the next list, the entries that left it, the entries that arrived): ``fraction`` of each."""
    count = max(1, int(len(current) * fraction))
    leaving = set(rnd.sample(current, count))
    arriving: list[str] = []
    while len(arriving) < count:
        cidr = f"{ipaddress.IPv4Address(rnd.randrange(*NEW_FROM))}/32"
        if cidr not in listed:
            listed.add(cidr)
            arriving.append(cidr)
    return [c for c in current if c not in leaving] + arriving, sorted(leaving), arriving


def text(cidrs: list[str]) -> str:
    return "\n".join(cidrs) + "\n"


# --------------------------------------------------------------------------- e2e

def in_kernel(ns: str, cidr: str) -> bool:
    spec = rules.make_spec(cidr)
    name = ipset.DRIVER_SETS.name(sets.match_key(spec))
    return subprocess.run(["ip", "netns", "exec", ns, "ipset", "test", name, ipset.member(spec.cidr)],
                          capture_output=True).returncode == 0


def wait_reported(generation: int, since: float, timeout: float = 600.0) -> float:
    """Seconds from ``since`` (POSIX time) until every worker's report of ``generation`` applied is in the
    database (polled every 5 ms)."""
    while True:
        rows = db.service_get_all()
        if len(rows) >= HOSTS and all(row.applied_generation >= generation for row in rows):
            return time.time() - since
        if time.time() - since > timeout:
            raise RuntimeError(f"hosts did not apply generation {generation}: "
                               f"{[(r.host, r.applied_generation, r.last_error) for r in rows]}")
        time.sleep(0.005)


def enforced(dep, generation: int, since: float) -> float:
    """Seconds from ``since`` until the last of the hosts logged ``generation`` in its kernel."""
    return max(dep.applied_at(host, generation) for host in dep.workers) - since


def check_kernel(ns: str, present: str, absent: str) -> None:
    if not in_kernel(ns, present) or in_kernel(ns, absent):
        raise RuntimeError(f"host 1 logged the generation applied, but its kernel lacks +{present} or still "
                           f"holds -{absent}")


IMPORT_MS_RE = re.compile(r"POST /v1/provider-fw-rules/import(?:\?\S*)? status=20\d .*?duration_ms=([0-9.]+)")


def server_seconds(dep, call: int, timeout: float = 10.0) -> float:
    """The API server's own time for its ``call``-th import (1-based), from its access log (written once the
    answer is sent, so it may lag the client a little)."""
    deadline = time.monotonic() + timeout
    while True:
        found = IMPORT_MS_RE.findall(dep.tail("api", 100000))
        if len(found) >= call or time.monotonic() > deadline:
            return float(found[call - 1]) / 1000.0
        time.sleep(0.01)


def sync(dep, cidrs: list[str], mode: str = "replace", force: bool = False) -> tuple[dict, float, float]:
    """(the answer, the call's seconds, its POSIX start)."""
    body = text(cidrs)
    started = time.time()
    answer = dep.client.import_rules(body, source=SOURCE, mode=mode, force=force)
    return answer, time.time() - started, started


def run_e2e(feed: list[str], rounds: int, fraction: float, max_cast: int | None) -> list[dict]:
    topologies = [netns.RoutedTopology(listener=False) for _ in range(HOSTS)]
    dep = None
    results = []
    try:
        for topo in topologies:
            topo.build()
        extra = "[sets]\nfull_rebuild_delta = 200000\n"
        if max_cast is not None:
            extra = f"[DEFAULT]\nmax_cast_changes = {max_cast}\n" + extra
        dep = deploy.Deployment("postgresql", firewall_driver="ipset", reconcile_interval=10, extra_conf=extra)
        dep.client.timeout = 600
        db.configure(dep.database.url)
        dep.start_api()
        for i, topo in enumerate(topologies):
            dep.start_worker(f"bench-feeds-{i}", topo.hv)

        answer, api, started = sync(dep, feed)
        hosts = enforced(dep, answer["generation"], started)
        results.append({"what": "first replace-sync (whole list)", "api": api, "server": server_seconds(dep, 1),
                        "delta": answer["added"], "hosts": hosts,
                        "reported": wait_reported(answer["generation"], started), "generations": 1})
        print(f"  first sync: {answer['added']:,} added in {api:.2f} s, 3 hosts after {hosts:.2f} s",
              file=sys.stderr)
        calls = 1

        rnd = random.Random(10)
        listed = set(feed)
        current = feed
        for number in range(rounds):
            current, leaving, arriving = churned(current, fraction, rnd, listed)
            before = answer["generation"]
            answer, api, started = sync(dep, current)
            calls += 1
            hosts = enforced(dep, answer["generation"], started)
            reported = wait_reported(answer["generation"], started)
            check_kernel(topologies[0].hv, arriving[0], leaving[0])
            delta = db.provider_fw_changes_since(before)
            results.append({"what": f"replace-sync, {len(arriving):,} in / {len(leaving):,} out (round {number + 1})",
                            "api": api, "server": server_seconds(dep, calls), "delta": delta.size, "hosts": hosts,
                            "reported": reported, "generations": answer["generation"] - before, "counts": answer})
            print(f"  round {number + 1}: +{answer['added']} -{answer['removed']} api {api:.2f} s, "
                  f"3 hosts {hosts:.2f} s", file=sys.stderr)

        # The old ways, with one more churn each.
        current, leaving, arriving = churned(current, fraction, rnd, listed)
        before = answer["generation"]
        answer, api, started = sync(dep, current, mode="add")
        calls += 1
        hosts = enforced(dep, answer["generation"], started)
        results.append({"what": "import the whole list again (add: stale entries stay)", "api": api,
                        "server": server_seconds(dep, calls), "delta": db.provider_fw_changes_since(before).size,
                        "hosts": hosts, "reported": wait_reported(answer["generation"], started),
                        "generations": answer["generation"] - before})

        current, leaving, arriving = churned(current, fraction, rnd, listed)
        before = answer["generation"]
        wiped, _, started = sync(dep, [], force=True)
        answer, _, _ = sync(dep, current)
        calls += 2
        api = time.time() - started
        hosts = enforced(dep, answer["generation"], started)
        reported = wait_reported(answer["generation"], started)
        check_kernel(topologies[0].hv, arriving[0], leaving[0])
        results.append({"what": "wipe the source and import it again", "api": api,
                        "server": server_seconds(dep, calls - 1) + server_seconds(dep, calls),
                        "delta": wiped["deleted"] + answer["added"], "hosts": hosts, "reported": reported,
                        "generations": answer["generation"] - before})
        return results
    finally:
        if dep is not None:
            dep.close()
        for topo in topologies:
            topo.close()


# --------------------------------------------------------------------------- db

def run_db(specs: list, fraction: float) -> list[dict]:
    out = []
    for kind in ("sqlite", "postgresql", "mariadb"):
        database = services.TestDatabase(kind)
        try:
            migration.db_sync(database.url)
            db.configure(database.url)
            started = time.perf_counter()
            db.provider_fw_rules_sync("import:" + SOURCE, specs, mode="replace")
            first = time.perf_counter() - started
            rnd = random.Random(7)
            listed = {s.cidr for s in specs}
            current = [s.cidr for s in specs]
            times = []
            for _ in range(3):
                current, _, _ = churned(current, fraction, rnd, listed)
                wanted = [rules.RuleSpec(c, "all") for c in current]
                started = time.perf_counter()
                result = db.provider_fw_rules_sync("import:" + SOURCE, wanted, mode="replace")
                times.append(time.perf_counter() - started)
            started = time.perf_counter()
            db.provider_fw_rules_sync("import:" + SOURCE, wanted, mode="replace")
            unchanged = time.perf_counter() - started
            probes = [ipaddress.ip_network(c) for c in rnd.sample(current, 300)] + \
                [ipaddress.ip_network(f"{ipaddress.IPv4Address(rnd.randrange(2**32))}/32") for _ in range(300)]
            latencies = []
            for network in probes:
                started = time.perf_counter()
                db.provider_fw_rule_get_containing(network)
                latencies.append(time.perf_counter() - started)
            latencies.sort()
            out.append({"kind": kind, "first": first, "churn": statistics.median(times), "unchanged": unchanged,
                        "delta": result.changes.size, "why_p50": statistics.median(latencies),
                        "why_p99": latencies[int(0.99 * len(latencies))]})
            print(f"  {kind}: done", file=sys.stderr)
        finally:
            db.dispose()
            database.drop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feed", default=DEFAULT_IPSUM,
                        help="blocklist file (default: the IPsum snapshot in ../shared/data/ beside the repository)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--churn", type=float, default=0.01, help="share of the list replaced each round")
    parser.add_argument("--part", choices=("e2e", "db", "all"), default="all")
    parser.add_argument("--max-cast-changes", type=int,
                        help="[DEFAULT] max_cast_changes for the deployment (default: provfw's, 1000)")
    args = parser.parse_args()
    specs = load_specs(args.feed)
    feed = [spec.cidr for spec in specs]
    print(machine.describe())
    if args.part in ("db", "all"):
        print(f"db layer: {len(specs):,} rules, {args.churn:.0%} churn, replace-sync and why (no API, no hosts)")
        rows = run_db(specs, args.churn)
        print(f"{'database':<11} {'first sync':>10} {'churn sync':>11} {'unchanged':>10} {'delta':>7} "
              f"{'why p50':>9} {'why p99':>9}")
        for r in rows:
            print(f"{r['kind']:<11} {r['first']:>9.2f}s {r['churn']:>10.2f}s {r['unchanged']:>9.2f}s "
                  f"{r['delta']:>7,} {r['why_p50'] * 1000:>7.2f}ms {r['why_p99'] * 1000:>7.2f}ms")
    if args.part in ("e2e", "all"):
        if os.geteuid() != 0:
            print("bench_feeds: the e2e part needs root (network namespaces)", file=sys.stderr)
            return 2
        print(f"\ne2e: {len(feed):,} entries, {HOSTS} hosts (ipset), real provfw-api, -conductor, -compute on "
              "RabbitMQ + PostgreSQL")
        rows = run_e2e(feed, args.rounds, args.churn, args.max_cast_changes)
        churn = [r for r in rows if r["what"].startswith("replace-sync")]
        baseline = rows[-2]
        header = (f"{'':<56} {'API':>7} {'server':>7} {'delta':>8} {'gens':>5} {'-> 3 hosts':>11} "
                  f"{'reported':>9} {'vs add':>7}")
        print(header)
        print("-" * len(header))
        for r in rows:
            print(f"{r['what']:<56} {r['api']:>6.2f}s {r['server']:>6.2f}s {r['delta']:>8,} {r['generations']:>5} "
                  f"{r['hosts']:>10.2f}s {r['reported']:>8.2f}s {r['hosts'] / baseline['hosts']:>6.2f}x")
        print("API: the client's call; server: the API's own time (access log); -> 3 hosts: until the last "
              "worker logged\nthe generation in its kernel; reported: until the 3 state reports were in the "
              "database")
        if churn:
            print(f"churn sync -> 3 hosts: median {statistics.median(r['hosts'] for r in churn):.2f} s "
                  f"(goal <= 1 s)")
    print(machine.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
