"""Set-based drivers (ipset, nftables, iptc's pure part) driven with RuleUpdate values against a dataplane
that interprets their input (tests/lib/fake_sets.py).  No database: a delta is set up by passing the
state a previous call returned (or one built by hand), never by writing a driver's fields."""

from __future__ import annotations

import ipaddress

import pytest

from provfw import exception
from provfw.rules import RuleSpec, make_spec
from provfw.virt.firewall import RuleUpdate, iptables, iptc, nftables, sets
from provfw.virt.firewall import ipset as ipset_mod
from provfw.virt.firewall.ipset import IpsetFirewallDriver, SetSize, SetsState
from provfw.virt.firewall.nftables import NftablesFirewallDriver
from tests.lib.applied import AppliedRules
from tests.lib.fake_sets import FakeSetDataplane

ALL_DRIVERS = ("ipset", "nftables")
REFUSED = RuleSpec("fe80::1%eth0/128", "all", -1, -1)       # bypasses validation; no kernel tool parses it


def hosts(count: int, base: str = "100.64.0.0") -> list:
    start = int(ipaddress.ip_address(base))
    return [make_spec(str(ipaddress.ip_address(start + i))) for i in range(count)]


@pytest.fixture
def plane():
    return FakeSetDataplane()


def make_driver(kind: str, conf, plane):
    cls = {"ipset": IpsetFirewallDriver, "nftables": NftablesFirewallDriver}[kind]
    return cls(conf=conf, runner=plane)


def applied(kind, conf, plane) -> AppliedRules:
    return AppliedRules(make_driver(kind, conf, plane))


MIXED = [make_spec("203.0.113.7"), make_spec("198.51.100.0/24", "tcp", 22),
         make_spec("10.0.0.0/8", "udp", 53), make_spec("10.1.0.0/16", "udp", 53),
         make_spec("2001:db8::/32", "icmp", 128, 0), make_spec("2001:db8:1::5", "all")]


# ----------------------------------------------------------------------------- both drivers

@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_full_apply_blocks_exactly_the_rules_and_a_second_apply_writes_nothing(kind, conf, plane):
    rules = applied(kind, conf, plane)
    assert rules.rebuild(MIXED).changed is True
    assert plane.drops("203.0.113.7", "udp", 9)
    assert not plane.drops("203.0.113.8", "udp", 9)
    assert plane.drops("198.51.100.9", "tcp", 22) and not plane.drops("198.51.100.9", "tcp", 23)
    assert plane.drops("10.200.0.1", "udp", 53) and not plane.drops("10.200.0.1", "tcp", 53)
    assert plane.drops("2001:db8:ffff::1", "icmp", icmp_type=128, icmp_code=0)
    assert not plane.drops("2001:db8:ffff::1", "icmp", icmp_type=129, icmp_code=0)
    assert plane.drops("2001:db8:1::5", "tcp", 1) and not plane.drops("2001:db8:1::6", "tcp", 1)
    plane.reset_calls()
    assert rules.repair().changed is False
    assert plane.writes() == []


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_a_delta_writes_one_command_and_reads_nothing(kind, conf, plane):
    rules = applied(kind, conf, plane)
    rules.rebuild(MIXED + hosts(500))
    plane.reset_calls()
    result = rules.apply(added=[make_spec("192.0.2.1")], removed=[make_spec("100.64.0.3")])
    assert result.mode == "delta" and len(plane.calls) == 1, plane.calls
    assert plane.drops("192.0.2.1") and not plane.drops("100.64.0.3") and plane.drops("100.64.0.4")


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_deleting_a_network_keeps_a_containing_or_contained_one_in_force(kind, conf, plane):
    wide, narrow = make_spec("10.0.0.0/8", "udp", 53), make_spec("10.1.0.0/16", "udp", 53)
    rules = applied(kind, conf, plane)
    rules.rebuild([wide, narrow])
    rules.unblock(narrow)
    assert plane.drops("10.1.2.3", "udp", 53), "the /8 still covers the deleted /16"
    rules.rebuild([narrow])
    assert plane.drops("10.1.2.3", "udp", 53) and not plane.drops("10.2.0.1", "udp", 53)


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_a_new_group_gets_its_set_before_the_rule_and_an_emptied_group_goes(kind, conf, plane):
    rules = applied(kind, conf, plane)
    rules.rebuild(hosts(3))
    ssh = make_spec("192.0.2.0/24", "tcp", 22)
    rules.block(ssh)
    assert plane.drops("192.0.2.9", "tcp", 22)
    rules.unblock(ssh)
    assert not plane.drops("192.0.2.9", "tcp", 22) and plane.drops("100.64.0.1")
    plane.reset_calls()
    assert rules.repair().changed is False, "the change left exactly the full state"


def test_ipset_treats_a_new_or_emptied_group_as_structural_and_plans_it_in_full(conf, plane):
    rules = applied("ipset", conf, plane)
    rules.rebuild(hosts(3))
    assert rules.block(make_spec("192.0.2.0/24", "tcp", 22)).mode == "full"
    assert rules.unblock(make_spec("192.0.2.0/24", "tcp", 22)).mode == "full"
    assert rules.unblock(*hosts(2)).mode == "delta"


def test_nft_adds_and_deletes_sets_inside_the_delta_transaction(conf, plane):
    rules = applied("nftables", conf, plane)
    rules.rebuild(hosts(3))
    plane.reset_calls()
    assert rules.block(make_spec("192.0.2.0/24", "tcp", 22)).mode == "delta"
    assert rules.unblock(make_spec("192.0.2.0/24", "tcp", 22)).mode == "delta"
    assert [c.cmd for c in plane.calls] == [("nft", "-f", "-")] * 2, "no kernel read"


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_more_rules_than_max_rules_fail_loudly_and_write_nothing(kind, conf, plane):
    conf.set_override("max_rules", 10)
    with pytest.raises(exception.DriverError, match="max_rules"):
        applied(kind, conf, plane).rebuild(hosts(11))
    assert plane.writes() == []


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_the_state_is_a_value_the_caller_may_keep_and_hand_back(kind, conf, plane):
    rules = applied(kind, conf, plane)
    first = rules.rebuild(hosts(5)).state
    second = rules.block(make_spec("192.0.2.1")).state
    assert first != second, "the first state did not change under its holder"
    with pytest.raises(TypeError):
        next(iter(vars(first).values()))["x"] = 1               # read-only mapping


# ----------------------------------------------------------------------------- checks

@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_a_check_of_valid_rules_changes_nothing_and_leaves_nothing(kind, conf, plane):
    rules = applied(kind, conf, plane)
    rules.rebuild(MIXED)
    before = (plane.iptables.save(4), plane.iptables.save(6), {n: set(s.members) for n, s in plane.ipset.sets.items()},
              repr(plane.nft.tables))
    rules.driver.check_provider_fw_rules(hosts(50) + [make_spec("192.0.2.0/24", "tcp", 80, 90)])
    after = (plane.iptables.save(4), plane.iptables.save(6), {n: set(s.members) for n, s in plane.ipset.sets.items()},
             repr(plane.nft.tables))
    assert after == before


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_a_check_of_a_refused_rule_raises_and_leaves_no_scratch_behind(kind, conf, plane):
    rules = applied(kind, conf, plane)
    rules.rebuild(MIXED)
    before = (plane.iptables.save(6), set(plane.ipset.sets), repr(plane.nft.tables))
    for _ in range(2):                                          # safe to run any number of times
        with pytest.raises(exception.DriverError):
            rules.driver.check_provider_fw_rules([make_spec("2001:db8::9"), REFUSED])
    assert (plane.iptables.save(6), set(plane.ipset.sets), repr(plane.nft.tables)) == before
    rules.driver.check_provider_fw_rules([make_spec("2001:db8::9")])


def test_ipset_check_tests_the_group_rules_against_the_scratch_set(conf, plane):
    driver = make_driver("ipset", conf, plane)
    # A port the kernel tools refuse only in the iptables rule: the set member itself is fine.
    with pytest.raises(exception.DriverError, match="invalid port"):
        driver.check_provider_fw_rules([RuleSpec("192.0.2.0/24", "tcp", 70000, 70000)])
    assert plane.ipset.sets == {}


# ----------------------------------------------------------------------------- ipset

def test_ipset_large_rebuild_fills_a_temporary_set_and_swaps_it_with_no_window(conf, plane):
    conf.set_override("full_rebuild_delta", 100, "sets")
    attacker = make_spec("198.18.1.2")
    rules = applied("ipset", conf, plane)
    rules.rebuild([attacker] + hosts(1000))
    plane.ipset.watch(ipset_mod.DRIVER_SETS.name(sets.match_key(attacker)), "198.18.1.2")
    plane.reset_calls()
    rules.rebuild([attacker] + hosts(1000, "100.65.0.0"))
    restore = [c for c in plane.commands("ipset") if c.cmd[1] == "restore"]
    assert len(restore) == 1 and "\nswap pfw4-all-any-t pfw4-all-any\n" in restore[0].input
    assert plane.ipset.windows == []
    assert set(plane.ipset.sets) == {"pfw4-all-any"}
    assert plane.drops("100.65.3.200") and not plane.drops("100.64.0.1")


def test_ipset_small_drift_is_repaired_in_place_and_normalised_hosts_compare_equal(conf, plane):
    rules = applied("ipset", conf, plane)
    rules.rebuild(hosts(100) + [make_spec("2001:db8::1")])
    assert "100.64.0.1" in plane.ipset.sets["pfw4-all-any"].members      # ipset spells /32 as a bare address
    plane(["ipset", "del", "pfw4-all-any", "100.64.0.7"])
    plane.iptables.run(4, "-D FORWARD 1")
    plane.reset_calls()
    assert rules.repair().changed is True
    restore = [c for c in plane.commands("ipset") if c.cmd[1] == "restore"]
    assert restore[0].input == "add pfw4-all-any 100.64.0.7\n"
    assert plane.drops("100.64.0.7") and plane.drops("2001:db8::1")


def test_ipset_delta_past_maxelem_rebuilds_into_a_bigger_set_instead_of_failing_half_way(conf, plane):
    conf.set_override("min_set_size", 1024, "sets")
    conf.set_override("headroom", 1.1, "sets")
    driver = make_driver("ipset", conf, plane)
    AppliedRules(driver).rebuild(hosts(1000))
    assert plane.ipset.sets["pfw4-all-any"].maxelem == 1100
    # The state a reconciler kept says the set holds 1000 of 1100.
    state = SetsState({"pfw4-all-any": SetSize(1000, 1100)})
    more = hosts(300, "100.70.0.0")
    result = driver.refresh_provider_fw_rules(RuleUpdate(frozenset(hosts(1000) + more), added=tuple(more)), state)
    live = plane.ipset.sets["pfw4-all-any"]
    assert result.mode == "full" and len(live.members) == 1300 and live.maxelem >= 1300
    assert result.state.sizes["pfw4-all-any"] == SetSize(1300, live.maxelem)
    assert any("swap" in (c.input or "") for c in plane.commands("ipset"))


def test_ipset_delta_that_fills_a_set_to_the_brim_deletes_before_it_adds(conf, plane):
    conf.set_override("min_set_size", 1024, "sets")
    conf.set_override("headroom", 1.1, "sets")
    rules = applied("ipset", conf, plane)
    rules.rebuild(hosts(1100))
    assert rules.apply(added=hosts(5, "100.70.0.0"), removed=hosts(5)).mode == "delta"
    assert len(plane.ipset.sets["pfw4-all-any"].members) == 1100 and plane.drops("100.70.0.4")


def test_ipset_failed_fill_destroys_scratch_sets_and_leaves_the_live_set_whole(conf, plane, monkeypatch):
    conf.set_override("full_rebuild_delta", 10, "sets")
    rules = applied("ipset", conf, plane)
    rules.rebuild(hosts(200))
    before = set(plane.ipset.sets["pfw4-all-any"].members)
    # A sizing bug (or the kernel refusing memory) makes the temporary set too small.
    monkeypatch.setattr(ipset_mod, "capacity", lambda entries, conf: 50)
    with pytest.raises(exception.DriverError, match="Hash is full"):
        rules.rebuild(hosts(200, "100.80.0.0") + [make_spec("192.0.2.0/24", "tcp", 22)])
    assert plane.ipset.sets["pfw4-all-any"].members == before
    assert set(plane.ipset.sets) == {"pfw4-all-any"}, "temporary and new sets were destroyed"
    assert not plane.drops("192.0.2.1", "tcp", 22)


def test_ipset_set_of_the_wrong_family_is_recreated(conf, plane):
    plane(["ipset", "create", "pfw4-all-any", "hash:net", "family", "inet6"])
    applied("ipset", conf, plane).rebuild(hosts(2))
    assert plane.ipset.sets["pfw4-all-any"].family == "inet" and plane.drops("100.64.0.1")


def test_ipset_leftover_scratch_and_obsolete_sets_are_destroyed_after_the_chains(conf, plane):
    rules = applied("ipset", conf, plane)
    rules.rebuild(hosts(2) + [make_spec("192.0.2.0/24", "tcp", 22)])
    plane(["ipset", "create", "pfw4-check", "hash:net"])
    rules.rebuild(hosts(2))
    assert set(plane.ipset.sets) == {"pfw4-all-any"}


def test_ipset_teardown_removes_chains_then_every_owned_set(conf, plane):
    plane(["ipset", "create", "foreign", "hash:net"])
    rules = applied("ipset", conf, plane)
    rules.rebuild(MIXED)
    rules.driver.teardown()
    assert set(plane.ipset.sets) == {"foreign"}
    assert not plane.iptables.has_chain("nova-provider") and not plane.drops("203.0.113.7")


# ----------------------------------------------------------------------------- nftables

def test_nft_large_rebuild_flushes_and_refills_in_the_same_transaction_without_touching_the_table(conf, plane):
    conf.set_override("full_rebuild_delta", 100, "sets")
    rules = applied("nftables", conf, plane)
    rules.rebuild(hosts(1000))
    plane.reset_calls()
    rules.rebuild(hosts(1000, "100.65.0.0"))
    scripts = [c.input for c in plane.commands("nft") if c.cmd[1] == "-f"]
    assert len(scripts) == 1
    assert "flush set inet provfw pfw4_all_p32" in scripts[0] and "delete table" not in scripts[0]
    assert plane.drops("100.65.0.1") and not plane.drops("100.64.0.1")


def test_nft_delta_against_drifted_kernel_falls_back_to_a_full_apply(conf, plane):
    rules = applied("nftables", conf, plane)
    rules.rebuild(hosts(10))
    plane(["nft", "delete", "element", "inet", "provfw", "pfw4_all_p32", "{ 100.64.0.3 }"])
    result = rules.apply(added=[make_spec("192.0.2.1")], removed=[make_spec("100.64.0.3")])
    assert result.mode == "full"
    assert plane.drops("192.0.2.1") and not plane.drops("100.64.0.3") and plane.drops("100.64.0.4")


def test_nft_chain_with_a_changed_priority_is_replaced_in_one_transaction(conf, plane):
    rules = applied("nftables", conf, plane)
    rules.rebuild(hosts(3))
    plane.nft.tables[("inet", "provfw")]["chains"]["forward"]["spec"]["prio"] = 0
    assert rules.repair().changed is True
    assert plane.nft.tables[("inet", "provfw")]["chains"]["forward"]["spec"]["prio"] == nftables.PRIORITY
    assert plane.drops("100.64.0.2")


def test_nft_missing_table_is_read_from_the_table_list_not_from_an_error(conf, plane):
    rules = applied("nftables", conf, plane)
    rules.rebuild(hosts(2))
    plane(["nft", "delete", "table", "inet", "provfw"])
    plane.reset_calls()
    assert rules.repair().changed is True and plane.drops("100.64.0.1")
    assert all(c.ok for c in plane.calls), "no command failed on the way"


def test_nft_rules_mask_the_source_to_the_set_prefix():
    wide = nftables.group_elements([make_spec("10.1.0.0/16", "tcp", 22)])
    (set_key,) = wide
    assert wide[set_key] == {"10.1.0.0"}
    assert "ip saddr & 255.255.0.0 @pfw4_tcp_22_22_p16 tcp dport 22 drop" in nftables.render_rule(set_key)


def test_nft_teardown_deletes_the_table_and_a_second_teardown_does_nothing(conf, plane):
    rules = applied("nftables", conf, plane)
    rules.rebuild(MIXED)
    rules.driver.teardown()
    assert plane.nft.tables == {}
    plane.reset_calls()
    rules.driver.teardown()
    assert plane.writes() == []


# ----------------------------------------------------------------------------- iptc (pure part)

def test_iptc_rules_carry_the_ipset_drivers_comments_so_switching_drivers_rewrites_nothing(conf):
    driver = iptc.IptcFirewallDriver(conf=conf, runner=FakeSetDataplane())
    keys = {sets.match_key(s) for s in MIXED}
    name = ipset_mod.DRIVER_SETS.name
    for version in (4, 6):
        rules = iptc.desired_rules(keys, version, driver.layout, name)
        chain = iptables.desired_set_chain(keys, version, driver.layout, name)
        assert [r["comment"] for r in rules] == [c.split("--comment ")[1].split()[0] for c in chain]
    v6 = iptc.desired_rules(keys, 6, driver.layout, name)
    (icmp,) = [r for r in v6 if r.get("set") == "pfw6-icmp-128-0"]
    assert icmp["protocol"] == "icmpv6" and icmp["icmp_type"] == "128/0"


def test_iptc_plans_its_chain_as_one_helper_command_only_when_the_legacy_table_differs(conf):
    plane = FakeSetDataplane()
    keys = {sets.match_key(s) for s in MIXED}
    driver = iptc.IptcFirewallDriver(conf=conf, runner=plane)
    (step,) = driver.chain_steps(keys)
    assert step.argv == iptc.helper_command() and '"action": "apply"' in step.input
    # The ipset driver on legacy iptables writes what the helper would: nothing is left to commit.
    conf.set_override("backend", "legacy", "iptables")
    AppliedRules(IpsetFirewallDriver(conf=conf, runner=plane)).rebuild(MIXED)
    assert driver.chain_steps(keys) == ()


def test_nft_elements_listed_with_a_dotted_ipv6_tail_compare_equal_to_the_rules_that_made_them():
    """nft prints ::102:304 as ::1.2.3.4 (inet_ntop); read as is, a second apply rewrote the set every time."""
    listing = ('{"nftables": [{"set": {"family": "inet", "name": "pfw6_all_p128", "table": "provfw", '
               '"type": "ipv6_addr", "elem": ["::1.2.3.4", "2001:db8::1", "::"]}}]}')
    table = nftables.parse_table(listing)
    assert table.sets["pfw6_all_p128"][2] == {"::102:304", "2001:db8::1", "::"}


def test_nftables_grouping_a_whole_rule_set_lets_other_green_threads_run(monkeypatch):
    # As the ipset driver's grouping (tests/unit/test_ipset.py): a cast arriving while a drift check groups
    # 120k rules runs between two chunks of it.
    from provfw.rules import make_spec
    from provfw.virt.firewall import nftables, sets
    from tests.lib.green import ticks_during

    specs = [make_spec(f"45.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(3 * sets.YIELD_EVERY)]
    elements, during = ticks_during(monkeypatch, lambda: nftables.group_elements(specs))
    assert sum(len(members) for members in elements.values()) == len(specs)
    assert during >= 3
