#!/usr/bin/env python3
"""Leak benchmark (issue 8): full rebuilds under a flood from a blocked source, counting what gets through.

For each driver, ``--rounds`` full rebuilds (``RuleUpdate.rebuild``, the
driver's full path) alternate between two rule sets that share only the
flooding source: set A is the attacker plus N-1 hosts from 100.64.0.0, set B
the attacker plus N-1 other hosts, so every round replaces almost the whole
set - ipset through a temporary set and ``swap``, nftables as one
transaction that flushes and refills the set, the linear chain as one
``iptables-restore`` that re-declares and refills ``nova-provider``.
Meanwhile the attacker namespace floods the instance with UDP from the
blocked source, as fast as one core sends, and an nftables counter in the
instance namespace counts the packets that arrive.  Goal: 0.

Beside them, the control: the same alternation written the way the design
forbids - ``ipset restore`` of ``flush`` then every ``add`` into the live
set - which a flood does get through; it shows the counter sees a window.
Before anything, an unblocked check proves the flood reaches the instance.

    sudo .venv/bin/python benchmarks/bench_leak.py [--rounds 1000] [--set-rules 10000] [--chain-rules 1000]

Root is required (namespaces).  Packets go only between the namespaces the
benchmark creates; everything is removed at exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_dataplane import make_conf  # noqa: E402
from provfw import runner as runner_mod  # noqa: E402
from provfw.rules import make_spec  # noqa: E402
from provfw.virt.firewall import ipset  # noqa: E402
from provfw.virt.firewall.ipset import IpsetFirewallDriver  # noqa: E402
from provfw.virt.firewall.iptables import IptablesFirewallDriver  # noqa: E402
from provfw.virt.firewall.nftables import NftablesFirewallDriver  # noqa: E402
from provfw.virt.firewall.sets import match_key  # noqa: E402
from tests.lib import netns  # noqa: E402
from tests.lib.applied import AppliedRules  # noqa: E402
from tests.lib.traffic import Flood, InstanceCounter  # noqa: E402

ATTACKER = netns.RoutedTopology.ATTACKER4[0]


def rule_sets(size: int) -> tuple[list, list]:
    """(A, B): the attacker plus size-1 hosts each, no other member in common."""
    start = int(ipaddress.ip_address("100.64.0.0"))
    hosts = [make_spec(str(ipaddress.ip_address(start + i))) for i in range(2 * (size - 1))]
    attacker = make_spec(ATTACKER)
    return [attacker, *hosts[:size - 1]], [attacker, *hosts[size - 1:]]


def flooded(topo, counter, work) -> tuple[int, int, list[float]]:
    """Run ``work()`` (returning per-round seconds) under a flood; (packets sent, arrived, seconds)."""
    before = counter.packets()
    flood = Flood(topo, ATTACKER, seconds=24 * 3600)
    try:
        time.sleep(0.2)
        seconds = work()
        time.sleep(0.2)
    finally:
        sent = flood.stop()
    return sent, counter.packets() - before, seconds


# What each driver's full rebuild must have written, so a round cannot quietly take a cheaper path
# (in-place set changes would also be atomic per element, but they are not the path under test).
REBUILD_MARK = {"ipset": "\nswap pfw4-all-any-t pfw4-all-any\n", "nftables": "flush set inet provfw pfw4_all_p32",
                "iptables": ":nova-provider - [0:0]"}


class CapturingRunner(runner_mod.Runner):
    """The real Runner, keeping the stdin of the commands since ``written`` was last cleared."""

    def __init__(self, netns: str):
        super().__init__(netns)
        self.written: list[str] = []

    def execute(self, cmd, input=None, check=True):
        if input:
            self.written.append(input)
        return super().execute(cmd, input=input, check=check)


def driver_rounds(rules: AppliedRules, rounds: int, sets: tuple[list, list]) -> list[float]:
    """``rounds`` full rebuilds alternating between the two sets (``rules`` holds set B); seconds of each."""
    driver = rules.driver
    runner = driver.runner
    times = []
    for number in range(rounds):
        runner.written.clear()
        began = time.monotonic()
        applied = rules.rebuild(sets[number % 2])
        times.append(time.monotonic() - began)
        if applied.mode != "full" or not any(REBUILD_MARK[driver.name] in text for text in runner.written):
            raise SystemExit(f"{driver.name}: round {number} did not rebuild through the full path ({applied})")
    return times


def control_rounds(runner: runner_mod.Runner, rounds: int, sets: tuple[list, list]) -> list[float]:
    """The forbidden rebuild: ``flush`` then every ``add``, into the live set the chain references
    (which the ipset driver made, holding set B)."""
    name = ipset.DRIVER_SETS.name(match_key(sets[0][0]))
    inputs = ["\n".join([f"flush {name}"] + [f"add {name} {ipset.member(s.cidr)}" for s in specs]) + "\n"
              for specs in sets]
    times = []
    for number in range(rounds):
        began = time.monotonic()
        runner(["ipset", "restore", "-exist"], input=inputs[number % 2])
        times.append(time.monotonic() - began)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1000, help="full rebuilds per driver (default: 1000)")
    parser.add_argument("--control-rounds", type=int, help="rounds of the flush-then-restore control "
                                                           "(default: --rounds)")
    parser.add_argument("--set-rules", type=int, default=10_000, help="rules in the ipset/nftables sets")
    parser.add_argument("--chain-rules", type=int, default=1_000, help="rules in the linear chain")
    parser.add_argument("--drivers", default="ipset,nftables,linear",
                        help="comma-separated subset of ipset,nftables,linear")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    control_rounds_n = args.rounds if args.control_rounds is None else args.control_rounds
    drivers = {"ipset": (IpsetFirewallDriver, args.set_rules), "nftables": (NftablesFirewallDriver, args.set_rules),
               "linear": (IptablesFirewallDriver, args.chain_rules)}
    chosen = [d.strip() for d in args.drivers.split(",") if d.strip()]
    unknown = set(chosen) - set(drivers)
    if unknown:
        parser.error(f"unknown driver(s) {sorted(unknown)}")

    rows = []
    with netns.RoutedTopology(listener=False) as topo:
        counter = InstanceCounter(topo)
        sent, arrived, _ = flooded(topo, counter, lambda: time.sleep(0.5) or [])
        print(f"unblocked check: {arrived:,} of {sent:,} packets reached the instance in 0.5 s "
              "(the counter sees the flood)", flush=True)
        if arrived == 0:
            raise SystemExit("the flood does not reach the instance: the benchmark would prove nothing")
        runner = CapturingRunner(topo.hv)
        for kind in chosen:
            cls, size = drivers[kind]
            conf = make_conf(topo.hv)
            # The two sets differ by 2 x (N-1) members, under the default threshold at N = 10,000: a
            # lower one makes every round the temporary-set rebuild (ipset) / flush-and-refill (nft).
            conf.set_override("full_rebuild_delta", min(1000, size), "sets")
            rules = AppliedRules(cls(conf=conf, runner=runner))
            sets = rule_sets(size)
            print(f"{kind}: {args.rounds} full rebuilds of {size:,} rules ...", flush=True)
            try:
                rules.rebuild(sets[1])             # the source is blocked before the flood starts
                sent, arrived, times = flooded(topo, counter, lambda: driver_rounds(rules, args.rounds, sets))
            finally:
                rules.driver.teardown()
            rows.append((kind, size, args.rounds, times, sent, arrived))
        if control_rounds_n:
            sets = rule_sets(args.set_rules)
            print(f"control: {control_rounds_n} flush-then-restore rebuilds of {args.set_rules:,} rules ...",
                  flush=True)
            rules = AppliedRules(IpsetFirewallDriver(conf=make_conf(topo.hv), runner=runner))
            try:
                rules.rebuild(sets[1])
                sent, arrived, times = flooded(topo, counter,
                                               lambda: control_rounds(runner, control_rounds_n, sets))
            finally:
                rules.driver.teardown()
            rows.append(("control: ipset flush+restore", args.set_rules, control_rounds_n, times, sent, arrived))

    print()
    print(f"Full rebuilds while {ATTACKER} (blocked in every set) floods the instance with UDP")
    header = f"{'driver':<30} {'rules':>7} {'rounds':>7} {'rebuild p50':>12} {'p99':>9} {'sent':>13} {'arrived':>9}"
    print(header)
    print("-" * len(header))
    for kind, size, rounds, times, sent, arrived in rows:
        ordered = sorted(times)
        p50 = statistics.median(ordered) if ordered else 0.0
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
        print(f"{kind:<30} {size:>7,} {rounds:>7,} {p50 * 1000:>10.1f}ms {p99 * 1000:>7.1f}ms {sent:>13,} "
              f"{arrived:>9,}")
    leaked = [row[0] for row in rows if row[5] and not row[0].startswith("control")]
    if leaked:
        print(f"\nLEAK: {', '.join(leaked)} let blocked packets through")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
