"""Whatever the API accepts, every kernel driver enforces: a property test on a real kernel.

Hypothesis draws sets of rules from the space the API accepts
(``tests.lib.rule_strategies``: request bodies validated by the API's own
schema and ``rules.spec_from_body``, edges weighted in) and hands each set to
a real driver - the linear chain on iptables-nft and on iptables-legacy,
ipset, nftables, iptc - in a hypervisor namespace, exactly as the worker's
reconciler would: as a delta from the previous example's rules or as a full
rebuild (drawn).  Each example must be:

* applied (the driver raises nothing: the kernel took every rule);
* held by the kernel, counted independently of the driver's own reading
  (DROP rules in nova-provider, set members in ``ipset save`` / ``nft -j``);
* stable: a second apply (the periodic drift check, a full plan against the
  kernel) writes nothing.

nwfilter on the real libvirtd has the same property in
``tests/functional/test_nwfilter.py`` (libvirtd and its filters are shared;
that file's conventions keep its names unique).  Budget: about 15-30 s per
driver on two busy cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from provfw import runner as runner_mod
from provfw.virt.firewall.ipset import IpsetFirewallDriver
from provfw.virt.firewall.iptables import IptablesFirewallDriver
from provfw.virt.firewall.iptc import IptcFirewallDriver
from provfw.virt.firewall.nftables import NftablesFirewallDriver
from tests.lib import services
from tests.lib.applied import AppliedRules
from tests.lib.netns import RoutedTopology, netns_exec
from tests.lib.rule_strategies import rule_sets

pytestmark = [pytest.mark.functional, pytest.mark.timeout(300)]

# kind -> (driver class, [iptables] backend, examples)
KINDS = {
    "iptables-nft": (IptablesFirewallDriver, "nft", 150),
    "iptables-legacy": (IptablesFirewallDriver, "legacy", 150),
    "ipset": (IpsetFirewallDriver, "auto", 150),
    "nftables": (NftablesFirewallDriver, "auto", 150),
    "iptc": (IptcFirewallDriver, "auto", 60),      # a python helper per chain write
}


class RecordingRunner(runner_mod.Runner):
    """The real Runner, remembering the commands that write (not the -save/list reads)."""

    def __init__(self, netns: str):
        super().__init__(netns)
        self.writes: list[tuple[str, ...]] = []

    def execute(self, cmd, input=None, check=True):
        reads = {("ipset", "save"), ("nft", "-j")}
        if tuple(cmd[:2]) not in reads and not cmd[0].endswith("-save"):
            self.writes.append(tuple(cmd))
        return super().execute(cmd, input=input, check=check)


def _iptc_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import iptc"], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------- what the kernel holds

def _drop_rules(ns: str, tool: str) -> int:
    text = netns_exec(ns, tool, "-t", "filter").stdout
    return sum(1 for line in text.splitlines() if line.startswith("-A nova-provider ") and line.endswith("-j DROP"))


def _ipset_members(ns: str) -> int:
    text = netns_exec(ns, "ipset", "save").stdout
    live = {line.split()[1] for line in text.splitlines()
            if line.startswith("create pfw") and not line.split()[1].endswith(("-t", "-check"))}
    return sum(1 for line in text.splitlines() if line.startswith("add ") and line.split()[1] in live)


def _nft_elements(ns: str) -> int:
    listing = netns_exec(ns, "nft", "-j", "list", "table", "inet", "provfw").stdout
    return sum(len(item["set"].get("elem", [])) for item in json.loads(listing)["nftables"] if "set" in item)


def kernel_count(kind: str, ns: str) -> int:
    """How many provider rules the kernel holds in ``ns``, read with the tools, not the driver."""
    if kind.startswith("iptables"):
        flavour = kind.split("-")[1]
        return _drop_rules(ns, f"iptables-{flavour}-save") + _drop_rules(ns, f"ip6tables-{flavour}-save")
    if kind in ("ipset", "iptc"):
        return _ipset_members(ns)
    return _nft_elements(ns)


def _leftovers(ns: str) -> str:
    """Anything provfw left in the namespace after teardown."""
    out = [netns_exec(ns, "ipset", "list", "-n").stdout.strip()]
    out.append("provfw" if "provfw" in netns_exec(ns, "nft", "list", "tables").stdout else "")
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        out += [line for line in netns_exec(ns, tool, "-t", "filter").stdout.splitlines()
                if re.search(r"nova-provider|provfw", line)]
    return "\n".join(o for o in out if o)


# ----------------------------------------------------------------------------- the property

@pytest.mark.parametrize("kind", list(KINDS))
def test_every_rule_set_the_api_accepts_is_applied_held_and_stable_on_a_real_kernel(kind, conf):
    services.require_root_netns()
    services.require_tools("ipset", "nft", "iptables-nft-restore", "iptables-legacy-restore")
    if kind == "iptc":
        services.require(_iptc_importable(), "python-iptables (import iptc)")
    cls, backend, examples = KINDS[kind]
    with RoutedTopology(listener=False) as topo:
        conf.set_override("dataplane_netns", topo.hv, "compute")
        conf.set_override("backend", backend, "iptables")
        runner = RecordingRunner(topo.hv)
        rules = AppliedRules(cls(conf=conf, runner=runner))
        seen = {"examples": 0, "rules": 0}

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        @given(specs=rule_sets(), full=st.booleans())
        def apply_and_reapply(specs, full):
            if full:
                rules.rebuild(specs)
            else:
                rules.apply(added=specs - rules.desired, removed=rules.desired - specs)
            assert rules.desired == specs
            assert kernel_count(kind, topo.hv) == len(specs), \
                f"the kernel holds {kernel_count(kind, topo.hv)} provider rules, {len(specs)} were applied"
            runner.writes.clear()
            again = rules.repair()
            assert again.changed is False and runner.writes == [], \
                f"a second apply of {sorted(specs)} wrote {runner.writes}"
            seen["examples"] += 1
            seen["rules"] += len(specs)

        try:
            apply_and_reapply()
        finally:
            rules.driver.teardown()
        assert _leftovers(topo.hv) == ""
        assert seen["examples"] >= examples // 2, seen
