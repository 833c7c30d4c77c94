#!/usr/bin/env python3
"""Baseline numbers of the core service (issue 2).

1. End-to-end latency: from ``AdminClient.block_ips`` returning to the DROP
   being in the hypervisor's kernel (real provfw-api + provfw-compute on
   RabbitMQ + PostgreSQL, the worker's dataplane in a namespace), p50/p99
   over N blocks.  Printed beside the worker's own apply time so the ratio
   shows what the bus, database and polling add.
2. Time to apply 1k / 10k / 100k rules with the linear ``nova-provider``
   chain (IptablesFirewallDriver, a full apply of the rules handed over as a
   ``RuleUpdate``), beside the floor: one bare ``iptables-restore`` of the
   same rules with no diff and no comments.

    sudo .venv/bin/python benchmarks/bench_core.py [--blocks 100] [--sizes 1000,10000,100000]

``--blocks 0`` skips part 1 (it needs the whole service: API, worker, bus, database).

Must run as root (namespaces); sends packets nowhere; cleans up after itself.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

from provfw import conf as provfw_conf  # noqa: E402
from provfw import rules  # noqa: E402
from provfw.virt.firewall import RuleUpdate  # noqa: E402
from provfw.virt.firewall.iptables import IptablesFirewallDriver  # noqa: E402
from tests.lib import deployment as deploy  # noqa: E402
from tests.lib import netns  # noqa: E402


def percentile(values, q):
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def synthetic_cidrs(count: int, seed_net: str = "100.64.0.0/10") -> list[str]:
    """``count`` distinct /32s from the shared address space (never routed anywhere here)."""
    base = int(ipaddress.ip_network(seed_net).network_address)
    return [str(ipaddress.IPv4Address(base + i + 1)) + "/32" for i in range(count)]


def bench_latency(blocks: int) -> dict:
    topo = netns.RoutedTopology(listener=False)
    topo.build()
    dep = deploy.Deployment("postgresql")
    try:
        dep.start_api()
        dep.start_worker("bench-hv", topo.hv)
        latencies = []
        cidrs = synthetic_cidrs(blocks, "100.96.0.0/12")
        for cidr in cidrs:
            dep.client.block_ips(cidr)
            returned = time.perf_counter()
            while not deploy.kernel_has_source(topo.hv, cidr):
                if time.perf_counter() - returned > 10:
                    raise RuntimeError(f"{cidr} never reached the kernel")
                time.sleep(0.002)
            latencies.append(time.perf_counter() - returned)
        # The worker's own apply time for the same rule count, from its log.
        return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "max": max(latencies),
                "n": len(latencies)}
    finally:
        dep.close()
        topo.close()


def _conf(netns_name: str, state: str) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    provfw_conf.register_opts(conf)
    conf([], project="provfw", default_config_files=[])
    conf.set_override("state_path", state)
    conf.set_override("dataplane_netns", netns_name, "compute")
    conf.set_override("max_rules", 10_000_000)
    return conf


def bench_apply(size: int) -> dict:
    ns = f"pfw-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        specs = [rules.make_spec(c) for c in synthetic_cidrs(size)]
        conf = _conf(ns, f"/tmp/{ns}")
        driver = IptablesFirewallDriver(conf)
        update = RuleUpdate.rebuild(frozenset(specs))
        started = time.perf_counter()
        driver.refresh_provider_fw_rules(update)
        full = time.perf_counter() - started
        started = time.perf_counter()
        result = driver.refresh_provider_fw_rules(update)
        noop = time.perf_counter() - started
        assert not result.changed
        # Floor: the same DROP rules, one bare iptables-restore, fresh namespace state.
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-F"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-X"], check=True)
        lines = ["*filter", ":bare - [0:0]", *(f"-A bare -s {s.cidr} -j DROP" for s in specs), "COMMIT", ""]
        started = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", ns, "iptables-restore", "--noflush"], input="\n".join(lines),
                       text=True, check=True)
        floor = time.perf_counter() - started
        return {"full": full, "noop": noop, "floor": floor}
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_core: run as root (network namespaces)", file=sys.stderr)
        return 2

    if args.blocks:
        print(f"End-to-end: block_ips returned -> DROP in the hypervisor kernel ({args.blocks} blocks, 1 host, "
              "RabbitMQ + PostgreSQL, iptables linear chain)")
        latency = bench_latency(args.blocks)
        print(f"  {'p50':>8} {'p99':>8} {'max':>8}")
        print(f"  {latency['p50'] * 1000:7.1f}ms {latency['p99'] * 1000:7.1f}ms {latency['max'] * 1000:7.1f}ms")
        print()
    print("Full apply of N rules, linear chain (IptablesFirewallDriver) vs one bare iptables-restore (floor)")
    print(f"  {'rules':>8} {'provfw':>10} {'floor':>10} {'ratio':>7} {'re-apply (no change)':>22}")
    for size in (int(s) for s in args.sizes.split(",")):
        result = bench_apply(size)
        print(f"  {size:>8} {result['full']:9.3f}s {result['floor']:9.3f}s {result['full'] / result['floor']:6.2f}x"
              f" {result['noop']:21.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
