"""The driver seam (provfw.virt.firewall.base): one apply order, delta or full, values in and out.

A small model driver whose "kernel" is a Python set written by ``Call``
steps shows what the base class decides; ``execute`` is shown with a runner
that interprets nothing but records the order of what ran.  No database.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from provfw import exception
from provfw.rules import make_spec
from provfw.virt import firewall
from provfw.virt.firewall import base
from tests.lib.applied import AppliedRules
from tests.lib.fake_iptables import FakeIptables

BLOCK4 = make_spec("203.0.113.5")
WEB4 = make_spec("198.51.100.0/24", "tcp", 8080)
BLOCK6 = make_spec("2001:db8::/32", "icmp", 128)


class OrderRunner:
    """Runner stand-in that runs nothing and remembers argv; commands named in ``refuse`` fail."""

    def __init__(self, refuse=()):
        self.ran: list[tuple[str, ...]] = []
        self.refuse = set(refuse)

    def __call__(self, cmd, input=None, check=True):
        self.ran.append(tuple(cmd))
        if tuple(cmd) in self.refuse and check:
            raise exception.ProcessExecutionError(cmd, 1, stderr="refused")
        return ""


def cmd(*argv, cleanup=()):
    return base.Command(tuple(argv), cleanup=tuple(cleanup))


# --------------------------------------------------------------------------- execute

def test_execute_writes_sets_then_chains_then_deletions():
    runner = OrderRunner()
    plan = base.Plan(None, sets=(cmd("fill"),), chains=(cmd("chain4"), cmd("chain6")), deletions=(cmd("destroy"),))
    assert base.execute(plan, runner) is True
    assert runner.ran == [("fill",), ("chain4",), ("chain6",), ("destroy",)]


def test_a_failed_set_step_runs_its_cleanup_and_stops_before_the_chains():
    runner = OrderRunner(refuse={("fill",)})
    plan = base.Plan(None, sets=(cmd("fill", cleanup=[("destroy", "scratch")]),), chains=(cmd("chain"),),
                     deletions=(cmd("destroy", "old"),))
    with pytest.raises(exception.DriverError):
        base.execute(plan, runner)
    assert runner.ran == [("fill",), ("destroy", "scratch")]


def test_a_failed_call_runs_its_cleanup_and_raises_its_own_error():
    runner = OrderRunner(refuse={("destroy", "scratch")})

    def define():
        raise exception.DriverError("libvirt refused the filter")

    plan = base.Plan(None, chains=(base.Call(define, "define", cleanup=(("destroy", "scratch"),)),))
    with pytest.raises(exception.DriverError, match="libvirt refused"):
        base.execute(plan, runner)
    assert runner.ran == [("destroy", "scratch")]


def test_a_failed_deletion_is_logged_and_left_for_the_next_apply(caplog):
    runner = OrderRunner(refuse={("destroy", "a")})
    plan = base.Plan(None, chains=(cmd("chain"),), deletions=(cmd("destroy", "a"), cmd("destroy", "b")))
    with caplog.at_level(logging.WARNING, logger="provfw.virt.firewall.base"):
        assert base.execute(plan, runner) is True
    assert runner.ran[-1] == ("destroy", "b")
    assert "deferred to the next apply" in caplog.text


def test_a_call_that_changed_nothing_makes_an_unchanged_apply():
    plan = base.Plan(None, chains=(base.Call(lambda: False, "nothing to define"),))
    assert base.execute(plan, OrderRunner()) is False
    assert base.execute(base.Plan(None, chains=(base.Call(lambda: None, "define"),)), OrderRunner()) is True


# --------------------------------------------------------------------------- the base class's decisions

class SetModel(base.PlannedFirewallDriver):
    """A driver whose kernel is a Python set; its state is the frozenset it applied.

    A delta is refused (None) when it would empty the kernel, as a set driver
    refuses a group that empties; ``refuse_delta`` makes the kernel refuse
    delta writes.
    """

    name = "set-model"

    def __init__(self, conf):
        super().__init__(conf, runner=OrderRunner())
        self.kernel: set = set()
        self.fulls = self.deltas = 0
        self.refuse_delta = False
        self.states_seen: list = []

    def plan_full(self, desired):
        self.fulls += 1
        wanted = frozenset(desired)

        def write():
            changed = self.kernel != wanted
            self.kernel = set(wanted)
            return changed
        return base.Plan(wanted, chains=(base.Call(write, "replace"),))

    def plan_delta(self, added, removed, state, desired_count):
        self.states_seen.append(state)
        after = (state | set(added)) - set(removed)
        if not after:
            return None

        def write():
            if self.refuse_delta:
                raise exception.DriverError("kernel refused the delta")
            self.deltas += 1
            self.kernel |= set(added)
            self.kernel -= set(removed)
        return base.Plan(frozenset(after), sets=(base.Call(write, "delta"),), mode="delta")

    def plan_check(self, specs):
        return base.Plan(None)

    def teardown(self):
        self.kernel.clear()


@pytest.fixture
def model(conf):
    return SetModel(conf)


def test_first_call_is_a_full_plan_then_changes_are_deltas_and_the_state_comes_back(model):
    rules = AppliedRules(model)
    first = rules.block(BLOCK4)
    assert (first.mode, first.changed, first.state) == ("full", True, frozenset({BLOCK4}))
    second = rules.apply(added=[WEB4], removed=[BLOCK4])
    assert second.mode == "delta" and second.state == frozenset({WEB4})
    assert model.states_seen == [frozenset({BLOCK4})], "plan_delta got the state the full plan returned"
    assert model.kernel == {WEB4} and model.fulls == 1


def test_nothing_changed_is_mode_none_without_planning(model):
    rules = AppliedRules(model)
    rules.block(BLOCK4)
    applied = model.refresh_provider_fw_rules(firewall.RuleUpdate(frozenset({BLOCK4})), rules.state)
    assert (applied.mode, applied.changed, applied.state) == ("none", False, rules.state)
    assert model.fulls == 1 and model.states_seen == []


def test_without_a_state_or_with_full_the_driver_plans_a_full_rebuild(model):
    model.refresh_provider_fw_rules(firewall.RuleUpdate(frozenset({BLOCK4}), added=(BLOCK4,)), None)
    applied = model.refresh_provider_fw_rules(
        firewall.RuleUpdate(frozenset({BLOCK4, WEB4}), added=(WEB4,), full=True), frozenset({BLOCK4}))
    assert applied.mode == "full" and model.fulls == 2 and model.states_seen == []
    assert model.kernel == {BLOCK4, WEB4}


def test_a_structural_change_the_driver_cannot_delta_becomes_a_full_plan(model):
    rules = AppliedRules(model)
    rules.block(BLOCK4)
    applied = rules.unblock(BLOCK4)                     # the model refuses a delta that empties it
    assert applied.mode == "full" and model.kernel == set() and model.fulls == 2


def test_a_delta_the_kernel_refuses_is_retried_once_as_a_full_plan(model, caplog):
    rules = AppliedRules(model)
    rules.block(BLOCK4)
    model.refuse_delta = True
    with caplog.at_level(logging.WARNING):
        applied = rules.block(WEB4)
    assert applied.mode == "full" and model.kernel == {BLOCK4, WEB4}
    assert "delta refused" in caplog.text


def test_a_failed_full_plan_raises_and_returns_no_state(model):
    rules = AppliedRules(model)
    rules.block(BLOCK4)

    def refuse(desired):
        raise exception.DriverError("kernel refused")

    model.refuse_delta = True
    model.plan_full = refuse
    with pytest.raises(exception.DriverError):
        rules.block(WEB4)
    assert rules.desired == {BLOCK4} and rules.state == frozenset({BLOCK4})


def test_repair_rebuilds_from_the_rules_it_is_given(model):
    rules = AppliedRules(model)
    rules.block(BLOCK4, WEB4)
    model.kernel.discard(WEB4)                          # someone else changed the kernel
    assert rules.repair().changed is True and model.kernel == {BLOCK4, WEB4}
    assert rules.repair().changed is False


def test_a_change_arriving_while_a_drift_check_reads_the_kernel_is_applied_at_once_and_never_undone(conf):
    # The drift check reads the kernel outside the dataplane lock (0.5-1.5 s at 120k rules); a delta
    # arriving meanwhile must not wait for it, and the check must not then write what it planned from the
    # older rules (here: a rebuild without WEB4, which would unblock what the delta just blocked).
    class SlowRead(SetModel):
        reading, release, slow = threading.Event(), threading.Event(), False

        def plan_full(self, desired):
            if self.slow:
                self.reading.set()
                assert self.release.wait(5)
            return super().plan_full(desired)

    driver = SlowRead(conf)
    rules = AppliedRules(driver)
    rules.block(BLOCK4)
    driver.slow = True
    checked = []
    check = threading.Thread(target=lambda: checked.append(driver.repair_drift(frozenset({BLOCK4}), rules.state)))
    check.start()
    assert driver.reading.wait(5)
    started = time.monotonic()
    assert rules.block(WEB4).mode == "delta"                  # not blocked by the check's read
    assert time.monotonic() - started < 1 and driver.kernel == {BLOCK4, WEB4}
    driver.release.set()
    check.join(5)
    assert checked[0].mode == "none" and checked[0].changed is False and checked[0].state == frozenset({BLOCK4})
    assert driver.kernel == {BLOCK4, WEB4}
    driver.slow = False
    driver.kernel.discard(BLOCK4)                             # real drift, with no apply in between: repaired
    assert rules.repair().changed is True and driver.kernel == {BLOCK4, WEB4}


def test_a_check_executes_the_check_plan_under_the_lock(conf):
    ran = []

    class Checked(SetModel):
        def plan_check(self, specs):
            return base.Plan(None, chains=(base.Call(lambda: ran.append(sorted(specs)), "check"),))

    Checked(conf).check_provider_fw_rules([BLOCK4])
    assert ran == [[BLOCK4]]


def test_concurrent_refreshes_of_one_driver_are_serialised(conf):
    inside, overlaps = [], []

    class Slow(SetModel):
        def plan_full(self, desired):
            if inside:
                overlaps.append(True)
            inside.append(True)
            try:
                threading.Event().wait(0.02)
                return super().plan_full(desired)
            finally:
                inside.pop()

    driver = Slow(conf)
    threads = [threading.Thread(target=driver.refresh_provider_fw_rules,
                                args=(firewall.RuleUpdate.rebuild(frozenset({BLOCK4})),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert overlaps == [] and driver.kernel == {BLOCK4}


# --------------------------------------------------------------------------- the seed's base and noop

def test_base_driver_does_nothing_itself():
    driver = firewall.FirewallDriver()
    with pytest.raises(NotImplementedError):
        driver.refresh_provider_fw_rules(firewall.RuleUpdate(frozenset()))
    with pytest.raises(NotImplementedError):
        driver.check_provider_fw_rules([])
    with pytest.raises(NotImplementedError):
        driver.repair_drift(frozenset())
    with pytest.raises(NotImplementedError):
        driver.teardown()


def test_noop_driver_counts_rules_and_touches_nothing(conf):
    fake = FakeIptables()
    rules = AppliedRules(firewall.NoopFirewallDriver(conf, runner=fake))
    assert rules.block(BLOCK4, BLOCK6).state == 2
    assert rules.unblock(BLOCK4).state == 1
    assert rules.repair().changed is False and fake.calls == []


# --------------------------------------------------------------------------- loading drivers

@pytest.mark.parametrize("name, path", [
    ("iptables", "provfw.virt.firewall.iptables.IptablesFirewallDriver"),
    ("IptablesFirewallDriver", "provfw.virt.firewall.iptables.IptablesFirewallDriver"),
    ("noop", "provfw.virt.firewall.base.NoopFirewallDriver"),
    ("ipset", "provfw.virt.firewall.ipset.IpsetFirewallDriver"),
    ("nftables", "provfw.virt.firewall.nftables.NftablesFirewallDriver"),
    ("iptc", "provfw.virt.firewall.iptc.IptcFirewallDriver"),
    ("provfw.virt.firewall.base.NoopFirewallDriver", "provfw.virt.firewall.base.NoopFirewallDriver"),
])
def test_firewall_driver_is_loaded_by_alias_or_dotted_path(conf, name, path):
    conf.set_override("firewall_driver", name, group="compute")
    driver = firewall.load_firewall_driver(conf)
    assert f"{type(driver).__module__}.{type(driver).__name__}" == path


def test_the_nwfilter_entry_points_name_the_nwfilter_driver():
    from provfw.virt.firewall.nwfilter import NWFilterFirewall

    assert firewall.driver_class("nwfilter") is firewall.driver_class("NWFilterFirewall") is NWFilterFirewall


@pytest.mark.parametrize("name", ["nosuch", "provfw.virt.firewall.base.NoSuchDriver", "provfw.nosuch.Driver",
                                  "provfw.virt.firewall.base.RuleUpdate"])
def test_unknown_firewall_driver_is_a_config_error_naming_it(conf, name):
    conf.set_override("firewall_driver", name, group="compute")
    with pytest.raises(exception.ConfigError) as info:
        firewall.load_firewall_driver(conf)
    assert name in str(info.value)
