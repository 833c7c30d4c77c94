"""NWFilterFirewall's plans without libvirtd: what a full plan, a delta and a check are made of.

Planning never asks libvirt anything (the connection here fails the test if
it is used); the host sets go through FakeSetDataplane, which interprets
``ipset`` input.  Deltas are set up by passing an ``NWFilterState`` value.
The packets and the real libvirtd are in tests/functional/test_nwfilter.py.
"""

from __future__ import annotations

import pytest

from provfw import exception
from provfw.rules import make_spec
from provfw.virt.firewall import base, ipset
from provfw.virt.firewall.ipset import SetSize
from provfw.virt.firewall.nwfilter import NWFilterFirewall, NWFilterState
from tests.lib.fake_iptables import FakeIptables
from tests.lib.fake_sets import FakeSetDataplane

STATE = NWFilterState("ipset", {"pfn4-all-any": SetSize(2, 65536), "pfn6-all-any": SetSize(1, 65536)})
SPECS = [make_spec("192.0.2.1"), make_spec("192.0.2.2"), make_spec("2001:db8::1"),
         make_spec("198.51.100.0/24", "tcp", 22)]


def no_libvirt():
    raise AssertionError("planning must not ask libvirt")


@pytest.fixture
def plane():
    return FakeSetDataplane()


@pytest.fixture
def driver(conf, plane):
    conf.set_override("match_mode", "ipset", group="libvirt")
    return NWFilterFirewall(conf, runner=plane, get_connection=no_libvirt)


# ---------------------------------------------------------------- deltas

def test_a_new_member_of_an_existing_set_is_one_set_update_and_nothing_else(driver):
    plan = driver.plan_delta([make_spec("203.0.113.9")], [make_spec("192.0.2.1")], STATE, 4)
    (step,) = plan.sets
    assert plan.chains == () and plan.deletions == () and plan.mode == "delta"
    assert step.input == "add pfn4-all-any 203.0.113.9\ndel pfn4-all-any 192.0.2.1\n"
    assert plan.state == STATE


@pytest.mark.parametrize("added, removed", [
    ([make_spec("203.0.113.0/24", "tcp", 80)], []),           # not set-matchable: the filter changes
    ([], [make_spec("2001:db8::1")]),                          # the IPv6 set would empty: its rule goes
])
def test_changes_that_alter_the_filter_take_the_full_path(driver, added, removed):
    assert driver.plan_delta(added, removed, STATE, 4) is None


def test_a_group_the_filter_does_not_reference_yet_takes_the_full_path(driver):
    state = NWFilterState("ipset", {"pfn4-all-any": SetSize(2, 65536)})
    assert driver.plan_delta([make_spec("2001:db8::2")], [], state, 5) is None


def test_a_set_that_would_outgrow_its_maxelem_takes_the_full_path(driver):
    state = NWFilterState("ipset", {"pfn4-all-any": SetSize(2, 2), "pfn6-all-any": SetSize(1, 1024)})
    assert driver.plan_delta([make_spec("203.0.113.9")], [], state, 5) is None


def test_rules_mode_or_a_switch_of_mode_takes_the_full_path(driver, conf):
    conf.set_override("match_mode", "auto", group="libvirt")
    conf.set_override("ipset_threshold", 4, group="libvirt")
    assert driver.plan_delta([], [make_spec("192.0.2.1")], STATE, 4) is None         # 4 rules: back to rules
    assert driver.plan_delta([make_spec("203.0.113.9")], [], STATE, 5) is not None
    assert driver.plan_delta([make_spec("203.0.113.9")], [], NWFilterState("rules", {}), 5) is None


# ---------------------------------------------------------------- full plans

def test_a_full_plan_fills_the_sets_then_defines_then_destroys_unused_sets(driver, plane):
    plane(["ipset", "create", "pfn4-tcp-22", "hash:net"])         # left by an earlier state
    plane(["ipset", "create", "pfw4-all-any", "hash:net"])        # not ours: another prefix
    plan = driver.plan_full(SPECS)
    (fill,) = plan.sets
    assert "add pfn4-all-any 192.0.2.1\n" in fill.input and "add pfn6-all-any 2001:db8::1\n" in fill.input
    assert [type(step) for step in plan.chains] == [base.Call]
    assert [step.argv for step in plan.deletions] == [("ipset", "destroy", "pfn4-tcp-22")]
    assert plan.state == NWFilterState("ipset", {"pfn4-all-any": SetSize(2, 65536),
                                                 "pfn6-all-any": SetSize(1, 65536)})


def test_rules_mode_plans_no_sets_and_needs_no_ipset_tool(conf):
    conf.set_override("match_mode", "rules", group="libvirt")
    driver = NWFilterFirewall(conf, runner=FakeIptables(), get_connection=no_libvirt)   # no ipset program here
    plan = driver.plan_full(SPECS)
    assert plan.sets == () and plan.deletions == () and plan.state == NWFilterState("rules", {})
    conf.set_override("match_mode", "ipset", group="libvirt")
    with pytest.raises(exception.ToolMissing):
        driver.plan_full(SPECS)


def test_with_ensure_filter_refs_every_full_plan_carries_the_filterref_step(driver, conf):
    assert len(driver.plan_full(SPECS).chains) == 1
    conf.set_override("ensure_filter_refs", True, group="libvirt")
    define, refs = driver.plan_full(SPECS).chains
    assert "filterref" in refs.what and "define" in define.what


def test_a_set_step_that_fails_leaves_no_new_set_and_the_filter_is_not_touched(driver, plane, monkeypatch):
    # A sizing bug (or the kernel refusing memory): the fill stops half way.
    monkeypatch.setattr(ipset, "capacity", lambda entries, conf: 1)
    plan = driver.plan_full(SPECS)
    with pytest.raises(exception.DriverError, match="Hash is full"):
        base.execute(plan, plane)                  # the define Call would fail the test: it never runs
    assert plane.ipset.sets == {}, "the partly filled new sets were destroyed"


def test_a_bad_ipset_prefix_is_a_config_error_naming_the_option(conf):
    conf.set_override("ipset_prefix", "x" * 17, group="libvirt")
    with pytest.raises(exception.ConfigError, match="ipset_prefix"):
        NWFilterFirewall(conf, runner=FakeSetDataplane(), get_connection=no_libvirt)


# ---------------------------------------------------------------- checks

def test_a_check_fills_scratch_sets_and_its_define_step_destroys_them_if_libvirt_refuses(driver):
    plan = driver.plan_check(SPECS)
    (fill,) = plan.sets
    (define,) = plan.chains
    assert "destroy pfn4-check\n" in fill.input and "add pfn4-check 192.0.2.1\n" in fill.input
    assert define.cleanup == fill.cleanup == (("ipset", "destroy", "pfn4-check"), ("ipset", "destroy", "pfn6-check"))
    assert [s.argv for s in plan.deletions] == list(fill.cleanup)
    assert driver.check_filter_name == f"{driver.filter_name}-check"
