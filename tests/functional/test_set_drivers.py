"""Set-based drivers on a real kernel: namespaces, real sets, real packets.

The hypervisor namespace of ``RoutedTopology`` is the dataplane
(``[compute] dataplane_netns``); rules are handed over as RuleUpdate values
(``tests.lib.applied.AppliedRules`` keeps what the worker's reconciler
would keep) - no database.  A ``RecordingRunner`` runs every command for real
and remembers it, so a test can say what kind of apply happened.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time

import pytest

from provfw import exception, runner as runner_mod
from provfw.rules import RuleSpec, make_spec
from provfw.virt.firewall import ipset as ipset_mod
from provfw.virt.firewall.ipset import IpsetFirewallDriver
from provfw.virt.firewall.iptc import IptcFirewallDriver
from provfw.virt.firewall.nftables import NftablesFirewallDriver
from tests.lib import services
from tests.lib.applied import AppliedRules
from tests.lib.netns import RoutedTopology, netns_exec, save_rule_set, wait_until
from tests.lib.traffic import Flood, InstanceCounter

pytestmark = [pytest.mark.functional, pytest.mark.timeout(240)]

DRIVERS = {"ipset": IpsetFirewallDriver, "nftables": NftablesFirewallDriver, "iptc": IptcFirewallDriver}
REFUSED = RuleSpec("fe80::1%eth0/128", "all", -1, -1)       # bypasses validation; no kernel tool parses it


class RecordingRunner(runner_mod.Runner):
    """The real Runner, remembering each command it ran."""

    def __init__(self, netns: str):
        super().__init__(netns)
        self.commands: list[tuple[tuple[str, ...], str | None]] = []

    def execute(self, cmd, input=None, check=True):
        self.commands.append((tuple(cmd), input))
        return super().execute(cmd, input=input, check=check)

    def writes(self) -> list[tuple[str, ...]]:
        reads = {("ipset", "save"), ("nft", "-j")}
        return [c for c, _ in self.commands if c[:2] not in reads and not c[0].endswith("-save")]


@pytest.fixture
def topo():
    services.require_root_netns()
    services.require_tools("ipset", "nft", "iptables-restore", "iptables-legacy-save")
    with RoutedTopology() as topology:
        yield topology


def make_driver(kind: str, conf, topo) -> tuple:
    """(AppliedRules around a fresh driver of ``kind`` in the hypervisor namespace, its recording runner)."""
    conf.set_override("dataplane_netns", topo.hv, "compute")
    runner = RecordingRunner(topo.hv)
    return AppliedRules(DRIVERS[kind](conf=conf, runner=runner)), runner


def hosts(count: int, base: str = "100.64.0.0") -> list:
    start = int(ipaddress.ip_address(base))
    return [make_spec(str(ipaddress.ip_address(start + i))) for i in range(count)]


def kernel_matches(rules: AppliedRules) -> bool:
    """A full plan of what was applied finds nothing to write (it reads the kernel, writes nothing)."""
    return rules.driver.plan_full(rules.desired).empty


def dataplane_snapshot(topo) -> tuple:
    """Everything provfw could have touched in the namespace, as text."""
    def out(*cmd):
        return netns_exec(topo.hv, *cmd).stdout

    return (out("ipset", "save"), out("nft", "list", "ruleset"),
            *(save_rule_set(out(tool, "-t", "filter")) for tool in
              ("iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save")))


ATTACKER, BYSTANDER = RoutedTopology.ATTACKER4
ATTACKER6, BYSTANDER6 = RoutedTopology.ATTACKER6


# ----------------------------------------------------------------------------- scale

@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_a_100k_entry_set_blocks_an_address_inside_and_passes_one_outside(kind, conf, topo):
    specs = hosts(99_990) + [make_spec(f"100.{96 + i}.0.0/16") for i in range(8)]
    specs += [make_spec(ATTACKER), make_spec(ATTACKER6)]
    rules, runner = make_driver(kind, conf, topo)
    result = rules.block(*specs)
    held = (sum(size.members for size in result.state.sizes.values()) if kind == "ipset"
            else sum(result.state.counts.values()))
    assert result.mode == "full" and held == 100_000
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.blocked(ATTACKER6, topo.INSTANCE6)
    assert topo.reachable(BYSTANDER, topo.INSTANCE4) and topo.reachable(BYSTANDER6, topo.INSTANCE6)
    runner.commands.clear()
    assert rules.repair().changed is False and runner.writes() == [], "a second apply writes nothing"


# ----------------------------------------------------------------------------- no window during rebuilds

def _rebuild_specs(round_number: int) -> list:
    return [make_spec(ATTACKER)] + hosts(9_999, str(ipaddress.ip_address("100.64.0.0") + 10_000 * round_number))


def _flood_counts(topo, counter, rebuild) -> tuple[int, int]:
    """(packets sent, packets that reached the instance) while ``rebuild`` runs."""
    before = counter.packets()
    flood = Flood(topo, ATTACKER)
    try:
        time.sleep(0.2)
        rebuild()
        time.sleep(0.2)
    finally:
        sent = flood.stop()
    return sent, counter.packets() - before


@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_ten_full_rebuilds_of_10k_entries_let_no_packet_of_a_flooding_blocked_source_through(kind, conf, topo):
    conf.set_override("full_rebuild_delta", 1000, "sets")
    counter = InstanceCounter(topo)
    sent, arrived = _flood_counts(topo, counter, lambda: time.sleep(0.3))
    assert arrived > 100, f"the flood must reach the instance before blocking (sent {sent}, arrived {arrived})"
    rules, runner = make_driver(kind, conf, topo)
    rules.rebuild(_rebuild_specs(0))

    def ten_rebuilds():
        for round_number in range(1, 11):
            runner.commands.clear()
            assert rules.rebuild(_rebuild_specs(round_number)).changed is True
            written = "\n".join(i or "" for _, i in runner.commands)
            # Each round really replaced the set's contents through the atomic path.
            assert ("swap pfw4-all-any-t pfw4-all-any" in written if kind == "ipset"
                    else "flush set inet provfw pfw4_all_p32" in written)

    sent, arrived = _flood_counts(topo, counter, ten_rebuilds)
    assert sent > 10_000, f"the flood sent only {sent} packets"
    assert arrived == 0, f"{arrived} of {sent} blocked packets reached the instance during ten full rebuilds"


def test_the_flood_counter_does_see_leaks_of_a_flush_then_restore_rebuild(conf, topo):
    """Control for the test above: the naive rebuild the design forbids is caught leaking."""
    counter = InstanceCounter(topo)
    rules, runner = make_driver("ipset", conf, topo)
    rules.rebuild(_rebuild_specs(0))

    def naive_rebuilds():
        for round_number in range(1, 4):
            lines = ["flush pfw4-all-any"] + [f"add pfw4-all-any {ipset_mod.member(s.cidr)}"
                                              for s in _rebuild_specs(round_number)]
            runner(["ipset", "restore", "-exist"], input="\n".join(lines) + "\n")

    sent, arrived = _flood_counts(topo, counter, naive_rebuilds)
    assert arrived > 0, f"flush-then-restore leaked nothing out of {sent}: the counter cannot see leaks"


# ----------------------------------------------------------------------------- deltas

@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_add_delete_and_expiry_are_deltas_and_the_kernel_matches_the_rules_after_each(kind, conf, topo):
    rules, runner = make_driver(kind, conf, topo)
    assert rules.rebuild(hosts(2000)).mode == "full"

    def assert_delta_only(result):
        assert result.mode == "delta"
        # No kernel read; nft: one write; ipset: the members go over netlink, no process at all.
        assert len(runner.commands) == (0 if kind == "ipset" else 1), runner.commands
        runner.commands.clear()
        assert kernel_matches(rules), "kernel differs from the rules handed over"
        runner.commands.clear()

    runner.commands.clear()
    assert_delta_only(rules.block(make_spec(ATTACKER)))
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.reachable(BYSTANDER, topo.INSTANCE4)

    assert_delta_only(rules.unblock(make_spec(ATTACKER)))
    assert wait_until(lambda: topo.reachable(ATTACKER, topo.INSTANCE4), 5)

    # A rule with an expiry: the reconciler sends it as an addition, and at its expiry as a removal.
    assert_delta_only(rules.block(make_spec(ATTACKER)))
    assert topo.blocked(ATTACKER, topo.INSTANCE4)
    assert_delta_only(rules.unblock(make_spec(ATTACKER)))
    assert wait_until(lambda: topo.reachable(ATTACKER, topo.INSTANCE4), 5)


# ----------------------------------------------------------------------------- set sizes

def _kernel_sets(runner) -> dict:
    return ipset_mod.read_sets(runner, ipset_mod.DRIVER_SETS.owns)


def _kernel_members(runner, name: str) -> set[str]:
    return _kernel_sets(runner)[name].members


def test_a_restore_past_the_set_size_never_leaves_a_partly_filled_set_and_a_bigger_set_is_swapped_in(
        conf, topo, monkeypatch):
    conf.set_override("min_set_size", 1024, "sets")
    conf.set_override("headroom", 1.1, "sets")
    conf.set_override("full_rebuild_delta", 100, "sets")
    rules, runner = make_driver("ipset", conf, topo)
    first = [make_spec(ATTACKER)] + hosts(999)
    rules.rebuild(first)
    before = _kernel_members(runner, "pfw4-all-any")
    assert len(before) == 1000

    # The kernel refuses the fill half way ("Hash is full"): nothing may be swapped in.
    bigger = [make_spec(ATTACKER)] + hosts(2999, "100.70.0.0")
    monkeypatch.setattr(ipset_mod, "capacity", lambda entries, conf: 1500)
    with pytest.raises(exception.DriverError, match="Hash is full"):
        rules.rebuild(bigger)
    monkeypatch.undo()
    assert _kernel_members(runner, "pfw4-all-any") == before
    assert set(_kernel_sets(runner)) == {"pfw4-all-any"}
    assert topo.blocked(ATTACKER, topo.INSTANCE4)

    # Sized right, the same rebuild goes into a bigger temporary set, swapped with the 1100-entry one.
    rules.rebuild(bigger)
    live = _kernel_sets(runner)["pfw4-all-any"]
    assert live.maxelem >= 3300 and len(live.members) == 3000

    # A delta past maxelem becomes a rebuild into a bigger set, not a half-applied restore.
    assert rules.block(*hosts(400, "100.80.0.0")).mode == "full"
    assert len(_kernel_members(runner, "pfw4-all-any")) == 3400
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.reachable(BYSTANDER, topo.INSTANCE4)


# ----------------------------------------------------------------------------- iptc on legacy iptables

def test_iptc_commits_the_chain_to_legacy_iptables_and_repairs_a_deleted_jump(conf, topo):
    services.require(_iptc_importable(), "python-iptables (import iptc)")
    rules, runner = make_driver("iptc", conf, topo)
    assert rules.block(*hosts(1000), make_spec(ATTACKER), make_spec(ATTACKER6),
                       make_spec("198.18.9.0/24", "tcp", 8080)).mode == "full"
    legacy = netns_exec(topo.hv, "iptables-legacy-save", "-t", "filter").stdout
    assert "-A FORWARD -m comment --comment \"provfw:jump\" -j nova-provider" in legacy
    assert "--match-set pfw4-all-any src" in legacy and "--match-set pfw4-tcp-8080 src" in legacy
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.blocked(ATTACKER6, topo.INSTANCE6)
    assert topo.reachable(BYSTANDER, topo.INSTANCE4)

    netns_exec(topo.hv, "iptables-legacy", "-D", "FORWARD", "1")
    assert topo.reachable(ATTACKER, topo.INSTANCE4)
    assert rules.repair().changed is True
    assert topo.blocked(ATTACKER, topo.INSTANCE4)
    runner.commands.clear()
    assert rules.repair().changed is False and runner.writes() == []
    # One more CIDR of an existing group: its member goes over netlink, no process, no helper.
    runner.commands.clear()
    assert rules.block(make_spec(BYSTANDER)).mode == "delta" and runner.commands == []
    assert topo.blocked(BYSTANDER, topo.INSTANCE4)

    rules.driver.teardown()
    assert "nova-provider" not in netns_exec(topo.hv, "iptables-legacy-save", "-t", "filter").stdout
    assert topo.reachable(ATTACKER, topo.INSTANCE4)


def _iptc_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import iptc"], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_teardown_removes_everything_the_driver_put_in_the_namespace(kind, conf, topo):
    rules, runner = make_driver(kind, conf, topo)
    rules.rebuild([make_spec(ATTACKER), make_spec("198.18.9.0/24", "udp", 53)])
    assert topo.blocked(ATTACKER, topo.INSTANCE4)
    rules.driver.teardown()
    assert topo.reachable(ATTACKER, topo.INSTANCE4)
    assert runner(["ipset", "list", "-n"]).strip() == ""
    assert "provfw" not in runner(["nft", "list", "tables"])
    assert "nova-provider" not in runner(["iptables-save", "-t", "filter"])


# ----------------------------------------------------------------------------- checks (the reconciler's bisection)

CHECK_KINDS = ["ipset", "nftables", "iptc"]


def _require(kind: str) -> None:
    if kind == "iptc":
        services.require(_iptc_importable(), "python-iptables (import iptc)")


@pytest.mark.parametrize("kind", CHECK_KINDS)
def test_a_check_of_rules_the_kernel_takes_passes_and_changes_nothing(kind, conf, topo):
    _require(kind)
    rules, runner = make_driver(kind, conf, topo)
    rules.rebuild([make_spec(ATTACKER), make_spec(ATTACKER6), make_spec("198.18.9.0/24", "tcp", 8080)])
    before = dataplane_snapshot(topo)
    rules.driver.check_provider_fw_rules(hosts(500) + [make_spec(BYSTANDER6), make_spec("192.0.2.0/24", "udp", 53),
                                                       make_spec("2001:db8::/32", "icmp", 128, 0)])
    assert dataplane_snapshot(topo) == before
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.reachable(BYSTANDER, topo.INSTANCE4)


@pytest.mark.parametrize("kind", CHECK_KINDS)
def test_a_check_of_a_rule_the_kernel_refuses_raises_and_leaves_the_namespace_as_it_was(kind, conf, topo):
    _require(kind)
    rules, runner = make_driver(kind, conf, topo)
    rules.rebuild([make_spec(ATTACKER), make_spec(ATTACKER6)])
    before = dataplane_snapshot(topo)
    for _ in range(2):                                             # safe to repeat, nothing left behind
        with pytest.raises(exception.DriverError):
            rules.driver.check_provider_fw_rules([make_spec(BYSTANDER6), REFUSED])
        assert dataplane_snapshot(topo) == before
    rules.driver.check_provider_fw_rules([make_spec(BYSTANDER6)])  # without it the rest passes
    assert topo.blocked(ATTACKER6, topo.INSTANCE6) and topo.reachable(BYSTANDER6, topo.INSTANCE6)
