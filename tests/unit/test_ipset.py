"""The one ipset module (provfw.virt.firewall.ipset): names, parsing ``ipset save``, planning a set's
change and a delta - pure functions, shown as input and output."""

from __future__ import annotations

import pytest

from provfw import exception, names
from provfw.virt.firewall import ipset
from provfw.virt.firewall.sets import MatchKey

ALL4 = MatchKey(4, "all", -1, -1)
SSH4 = MatchKey(4, "tcp", 22, 22)
PFN = ipset.SetNaming("pfn")


class _SetsConf:
    min_set_size = 1024
    headroom = 2.0
    full_rebuild_delta = 3


class _Conf:
    sets = _SetsConf()


def kernel(*members, name="pfn4-all-any", maxelem=1024, family="inet", type="hash:net", extra=""):
    return ipset.parse_save(
        f"create {name} {type} family {family} hashsize 1024 maxelem {maxelem}{extra} bucketsize 12 initval 0x1\n"
        + "".join(f"add {name} {m}\n" for m in members), PFN.owns)


# ---------------------------------------------------------------- names and parsing

def test_set_ownership_is_by_prefix_and_family_marker():
    assert PFN.owns("pfn4-tcp-1-65535") and PFN.owns("pfn6-all-any-t") and PFN.owns("pfn4-check")
    assert not PFN.owns("pfw4-tcp-1-65535") and not PFN.owns("pfnx4-all-any") and not PFN.owns("pfn")


@pytest.mark.parametrize("prefix", ["", "x" * 17, "a b"])
def test_a_bad_prefix_is_a_config_error(prefix):
    with pytest.raises(exception.ConfigError):
        ipset.SetNaming(prefix)


def test_every_name_fits_the_kernel_limit_even_with_the_longest_prefix():
    naming = ipset.SetNaming("x" * ipset.PREFIX_MAX)
    for key in (MatchKey(6, "icmp", 255, 255), MatchKey(6, "tcp", 10000, 65535), ALL4):
        for temporary in (False, True):
            name = naming.name(key, temporary)
            assert len(name) <= names.IPSET_NAME_MAX and naming.owns(name)
    assert naming.name(MatchKey(6, "tcp", 10000, 65535)) != naming.name(MatchKey(6, "tcp", 10001, 65535))
    assert len(naming.scratch(6)) <= names.IPSET_NAME_MAX


def test_the_driver_sets_keep_their_names():
    assert ipset.DRIVER_SETS.name(ALL4) == "pfw4-all-any"
    assert ipset.DRIVER_SETS.name(SSH4, temporary=True) == "pfw4-tcp-22-t"
    assert ipset.DRIVER_SETS.scratch(4) == "pfw4-check"


@pytest.mark.parametrize("cidr, spelled", [("192.0.2.1/32", "192.0.2.1"), ("10.0.0.0/8", "10.0.0.0/8"),
                                           ("2001:db8::1/128", "2001:db8::1"), ("2001:db8::/32", "2001:db8::/32")])
def test_members_are_spelled_as_ipset_save_prints_them(cidr, spelled):
    assert ipset.member(cidr) == spelled
    assert ipset.members(6 if ":" in cidr else 4, [cidr]) == {spelled}


def test_grouped_members_are_each_spec_spelled_and_grouped_by_match_key():
    from provfw.rules import make_spec
    from provfw.virt.firewall import sets

    specs = [make_spec(cidr, protocol, *ports) for cidr in ("192.0.2.1", "10.0.0.0/8", "2001:db8::1",
                                                            "2001:db8::/32", "::102:304", "128.0.0.0/1")
             for protocol, ports in (("all", ()), ("tcp", (22, 22)), ("tcp", ()), ("icmp", (8, -1)))]
    expected: dict = {}
    for spec in specs:
        expected.setdefault(sets.match_key(spec), set()).add(ipset.member(spec.cidr))
    assert sets.group_members(specs, ipset.members) == expected
    assert sets.group_members([], ipset.members) == {}


def test_parsing_keeps_owned_sets_with_members_and_options_found_by_name():
    found = kernel("192.0.2.1", "10.0.0.0/8", maxelem=2048, extra=" counters comment")
    (only,) = found.values()
    assert (only.type, only.family, only.maxelem) == ("hash:net", "inet", 2048)
    assert only.members == {"192.0.2.1", "10.0.0.0/8"}
    assert ipset.parse_save("create other hash:net family inet\nadd other 1.1.1.1\n", PFN.owns) == {}


def test_ipv6_members_printed_with_a_dotted_tail_compare_equal_to_the_rules_that_made_them():
    """ipset save prints ::102:304 as ::1.2.3.4 (inet_ntop); read as is, every drift check deleted it."""
    (only,) = kernel("::1.2.3.4", "::1.2.3.0/120", "2001:db8::1", family="inet6").values()
    assert only.members == {ipset.member("::102:304/128"), ipset.member("::102:300/120"), "2001:db8::1"}
    desired = {MatchKey(6, "all", -1, -1): only.members}
    assert ipset.plan_sets(desired, {"pfn6-all-any": only}, PFN, _Conf()).restore == ()


def test_members_added_with_options_keep_only_their_address():
    (only,) = kernel("192.0.2.1 timeout 5", "192.0.2.2").values()
    assert only.members == {"192.0.2.1", "192.0.2.2"}


# ---------------------------------------------------------------- plan_sets

def plan(desired, found=None):
    return ipset.plan_sets(desired, found or {}, PFN, _Conf())


def test_a_new_set_is_sized_created_and_filled_and_a_scratch_if_the_fill_fails():
    planned = plan({ALL4: {"10.0.0.0/8"}})
    assert planned.restore == ("create pfn4-all-any hash:net family inet hashsize 1024 maxelem 1024",
                               "add pfn4-all-any 10.0.0.0/8")
    assert planned.scratch == ("pfn4-all-any",) and planned.sizes == {"pfn4-all-any": ipset.SetSize(1, 1024)}


def test_an_unchanged_set_writes_nothing():
    planned = plan({ALL4: {"192.0.2.1"}}, kernel("192.0.2.1"))
    assert planned.restore == () and planned.restore_steps() == () and planned.obsolete == ()


def test_a_small_change_adds_before_it_deletes():
    planned = plan({ALL4: {"192.0.2.1", "192.0.2.3"}}, kernel("192.0.2.1", "192.0.2.2"))
    assert planned.restore == ("add pfn4-all-any 192.0.2.3", "del pfn4-all-any 192.0.2.2")


def test_a_small_change_into_a_full_set_deletes_first():
    planned = plan({ALL4: {"192.0.2.1", "192.0.2.3"}}, kernel("192.0.2.1", "192.0.2.2", maxelem=2))
    assert planned.restore == ("del pfn4-all-any 192.0.2.2", "add pfn4-all-any 192.0.2.3")


def test_a_large_change_rebuilds_through_a_temporary_set_and_swap_never_a_flush():
    want = {f"192.0.2.{i}" for i in range(10, 20)}
    planned = plan({ALL4: want}, kernel("192.0.2.1"))
    lines = planned.restore
    assert lines[0] == "create pfn4-all-any-t hash:net family inet hashsize 1024 maxelem 1024"
    assert lines[-2:] == ("swap pfn4-all-any-t pfn4-all-any", "destroy pfn4-all-any-t")
    assert sorted(lines[1:-2]) == sorted(f"add pfn4-all-any-t {m}" for m in want)
    assert not any(line.startswith("flush") or line == "destroy pfn4-all-any" for line in lines)
    assert planned.scratch == ("pfn4-all-any-t",)


def test_a_set_that_would_overflow_is_rebuilt_bigger():
    planned = plan({ALL4: {"192.0.2.1", "192.0.2.2"}}, kernel("192.0.2.1", maxelem=1))
    assert planned.restore[0].endswith("maxelem 1024") and "swap pfn4-all-any-t pfn4-all-any" in planned.restore
    assert planned.sizes["pfn4-all-any"] == ipset.SetSize(2, 1024)


def test_hash_size_follows_the_capacity():
    big = {f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(100_000)}
    (create, *_) = plan({ALL4: big}).restore
    assert create.endswith("hashsize 131072 maxelem 200000")


def test_a_temporary_set_left_by_an_interrupted_rebuild_is_destroyed_first():
    found = {**kernel("192.0.2.1"), **kernel("192.0.2.1", name="pfn4-all-any-t")}
    assert plan({ALL4: {"192.0.2.1"}}, found).restore == ("destroy pfn4-all-any-t",)


def test_a_set_of_the_wrong_type_or_family_is_destroyed_and_recreated():
    planned = plan({ALL4: {"192.0.2.1"}}, kernel(family="inet6"))
    assert planned.restore[:2] == ("destroy pfn4-all-any",
                                   "create pfn4-all-any hash:net family inet hashsize 1024 maxelem 1024")


def test_sets_no_longer_wanted_are_destroyed_only_in_the_deletion_phase():
    found = {**kernel("192.0.2.1"), **kernel("192.0.2.9", name="pfn4-tcp-22"), **kernel(name="pfn4-check")}
    planned = plan({ALL4: {"192.0.2.1"}}, found)
    assert planned.restore == () and planned.obsolete == ("pfn4-check", "pfn4-tcp-22")
    assert [s.argv for s in planned.deletion_steps()] == [("ipset", "destroy", "pfn4-check"),
                                                          ("ipset", "destroy", "pfn4-tcp-22")]


def test_the_restore_step_destroys_its_scratch_sets_when_it_fails():
    (step,) = plan({ALL4: {"192.0.2.1"}, SSH4: {"192.0.2.0/24"}}).restore_steps()
    assert step.argv == ("ipset", "restore", "-exist")
    assert step.cleanup == (("ipset", "destroy", "pfn4-all-any"), ("ipset", "destroy", "pfn4-tcp-22"))


# ---------------------------------------------------------------- plan_members (deltas)

SIZES = {"pfn4-all-any": ipset.SetSize(2, 4), "pfn6-all-any": ipset.SetSize(1, 4)}


def test_a_delta_of_existing_sets_is_one_restore_adds_first_and_the_new_sizes():
    step, sizes = ipset.plan_members({"pfn4-all-any": {"203.0.113.9"}}, {"pfn4-all-any": {"192.0.2.1"}}, SIZES)
    assert step.input == "add pfn4-all-any 203.0.113.9\ndel pfn4-all-any 192.0.2.1\n"
    assert sizes == SIZES


def test_a_delta_that_would_pass_maxelem_midway_deletes_first():
    step, sizes = ipset.plan_members({"pfn4-all-any": {"1.1.1.1", "1.1.1.2", "1.1.1.3"}},
                                     {"pfn4-all-any": {"192.0.2.1"}}, SIZES)
    assert step.input.startswith("del pfn4-all-any 192.0.2.1\n")
    assert sizes["pfn4-all-any"] == ipset.SetSize(4, 4)


@pytest.mark.parametrize("adds, dels", [
    ({"pfn4-tcp-22": {"1.1.1.1"}}, {}),                                      # a set that does not exist yet
    ({}, {"pfn6-all-any": {"2001:db8::1"}}),                                 # a set that would empty
    ({"pfn4-all-any": {"1.1.1.1", "1.1.1.2", "1.1.1.3"}}, {}),               # a set that would outgrow maxelem
    ({}, {}),                                                                # nothing at all
])
def test_a_structural_delta_is_none(adds, dels):
    assert ipset.plan_members(adds, dels, SIZES) is None


def test_planning_a_whole_rule_set_lets_other_green_threads_run(monkeypatch):
    # A worker runs under eventlet: a cast arriving while a drift check plans 120k rules is served between
    # two chunks of the plan (sets.cooperate), not after it.
    from provfw.rules import make_spec
    from provfw.virt.firewall import sets
    from tests.lib.green import ticks_during

    specs = [make_spec(f"45.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(3 * sets.YIELD_EVERY)]
    save = "create pv4-x hash:net family inet maxelem 65536\n" + "".join(
        f"add pv4-x {spec.cidr[:-3]}\n" for spec in specs)
    groups, during_grouping = ticks_during(monkeypatch, lambda: sets.group_members(specs, ipset.members))
    kernel, during_parse = ticks_during(monkeypatch, lambda: ipset.parse_save(save, lambda name: True))
    assert sum(len(members) for members in groups.values()) == len(specs) == len(kernel["pv4-x"].members)
    assert during_grouping >= 3 and during_parse >= 3


def test_a_full_plan_keeps_its_fills_as_members_beside_the_creates_and_the_swaps_in_the_restores_order():
    rebuilt = {f"192.0.2.{i}" for i in range(10, 20)}
    found = {**kernel("192.0.2.1"), **kernel("192.0.2.1", name="pfn4-all-any-t"),
             **kernel("2001:db8::1", name="pfn6-all-any", family="inet6")}
    planned = plan({ALL4: rebuilt, MatchKey(6, "all", -1, -1): {"2001:db8::1", "2001:db8::2"},
                    SSH4: {"198.51.100.0/24"}}, found)
    assert planned.creates == ("destroy pfn4-all-any-t",
                               "create pfn4-all-any-t hash:net family inet hashsize 1024 maxelem 1024",
                               "create pfn4-tcp-22 hash:net family inet hashsize 1024 maxelem 1024")
    assert {name: set(members) for name, members in planned.fills.items()} == {
        "pfn4-all-any-t": rebuilt, "pfn4-tcp-22": {"198.51.100.0/24"}}
    # The swap and the destroy after it keep their order; the live IPv6 set's change stays in place.
    assert planned.after == ("swap pfn4-all-any-t pfn4-all-any", "destroy pfn4-all-any-t",
                             "add pfn6-all-any 2001:db8::2")
    lines = planned.restore
    assert lines[:3] == planned.creates and lines[-3:] == planned.after
    assert sorted(lines[3:-3]) == sorted([f"add pfn4-all-any-t {m}" for m in rebuilt]
                                         + ["add pfn4-tcp-22 198.51.100.0/24"])
    # Without a netlink client, or below FILL_MIN members, the plan is the one restore of those lines.
    (step,) = planned.restore_steps()
    assert step.argv == ipset.RESTORE and step.input == "\n".join(lines) + "\n"
    assert step.cleanup == (("ipset", "destroy", "pfn4-all-any-t"), ("ipset", "destroy", "pfn4-tcp-22"))
    assert planned.restore_steps(object(), object()) == (step,)
