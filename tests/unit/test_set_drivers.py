"""Set-based drivers (ipset, nftables, iptc's pure part) against a dataplane that interprets their input."""

from __future__ import annotations

import datetime
import ipaddress

import pytest

from provfw import exception
from provfw.db import api as db
from provfw.rules import make_spec
from provfw.virt import ipset_driver, iptc_driver, nftables_driver, sets
from provfw.virt.firewall import utcnow
from tests.unit.test_set_drivers_fake_dataplane import FakeSetDataplane

ALL_DRIVERS = ("ipset", "nftables")


def hosts(count: int, base: str = "100.64.0.0") -> list:
    start = int(ipaddress.ip_address(base))
    return [make_spec(str(ipaddress.ip_address(start + i))) for i in range(count)]


@pytest.fixture
def plane():
    return FakeSetDataplane()


def make_driver(kind: str, conf, plane):
    cls = {"ipset": ipset_driver.IpsetFirewallDriver, "nftables": nftables_driver.NftablesFirewallDriver}[kind]
    return cls(conf=conf, runner=plane)


MIXED = [make_spec("203.0.113.7"), make_spec("198.51.100.0/24", "tcp", 22),
         make_spec("10.0.0.0/8", "udp", 53), make_spec("10.1.0.0/16", "udp", 53),
         make_spec("2001:db8::/32", "icmp", 128, 0), make_spec("2001:db8:1::5", "all")]


# ----------------------------------------------------------------------------- both drivers

@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_full_apply_blocks_exactly_the_rules_and_a_second_apply_writes_nothing(kind, conf, plane):
    driver = make_driver(kind, conf, plane)
    assert driver.apply_full(MIXED) is True
    assert plane.drops("203.0.113.7", "udp", 9)
    assert not plane.drops("203.0.113.8", "udp", 9)
    assert plane.drops("198.51.100.9", "tcp", 22) and not plane.drops("198.51.100.9", "tcp", 23)
    assert plane.drops("10.200.0.1", "udp", 53) and not plane.drops("10.200.0.1", "tcp", 53)
    assert plane.drops("2001:db8:ffff::1", "icmp", icmp_type=128, icmp_code=0)
    assert not plane.drops("2001:db8:ffff::1", "icmp", icmp_type=129, icmp_code=0)
    assert plane.drops("2001:db8:1::5", "tcp", 1) and not plane.drops("2001:db8:1::6", "tcp", 1)
    plane.reset_calls()
    assert driver.apply_full(MIXED) is False
    assert plane.writes() == []


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_a_delta_writes_one_command_and_reads_nothing(kind, conf, plane):
    driver = make_driver(kind, conf, plane)
    driver.apply_full(MIXED + hosts(500))
    driver._rules = dict.fromkeys(MIXED + hosts(500))
    plane.reset_calls()
    new = make_spec("192.0.2.1")
    assert driver.apply_delta([new], [make_spec("100.64.0.3")]) is True
    assert len(plane.calls) == 1, plane.calls
    assert plane.drops("192.0.2.1") and not plane.drops("100.64.0.3") and plane.drops("100.64.0.4")


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_deleting_a_network_keeps_a_containing_or_contained_one_in_force(kind, conf, plane):
    wide, narrow = make_spec("10.0.0.0/8", "udp", 53), make_spec("10.1.0.0/16", "udp", 53)
    driver = make_driver(kind, conf, plane)
    driver.apply_full([wide, narrow])
    driver._rules = dict.fromkeys([wide, narrow])
    driver.apply_delta([], [narrow])
    assert plane.drops("10.1.2.3", "udp", 53), "the /8 still covers the deleted /16"
    driver.apply_full([narrow])
    assert plane.drops("10.1.2.3", "udp", 53) and not plane.drops("10.2.0.1", "udp", 53)


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_a_delta_that_adds_a_new_group_creates_its_set_before_the_rule_and_an_emptied_group_goes(kind, conf, plane):
    driver = make_driver(kind, conf, plane)
    driver.apply_full(hosts(3))
    driver._rules = dict.fromkeys(hosts(3))
    ssh = make_spec("192.0.2.0/24", "tcp", 22)
    driver.apply_delta([ssh], [])
    assert plane.drops("192.0.2.9", "tcp", 22)
    driver._rules[ssh] = None
    driver.apply_delta([], [ssh])
    assert not plane.drops("192.0.2.9", "tcp", 22) and plane.drops("100.64.0.1")
    plane.reset_calls()
    assert driver.apply_full(hosts(3)) is False, "the delta left exactly the full state"


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_more_rules_than_max_rules_fail_loudly_and_write_nothing(kind, conf, plane):
    conf.set_override("max_rules", 10)
    driver = make_driver(kind, conf, plane)
    with pytest.raises(exception.DriverError, match="max_rules"):
        driver.apply_full(hosts(11))
    assert plane.writes() == []


@pytest.mark.parametrize("kind", ALL_DRIVERS)
def test_refresh_reads_the_database_then_applies_deltas_and_expiry_without_a_full_rebuild(kind, conf, plane,
                                                                                          sqlite_db):
    db.provider_fw_rules_create_many(hosts(50))
    driver = make_driver(kind, conf, plane)
    assert driver.refresh_provider_fw_rules().mode == "full"
    soon = utcnow() + datetime.timedelta(seconds=30)
    db.provider_fw_rules_create_many([make_spec("192.0.2.7")], expires_at=soon)
    plane.reset_calls()
    result = driver.refresh_provider_fw_rules()
    assert result.mode == "delta" and len(plane.calls) == 1
    assert plane.drops("192.0.2.7")
    # Time travel: the rule's expiry has passed (the bookkeeping's expiry index included).
    driver._commit(None, added={make_spec("192.0.2.7"): utcnow() - datetime.timedelta(seconds=1)})
    plane.reset_calls()
    assert driver.expire_rules().mode == "expiry"
    assert len(plane.calls) == 1 and not plane.drops("192.0.2.7") and plane.drops("100.64.0.49")


# ----------------------------------------------------------------------------- ipset

def test_ipset_large_rebuild_fills_a_temporary_set_and_swaps_it_with_no_window(conf, plane):
    conf.set_override("full_rebuild_delta", 100, "sets")
    attacker = make_spec("198.18.1.2")
    driver = make_driver("ipset", conf, plane)
    driver.apply_full([attacker] + hosts(1000))
    plane.ipset.watch(sets.ipset_name(sets.match_key(attacker)), "198.18.1.2")
    plane.reset_calls()
    driver.apply_full([attacker] + hosts(1000, "100.65.0.0"))
    restore = [c for c in plane.commands("ipset") if c.cmd[1] == "restore"]
    assert len(restore) == 1 and "\nswap pfw4-all-any-t pfw4-all-any\n" in restore[0].input
    assert plane.ipset.windows == []
    assert set(plane.ipset.sets) == {"pfw4-all-any"}
    assert plane.drops("100.65.3.200") and not plane.drops("100.64.0.1")


def test_ipset_small_drift_is_repaired_in_place_and_normalised_hosts_compare_equal(conf, plane):
    driver = make_driver("ipset", conf, plane)
    driver.apply_full(hosts(100) + [make_spec("2001:db8::1")])
    assert "100.64.0.1" in plane.ipset.sets["pfw4-all-any"].members      # ipset spells /32 as a bare address
    plane(["ipset", "del", "pfw4-all-any", "100.64.0.7"])
    plane.iptables.run(4, "-D FORWARD 1")
    plane.reset_calls()
    assert driver.apply_full(hosts(100) + [make_spec("2001:db8::1")]) is True
    restore = [c for c in plane.commands("ipset") if c.cmd[1] == "restore"]
    assert restore[0].input == "add pfw4-all-any 100.64.0.7\n"
    assert plane.drops("100.64.0.7") and plane.drops("2001:db8::1")


def test_ipset_delta_past_maxelem_rebuilds_into_a_bigger_set_instead_of_failing_half_way(conf, plane):
    conf.set_override("min_set_size", 1024, "sets")
    conf.set_override("headroom", 1.1, "sets")
    driver = make_driver("ipset", conf, plane)
    driver.apply_full(hosts(1000))
    driver._rules = dict.fromkeys(hosts(1000))
    assert plane.ipset.sets["pfw4-all-any"].maxelem == 1100
    more = hosts(300, "100.70.0.0")
    driver.apply_delta(more, [])
    live = plane.ipset.sets["pfw4-all-any"]
    assert len(live.members) == 1300 and live.maxelem >= 1300
    assert any("swap" in (c.input or "") for c in plane.commands("ipset"))


def test_ipset_failed_fill_destroys_scratch_sets_and_leaves_the_live_set_whole(conf, plane, monkeypatch):
    conf.set_override("full_rebuild_delta", 10, "sets")
    driver = make_driver("ipset", conf, plane)
    driver.apply_full(hosts(200))
    before = set(plane.ipset.sets["pfw4-all-any"].members)
    # A sizing bug (or the kernel refusing memory) makes the temporary set too small.
    monkeypatch.setattr(sets, "set_capacity", lambda entries, conf: 50)
    with pytest.raises(exception.DriverError, match="live sets unchanged"):
        driver.apply_full(hosts(200, "100.80.0.0") + [make_spec("192.0.2.0/24", "tcp", 22)])
    assert plane.ipset.sets["pfw4-all-any"].members == before
    assert set(plane.ipset.sets) == {"pfw4-all-any"}, "temporary and new sets were destroyed"
    assert not plane.drops("192.0.2.1", "tcp", 22)


def test_ipset_set_of_the_wrong_family_is_recreated(conf, plane):
    plane(["ipset", "create", "pfw4-all-any", "hash:net", "family", "inet6"])
    driver = make_driver("ipset", conf, plane)
    driver.apply_full(hosts(2))
    assert plane.ipset.sets["pfw4-all-any"].family == "inet" and plane.drops("100.64.0.1")


# ----------------------------------------------------------------------------- nftables

def test_nft_large_rebuild_flushes_and_refills_in_the_same_transaction_without_touching_the_table(conf, plane):
    conf.set_override("full_rebuild_delta", 100, "sets")
    driver = make_driver("nftables", conf, plane)
    driver.apply_full(hosts(1000))
    plane.reset_calls()
    driver.apply_full(hosts(1000, "100.65.0.0"))
    scripts = [c.input for c in plane.commands("nft") if c.cmd[1] == "-f"]
    assert len(scripts) == 1
    assert "flush set inet provfw pfw4_all_p32" in scripts[0] and "delete table" not in scripts[0]
    assert plane.drops("100.65.0.1") and not plane.drops("100.64.0.1")


def test_nft_delta_against_drifted_kernel_falls_back_to_a_full_apply(conf, plane):
    driver = make_driver("nftables", conf, plane)
    driver.apply_full(hosts(10))
    driver._rules = dict.fromkeys(hosts(10))
    plane(["nft", "delete", "element", "inet", "provfw", "pfw4_all_p32", "{ 100.64.0.3 }"])
    driver.apply_delta([make_spec("192.0.2.1")], [make_spec("100.64.0.3")])
    assert plane.drops("192.0.2.1") and not plane.drops("100.64.0.3") and plane.drops("100.64.0.4")


def test_nft_chain_with_a_changed_priority_is_replaced_in_one_transaction(conf, plane):
    driver = make_driver("nftables", conf, plane)
    driver.apply_full(hosts(3))
    plane.nft.tables[("inet", "provfw")]["chains"]["forward"]["spec"]["prio"] = 0
    assert driver.apply_full(hosts(3)) is True
    assert plane.nft.tables[("inet", "provfw")]["chains"]["forward"]["spec"]["prio"] == nftables_driver.PRIORITY
    assert plane.drops("100.64.0.2")


def test_nft_rules_mask_the_source_to_the_set_prefix():
    wide = nftables_driver.group_elements([make_spec("10.1.0.0/16", "tcp", 22)])
    (set_key,) = wide
    assert wide[set_key] == {"10.1.0.0"}
    assert "ip saddr & 255.255.0.0 @pfw4_tcp_22_22_p16 tcp dport 22 drop" in nftables_driver.render_rule(set_key)


# ----------------------------------------------------------------------------- iptc (pure part)

def test_iptc_rules_carry_the_ipset_drivers_comments_so_switching_drivers_rewrites_nothing(conf):
    driver = iptc_driver.IptcFirewallDriver(conf=conf, runner=FakeSetDataplane())
    keys = {sets.match_key(s) for s in MIXED}
    for version in (4, 6):
        rules = iptc_driver.desired_rules(keys, version, driver.layout)
        chain = ipset_driver.desired_chain(keys, version, driver.layout)
        assert [r["comment"] for r in rules] == [c.split("--comment ")[1].split()[0] for c in chain]
    v6 = iptc_driver.desired_rules(keys, 6, driver.layout)
    (icmp,) = [r for r in v6 if r.get("set") == "pfw6-icmp-128-0"]
    assert icmp["protocol"] == "icmpv6" and icmp["icmp_type"] == "128/0"
