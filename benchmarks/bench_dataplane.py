#!/usr/bin/env python3
"""Dataplane benchmark: the linear chain against the set-based drivers, side by side (issue 4).

1. Full apply of N rules on one host (fresh namespace), and the re-apply that
   finds nothing to change (what every drift check costs):
   linear chain (IptablesFirewallDriver) vs ipset vs nftables vs iptc.
2. One more CIDR with N present, host side: the driver's delta apply
   (median of --deltas runs); the linear chain has no delta, so it is a full
   apply.  Printed beside the rejected nftables design (an interval set:
   one ``nft add element`` with N elements present).
3. Forwarding through the hypervisor namespace with N blocked, from a source
   that is NOT blocked: 64-byte UDP packets/s and TCP throughput (iperf3,
   server in the instance namespace, client in the attacker namespace), as a
   ratio of the same path with no firewall, measured in alternation in the
   same topology (the machine is shared; see bench_forwarding).
4. Worker memory: RSS of a fresh Python process that holds the N rules (read
   from a SQLite database, as the conductor's snapshot would arrive) and runs
   a full apply (``RuleUpdate.rebuild``) with each driver.

    sudo .venv/bin/python benchmarks/bench_dataplane.py [IPSUM_PATH] [--generate N] [--seconds 3]

IPSUM_PATH defaults to ../shared/data/ipsum-levels1-2026-08-22.txt beside the
repository (one address per line, '#' comments).  ``--generate N`` uses N synthetic /32s
from 100.64.0.0/10 instead.  Root is required (namespaces).  Packets go only
between namespaces the benchmark creates; everything is removed at exit.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

from provfw import conf as provfw_conf  # noqa: E402
from provfw.rules import make_spec  # noqa: E402
from provfw.virt.firewall import ipset  # noqa: E402
from provfw.virt.firewall.ipset import IpsetFirewallDriver  # noqa: E402
from provfw.virt.firewall.iptables import IptablesFirewallDriver  # noqa: E402
from provfw.virt.firewall.iptc import IptcFirewallDriver  # noqa: E402
from provfw.virt.firewall.nftables import NftablesFirewallDriver  # noqa: E402
from benchmarks.feed import DEFAULT_IPSUM, load_specs  # noqa: E402
from tests.lib import netns  # noqa: E402
from tests.lib.applied import AppliedRules  # noqa: E402

DRIVERS = {
    "linear": IptablesFirewallDriver,
    "ipset": IpsetFirewallDriver,
    "nftables": NftablesFirewallDriver,
    "iptc": IptcFirewallDriver,
}
# The topology's own networks must never be in the blocked list (the probe source is 198.18.1.3).


def scratch_dir(prefix: str) -> str:
    """A temporary directory removed when the benchmark exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def make_conf(ns: str) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    provfw_conf.register_opts(conf)
    conf([], project="provfw", default_config_files=[])
    conf.set_override("state_path", scratch_dir("provfw-bench-"))
    conf.set_override("dataplane_netns", ns, "compute")
    return conf


class Namespace:
    def __init__(self, name: str):
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)

    def close(self):
        netns.kill_namespace_processes(self.name)
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- 1 + 2

def bench_apply(kind: str, specs: list, deltas: int) -> dict:
    ns = Namespace(f"pfwb-{netns.unique_tag()}")
    try:
        # AppliedRules keeps what the worker's reconciler keeps: the rules and the driver's state.
        rules = AppliedRules(DRIVERS[kind](conf=make_conf(ns.name)))
        full = timed(rules.rebuild, specs)
        noop = timed(rules.repair)                 # a full plan that finds nothing to write: the drift check
        base = int(ipaddress.ip_address("192.0.2.0"))
        samples = []
        for i in range(deltas):
            new = make_spec(str(ipaddress.ip_address(base + 1 + i)))
            samples.append(timed(rules.block, new))
            if rules.last.mode != "delta" and i >= 2:
                break                              # the linear chain has no delta: seconds each, three samples
        return {"full": full, "noop": noop, "delta": statistics.median(samples), "delta_max": max(samples)}
    finally:
        ns.close()


def bench_ipset_floor(specs: list) -> float:
    """The floor under the ipset drivers' full apply: one bare ``ipset restore`` of the same members."""
    ns = Namespace(f"pfwb-{netns.unique_tag()}")
    try:
        members = {ipset.member(s.cidr) for s in specs if s.version == 4}
        capacity = ipset.capacity(len(members), make_conf(ns.name))
        script = "\n".join([f"create floor hash:net family inet hashsize {ipset.hash_size(capacity)} "
                            f"maxelem {capacity}"] + [f"add floor {m}" for m in members]) + "\n"
        return timed(netns.netns_exec, ns.name, "ipset", "restore", input=script)
    finally:
        ns.close()


def bench_nft_interval_add(specs: list, deltas: int) -> float:
    """The rejected design: one ``nft add element`` into an interval set that holds N elements."""
    ns = Namespace(f"pfwb-{netns.unique_tag()}")
    try:
        addresses = [s.cidr.split("/")[0] for s in specs if s.version == 4]
        script = ("add table inet ivl\nadd set inet ivl s { type ipv4_addr; flags interval; }\n"
                  f"add element inet ivl s {{ {', '.join(addresses)} }}\n")
        netns.netns_exec(ns.name, "nft", "-f", "-", input=script)
        samples = []
        for i in range(min(deltas, 5)):
            samples.append(timed(netns.netns_exec, ns.name, "nft", "add", "element", "inet", "ivl", "s",
                                 f"{{ 192.0.2.{i + 1} }}"))
        return statistics.median(samples)
    finally:
        ns.close()


# ----------------------------------------------------------------------------- 3

def iperf(topo, udp: bool, seconds: float) -> float:
    """Packets/s received (UDP, 64-byte frames) or bits/s (TCP) from the unblocked source."""
    args = ["iperf3", "-c", topo.INSTANCE4, "-B", topo.ATTACKER4[1], "-t", str(seconds), "--json",
            "--connect-timeout", "3000"]
    if udp:
        args += ["-u", "-b", "0", "-l", "18"]       # 18 B payload + 8 UDP + 20 IP + 14 Ethernet + 4 FCS = 64 B
    try:
        # Sender on CPU 0, receiver (see bench_forwarding) on CPU 1: less scheduling noise on 2 cores.
        result = subprocess.run(["ip", "netns", "exec", topo.attacker, "taskset", "-c", "0", *args],
                                capture_output=True, text=True,
                                timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        return 0.0
    try:
        end = json.loads(result.stdout)["end"]
    except (ValueError, KeyError):
        return 0.0
    if udp:
        total = end["sum"]
        return (total["packets"] - total["lost_packets"]) / total["seconds"]
    return end["sum_received"]["bits_per_second"]


def bench_forwarding(specs: list, seconds: float, kinds: list[str], rounds: int) -> dict:
    """Per driver, alternate runs without and with the firewall in the SAME topology.

    The machine is shared (2 cores, other work comes and goes), so each
    driver's ratio is taken against baselines measured minutes - not tens of
    minutes - apart: median(with) / median(without) over ``rounds`` pairs.
    """
    results = {}
    for kind in kinds:
        topo = netns.RoutedTopology(listener=False)
        topo.build()
        server = subprocess.Popen(["ip", "netns", "exec", topo.instance, "taskset", "-c", "1", "iperf3", "-s"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        samples = {"none": {"pps": [], "bps": []}, kind: {"pps": [], "bps": []}}
        try:
            time.sleep(0.5)
            driver = DRIVERS[kind](conf=make_conf(topo.hv))
            # Removing 120k linear rules takes as long as adding them: one pair is enough there.
            for round_number in range(1 if kind == "linear" else rounds):
                for label in ("none", kind):
                    if label == kind:
                        AppliedRules(driver).rebuild(specs)
                    samples[label]["pps"].append(iperf(topo, udp=True, seconds=seconds))
                    samples[label]["bps"].append(iperf(topo, udp=False, seconds=seconds))
                    if label == kind and kind != "linear":
                        driver.teardown()
        finally:
            server.kill()
            server.wait()
            topo.close()
        results[kind] = {label: {k: statistics.median(v) for k, v in runs.items()} for label, runs in samples.items()}
    return results


# ----------------------------------------------------------------------------- 4

MEMORY_CHILD = r"""
import os, sys, json
sys.path.insert(0, sys.argv[4])
from benchmarks.bench_dataplane import make_conf, DRIVERS
from provfw.db import api as db
from provfw.virt.firewall import RuleUpdate
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
db.configure(sys.argv[2])
conf = make_conf(sys.argv[3])
driver = DRIVERS[sys.argv[1]](conf=conf)
before, _ = rss()
desired = frozenset(spec for spec, _ in db.provider_fw_snapshot().rules)   # what the reconciler holds
applied = driver.refresh_provider_fw_rules(RuleUpdate.rebuild(desired))
after, peak = rss()
print(json.dumps({"before": before, "after": after, "peak": peak, "rules": len(desired)}))
"""


def bench_memory(specs: list, kinds: list[str]) -> dict:
    from provfw.db import api as db
    from provfw.db import migration

    workdir = scratch_dir("provfw-bench-db-")
    url = f"sqlite:///{workdir}/provfw.sqlite"
    migration.db_sync(url)
    db.configure(url)
    db.provider_fw_rules_create_many(specs)
    db.dispose()
    results = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for kind in kinds:
        ns = Namespace(f"pfwb-{netns.unique_tag()}")
        try:
            out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, url, ns.name, root],
                                 capture_output=True, text=True, timeout=900, check=True)
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            ns.close()
    return results


# ----------------------------------------------------------------------------- report

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ipsum", nargs="?", default=DEFAULT_IPSUM, help="IPsum file (one address per line)")
    parser.add_argument("--generate", type=int, help="use N synthetic /32s instead of the IPsum file")
    parser.add_argument("--deltas", type=int, default=20, help="delta samples per driver")
    parser.add_argument("--seconds", type=float, default=3.0, help="iperf3 run length per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="without/with pairs per driver for forwarding")
    parser.add_argument("--drivers", default="linear,ipset,nftables,iptc")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: apply,forwarding,memory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_dataplane needs root (network namespaces)", file=sys.stderr)
        return 2
    kinds = args.drivers.split(",")
    skip = set(filter(None, args.skip.split(",")))
    specs = load_specs(args.ipsum, args.generate)
    source = f"--generate {args.generate}" if args.generate else args.ipsum
    print(f"# provfw dataplane benchmark: {len(specs)} rules from {source}; {os.cpu_count()} CPUs")

    if "apply" not in skip:
        rows = {kind: bench_apply(kind, specs, args.deltas) for kind in kinds}
        ref = rows.get("linear")
        print("\n## 1-2. Host-side apply cost (seconds; ratio = linear / driver)")
        print(f"{'driver':<10} {'full apply':>11} {'x':>7} {'no-change':>10} {'x':>7} {'+1 CIDR':>10} "
              f"{'max':>8} {'x':>8}")
        for kind, row in rows.items():
            def ratio(key):
                return f"{ref[key] / row[key]:7.1f}" if ref and row[key] else "      -"
            print(f"{kind:<10} {row['full']:11.3f} {ratio('full')} {row['noop']:10.3f} {ratio('noop')} "
                  f"{row['delta'] * 1000:8.1f}ms {row['delta_max'] * 1000:6.1f}ms {ratio('delta'):>8}")
        print(f"{'floor*':<10} {bench_ipset_floor(specs):11.3f}")
        interval = bench_nft_interval_add(specs, args.deltas)
        print(f"{'nft ivl*':<10} {'':>11} {'':>7} {'':>10} {'':>7} {interval * 1000:8.1f}ms")
        print("floor*: one bare `ipset restore` of the same members into a pre-sized set (no diff, no iptables)")
        print("nft ivl*: the rejected design - one `nft add element` into an interval set holding the same addresses")

    if "forwarding" not in skip:
        results = bench_forwarding(specs, args.seconds, kinds, args.rounds)
        print(f"\n## 3. Forwarding with {len(specs)} blocked, unblocked source "
              f"({args.seconds:g} s per run, median of {args.rounds} alternating pairs per driver)")
        print(f"{'firewall':<10} {'UDP 64B pps':>12} {'no fw pps':>10} {'ratio':>7} "
              f"{'TCP Mbit/s':>11} {'no fw':>8} {'ratio':>7}")
        for kind, row in results.items():
            fw, none = row[kind], row["none"]
            pps_ratio = fw["pps"] / none["pps"] if none["pps"] else 0.0
            bps_ratio = fw["bps"] / none["bps"] if none["bps"] else 0.0
            print(f"{kind:<10} {fw['pps']:12.0f} {none['pps']:10.0f} {pps_ratio:7.1%} "
                  f"{fw['bps'] / 1e6:11.1f} {none['bps'] / 1e6:8.1f} {bps_ratio:7.1%}")

    if "memory" not in skip:
        memory = bench_memory(specs, [k for k in kinds])
        print(f"\n## 4. Worker memory after a full apply of {len(specs)} rules read from SQLite (MB)")
        print(f"{'driver':<10} {'RSS before':>11} {'RSS after':>10} {'peak':>8} {'rules+state':>12}")
        for kind, row in memory.items():
            print(f"{kind:<10} {row['before'] / 2**20:11.1f} {row['after'] / 2**20:10.1f} "
                  f"{row['peak'] / 2**20:8.1f} {(row['after'] - row['before']) / 2**20:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
