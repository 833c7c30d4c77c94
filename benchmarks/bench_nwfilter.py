#!/usr/bin/env python3
"""NWFilterFirewall at scale: rules mode against ipset mode, side by side (issue 3).

For each size N and each match mode, on a real libvirtd with the instance
filter bound to --ports ports (the instance's veth port on a host bridge plus
extra veth ports, as on a hypervisor running several instances):

1. full apply: N rules (handed over as a ``RuleUpdate``, as the worker's
   reconciler does) to a provider filter in force on every bound port
   (nwfilterDefineXML returns after libvirt re-instantiated all ports, so
   this is also "until enforced everywhere");
2. no-change drift check: a full plan that re-reads the filter (and, in
   ipset mode, the sets) and finds nothing to write;
3. +1 rule (the attacker address) with N present: time until refresh
   returned, and time until the attacker's pings stopped getting answers
   (ping every 10 ms, timestamps from ``ping -D``) - "time until enforced";
4. per-packet cost: 64-byte UDP packets/s (iperf3, median of 3 runs) from
   an address that is NOT blocked, through the bridge, against the same path
   with an empty provider filter (measured before and after, averaged), and
   the smallest ping round trip from that address (min of 400: scheduling
   noise only ever adds, so the difference is the rules' cost per round
   trip).  On a shared 2-core box the pps column is noisy; trust min RTT.

    sudo .venv/bin/python benchmarks/bench_nwfilter.py [IPSUM_PATH] [--generate N] \\
        [--sizes 1000,10000] [--ports 3] [--modes rules,ipset] [--rules-mode-max 1000]

Rules mode makes libvirt run ~3 iptables/ebtables processes per rule per port
and slows down superlinearly (10k rules on ONE port took 407 s here), and
libvirt holds its nwfilter lock meanwhile; so rules mode runs only for
N <= --rules-mode-max unless you raise it.  IPSUM_PATH defaults to
../shared/data/ipsum-levels1-2026-08-22.txt beside the repository; ``--generate N`` uses
synthetic /32s from 100.64.0.0/10.  Root and a running libvirtd are
required.  Packets go only between namespaces the benchmark creates;
filters, bindings, ipsets, veths, bridge and namespaces are removed at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

from provfw import conf as provfw_conf  # noqa: E402
from provfw.rules import make_spec  # noqa: E402
from provfw.virt.firewall import ipset, nwfilter  # noqa: E402
from provfw.virt.firewall import nwfilter_xml as nwx  # noqa: E402
from benchmarks.feed import DEFAULT_IPSUM, load_specs  # noqa: E402
from tests.lib.applied import AppliedRules  # noqa: E402
from tests.lib.bridge import BridgeTopology  # noqa: E402
from tests.lib.netns import unique_tag  # noqa: E402

PING_INTERVAL = 0.01


class Host:
    """A bridge topology plus extra ports, one libvirt connection."""

    def __init__(self, ports: int, seconds: float):
        self.topo = BridgeTopology(listener=False)
        self.tag = self.topo.tag
        self.seconds = seconds
        self.extra_ports = [f"pfx{self.tag}{i}" for i in range(ports - 1)]
        self.dir = tempfile.mkdtemp(prefix="nwfbench-")
        self.iperf_server = None
        import libvirt
        self.libvirt = libvirt
        self.conn = libvirt.open("qemu:///system")

    def __enter__(self):
        self.topo.build()
        for i, port in enumerate(self.extra_ports):
            subprocess.run(["ip", "link", "add", port, "type", "veth", "peer", "name", f"pfy{self.tag}{i}"],
                           check=True)
            subprocess.run(["ip", "link", "set", port, "up"], check=True)
        self.iperf_server = subprocess.Popen(["ip", "netns", "exec", self.topo.instance, "iperf3", "-s"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        if self.iperf_server is not None:
            self.iperf_server.kill()
            self.iperf_server.wait(5)
        for port in self.extra_ports:
            subprocess.run(["ip", "link", "del", port], check=False, capture_output=True)
        self.topo.close()
        self.conn.close()
        subprocess.run(["rm", "-rf", self.dir], check=False)

    def ports(self) -> list[tuple[str, str]]:
        """(port, MAC) of every port the instance filter gets bound to."""
        return [(self.topo.instance_port, self.topo.INSTANCE_MAC)] + \
            [(port, f"52:54:00:7f:00:{i + 1:02x}") for i, port in enumerate(self.extra_ports)]

    def udp_pps(self, runs: int = 3) -> float:
        """64-byte UDP packets/s received by the instance from the unblocked attacker address (median of runs)."""
        samples = []
        for _ in range(runs):
            args = ["iperf3", "-c", self.topo.INSTANCE4, "-B", self.topo.ATTACKER4[1], "-t", str(self.seconds),
                    "--json", "--connect-timeout", "3000", "-u", "-b", "0", "-l", "18"]
            try:
                result = subprocess.run(["ip", "netns", "exec", self.topo.attacker, *args], capture_output=True,
                                        text=True, timeout=self.seconds + 20)
                total = json.loads(result.stdout)["end"]["sum"]
                samples.append((total["packets"] - total["lost_packets"]) / total["seconds"])
            except (subprocess.TimeoutExpired, ValueError, KeyError):
                samples.append(0.0)
        return statistics.median(samples)

    def min_rtt_us(self, count: int = 400) -> float:
        """Smallest ping round trip (us) from the unblocked address: scheduling noise only ever adds to it."""
        result = subprocess.run(["ip", "netns", "exec", self.topo.attacker, "ping", "-4", "-n", "-q", "-c",
                                 str(count), "-i", "0.002", "-I", self.topo.ATTACKER4[1], self.topo.INSTANCE4],
                                capture_output=True, text=True, timeout=60)
        match = re.search(r"= ([\d.]+)/", result.stdout)
        return float(match.group(1)) * 1000 if match else float("nan")


class Scenario:
    """One provider filter + instance filter bound to every port, driven with RuleUpdate values."""

    def __init__(self, host: Host, mode: str):
        self.host = host
        self.tag = unique_tag()
        self.conf = cfg.ConfigOpts()
        provfw_conf.register_opts(self.conf)
        self.conf([], project="provfw", default_config_files=[])
        self.conf.set_override("state_path", os.path.join(host.dir, f"state-{self.tag}"))
        self.conf.set_override("provider_filter", f"nova-provider-{self.tag}", group="libvirt")
        self.conf.set_override("ipset_prefix", f"pn{self.tag}", group="libvirt")
        self.conf.set_override("match_mode", mode, group="libvirt")
        self.instance_filter = f"nova-instance-bench-{self.tag}"
        self.driver = nwfilter.NWFilterFirewall(self.conf)
        self.rules = AppliedRules(self.driver)               # what the worker's reconciler keeps
        self.bindings = []

    def __enter__(self):
        self.rules.rebuild([])                               # the (empty) provider filter must exist first
        accept_all = tuple(nwx.FilterRule(e, (), "accept", "in", nwx.DEFAULT_RULE_PRIORITY)
                           for e in ("all", "all-ipv6"))
        self.host.conn.nwfilterDefineXML(nwx.render_filter(nwx.FilterDef(
            name=self.instance_filter, rules=accept_all, filterrefs=(self.conf.libvirt.provider_filter,))))
        for port, mac in self.host.ports():
            self.bindings.append(self.host.conn.nwfilterBindingCreateXML(nwx.render_binding(
                port, mac, self.instance_filter, f"bench-{self.tag}", str(uuidlib.uuid4()))))
        return self

    def __exit__(self, *exc):
        for binding in self.bindings:
            binding.delete()
        self.host.conn.nwfilterLookupByName(self.instance_filter).undefine()
        self.driver.teardown()

    @staticmethod
    def timed(func, *args) -> float:
        started = time.monotonic()
        func(*args)
        return time.monotonic() - started

    def add_one_and_time_enforcement(self) -> tuple[float, float]:
        """Block the attacker's first address; return (refresh seconds, seconds until its pings died)."""
        topo = self.host.topo
        # ping writes to a file, not a pipe: a refresh can take minutes, and a full pipe would stall ping.
        with tempfile.TemporaryFile("w+") as log:
            pinger = subprocess.Popen(["ip", "netns", "exec", topo.attacker, "ping", "-4", "-D", "-n", "-i",
                                       str(PING_INTERVAL), "-I", topo.ATTACKER4[0], topo.INSTANCE4],
                                      stdout=log, stderr=subprocess.DEVNULL, text=True)
            time.sleep(0.5)
            asked = time.time()
            took = self.timed(self.rules.block, make_spec(topo.ATTACKER4[0]))
            time.sleep(0.5)
            pinger.send_signal(signal.SIGINT)
            pinger.wait(10)
            log.seek(0)
            out = log.read()
        replies = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]
        if not any(t < asked for t in replies):
            raise RuntimeError("the attacker's pings never got through before the block; nothing measured")
        if topo.can_ping(topo.ATTACKER4[0], topo.INSTANCE4):
            raise RuntimeError("the attacker still gets through after the block")
        last = max(replies)
        return took, max(last - asked, 0.0) + PING_INTERVAL


def run(host: Host, mode: str, specs: list) -> dict:
    with Scenario(host, mode) as scenario:
        if not specs:
            return {"pps": host.udp_pps(), "rtt": host.min_rtt_us()}
        full = scenario.timed(scenario.rules.rebuild, specs)
        noop = scenario.timed(scenario.rules.repair)
        pps, rtt = host.udp_pps(), host.min_rtt_us()
        plus_one, enforced = scenario.add_one_and_time_enforcement()
        sets = ipset.read_sets(scenario.driver.runner, scenario.driver.naming.owns)
        return {"full": full, "noop": noop, "plus_one": plus_one, "enforced": enforced, "pps": pps, "rtt": rtt,
                "applied_mode": scenario.rules.state.mode, "sets": len(sets)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ipsum", nargs="?", default=DEFAULT_IPSUM, help="IPsum file (one address per line)")
    parser.add_argument("--generate", type=int, help="use N synthetic /32s instead of the IPsum file")
    parser.add_argument("--sizes", default="1000,10000", help="comma list of rule counts")
    parser.add_argument("--ports", type=int, default=3, help="ports the instance filter is bound to")
    parser.add_argument("--modes", default="rules,ipset")
    parser.add_argument("--rules-mode-max", type=int, default=1000,
                        help="largest N run in rules mode (it takes minutes per port past a few thousand)")
    parser.add_argument("--protocol", default="all", choices=["all", "tcp"],
                        help="protocol of the generated rules (ipset mode can only put 'all' rules in sets)")
    parser.add_argument("--seconds", type=float, default=2.0, help="iperf3 run length (median of 3 runs)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_nwfilter needs root (namespaces, libvirtd)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    specs = load_specs(args.ipsum, args.generate, args.protocol, max(sizes))
    source = f"--generate {args.generate}" if args.generate else args.ipsum
    print(f"# provfw nwfilter benchmark: rules from {source} (protocol {args.protocol}); {args.ports} bound "
          f"port(s); {os.cpu_count()} CPUs; libvirt {_libvirt_version()}")
    results: dict[tuple[str, int], dict] = {}
    with Host(args.ports, args.seconds) as host:
        before = run(host, "rules", [])
        for size in sizes:
            for mode in modes:
                if mode == "rules" and size > args.rules_mode_max:
                    continue
                print(f"... {mode} mode, {size} rules", file=sys.stderr, flush=True)
                results[(mode, size)] = run(host, mode, specs[:size])
        after = run(host, "rules", [])
    # The box is shared (2 cores): the empty-filter path is measured before and after; pps are averaged,
    # and the smaller min RTT is kept (noise only ever adds to a round trip).
    base_pps = (before["pps"] + after["pps"]) / 2
    base_rtt = min(before["rtt"], after["rtt"])

    print(f"\n{'mode':<6} {'rules':>6} {'ports':>5} {'full apply':>11} {'drift chk':>10} {'+1 returned':>12} "
          f"{'+1 enforced':>12} {'UDP 64B pps':>12} {'vs empty':>9} {'min RTT':>9} {'+us/RTT':>8} {'sets':>5}")
    print(f"{'empty':<6} {0:6d} {args.ports:5d} {'':>11} {'':>10} {'':>12} {'':>12} {base_pps:12.0f} {1:9.1%} "
          f"{base_rtt:7.0f}us {'':>8} {'':>5}   (pps before {before['pps']:.0f}, after {after['pps']:.0f})")
    for (mode, size), row in results.items():
        print(f"{mode:<6} {size:6d} {args.ports:5d} {row['full']:10.2f}s {row['noop']:9.3f}s "
              f"{row['plus_one']:11.3f}s {row['enforced']:11.3f}s {row['pps']:12.0f} "
              f"{row['pps'] / base_pps if base_pps else 0:9.1%} {row['rtt']:7.0f}us {row['rtt'] - base_rtt:8.0f} "
              f"{row['sets']:5d}")
    print("\nratios rules / ipset (higher = ipset mode better):")
    for size in sizes:
        r, i = results.get(("rules", size)), results.get(("ipset", size))
        if not (r and i):
            continue
        print(f"  {size:6d} rules: full apply x{r['full'] / i['full']:.1f}, +1 enforced "
              f"x{r['enforced'] / i['enforced']:.0f}, +1 returned x{r['plus_one'] / i['plus_one']:.0f}, "
              f"added RTT x{(r['rtt'] - base_rtt) / max(i['rtt'] - base_rtt, 1):.0f}, "
              f"UDP pps x{i['pps'] / r['pps'] if r['pps'] else float('nan'):.2f} (ipset/rules)")
    skipped = [s for s in sizes if s > args.rules_mode_max and "rules" in modes]
    if skipped:
        print(f"  rules mode not run for {skipped} (--rules-mode-max {args.rules_mode_max})")
    return 0


def _libvirt_version() -> str:
    import libvirt
    version = libvirt.getVersion()
    return f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"


if __name__ == "__main__":
    sys.exit(main())
