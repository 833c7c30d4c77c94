"""The worker's reconciler with a model dataplane: no database, no bus, no kernel.

``ModelKernel`` is a PlannedFirewallDriver whose "kernel" is a set of specs.
Its plans are Call steps that change that set, so every write goes through
``base.execute`` as a real driver's does; like the real tools it refuses a
source with an IPv6 scope id (``%``), in applies and in checks alike, and its
state is the count of specs it holds (what a set driver's state would track).
"""

from __future__ import annotations

import logging
import sys
import threading

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from provfw import exception
from provfw.compute.reconciler import AlreadyApplied, GenerationGap, Reconciler
from provfw.rules import Changes, Rule, RuleSpec, Snapshot, make_spec
from provfw.virt.firewall import base
from provfw.virt.libvirt_conn import LibvirtConnection

A = make_spec("203.0.113.0/24")
B = make_spec("198.51.100.7")
C = make_spec("198.51.100.8", "tcp", 22)
BAD = RuleSpec("fe80::1%eth0/128", "all", -1, -1)      # bypasses validation, as a rule the API let through would


class ModelKernel(base.PlannedFirewallDriver):
    name = "model"

    def __init__(self, conf):
        super().__init__(conf, runner=None)
        self.kernel: set[RuleSpec] = set()
        self.writes: list[tuple[str, frozenset, frozenset]] = []
        self.checks = 0
        self.broken = False           # the whole host refuses (not a rule's fault)

    def _refuse(self, specs) -> None:
        if self.broken:
            raise exception.DriverError("the kernel module is gone")
        bad = [s for s in specs if "%" in s.cidr]
        if bad:
            raise exception.DriverError(f"host/network `{bad[0].cidr}' not found")

    def _write(self, mode, add, remove):
        def call():
            self._refuse(add)
            self.kernel |= set(add)
            self.kernel -= set(remove)
            self.writes.append((mode, frozenset(add), frozenset(remove)))
        return call

    def plan_full(self, desired):
        desired = set(desired)
        if desired == self.kernel:
            return base.Plan(state=len(desired))
        return base.Plan(state=len(desired), chains=(base.Call(self._write("full", desired - self.kernel,
                                                                           self.kernel - desired), "rebuild"),))

    def plan_delta(self, added, removed, state, desired_count):
        return base.Plan(state=desired_count, sets=(base.Call(self._write("delta", added, removed), "members"),),
                         mode="delta")

    def plan_check(self, specs):
        def check():
            self.checks += 1
            self._refuse(specs)
            return False
        return base.Plan(state=None, chains=(base.Call(check, "check"),))

    def teardown(self):
        self.kernel.clear()


@pytest.fixture
def model(conf):
    return ModelKernel(conf)


@pytest.fixture
def clock():
    class Clock:
        now = 1_000_000.0

        def __call__(self):
            return self.now
    return Clock()


@pytest.fixture
def reconciler(conf, model, clock):
    return Reconciler(LibvirtConnection(conf, firewall_driver=model), conf, clock=clock)


def rule(rule_id, spec, expires=None) -> Rule:
    return Rule(rule_id, spec, expires)


def test_a_snapshot_is_a_full_apply_and_a_following_change_a_delta(reconciler, model):
    outcome = reconciler.apply_snapshot(Snapshot(4, [rule(1, A), rule(2, B)]))
    assert (outcome.generation, outcome.mode, outcome.rule_count) == (4, "full", 2)
    assert model.kernel == {A, B}

    outcome = reconciler.apply_change(Changes(4, 5, [rule(3, C)], [rule(1, A)]))
    assert (outcome.generation, outcome.mode) == (5, "delta")
    assert model.kernel == {B, C}
    assert model.writes[-1] == ("delta", frozenset({C}), frozenset({A}))
    assert reconciler.driver_state == 2                      # the driver's own state came back to it


def test_a_change_that_does_not_follow_the_applied_generation_is_a_gap(reconciler, model):
    with pytest.raises(GenerationGap):
        reconciler.apply_change(Changes(0, 1, [rule(1, A)], []))       # nothing applied yet
    reconciler.apply_snapshot(Snapshot(4, []))
    with pytest.raises(GenerationGap):
        reconciler.apply_change(Changes(5, 6, [rule(1, A)], []))
    assert model.kernel == set() and reconciler.generation == 4


def test_a_change_to_a_generation_already_applied_is_told_apart_from_a_gap(reconciler, model):
    # Found by a newcomer: a cast that lost the race for the lock to the conductor's delta of the same
    # generation was logged as a gap and made the worker ask the conductor again.
    reconciler.apply_snapshot(Snapshot(4, [rule(1, A)]))
    writes = len(model.writes)
    with pytest.raises(AlreadyApplied):
        reconciler.apply_change(Changes(3, 4, [rule(1, A)], []))
    with pytest.raises(GenerationGap) as caught:
        reconciler.apply_change(Changes(5, 6, [rule(2, B)], []))
    assert not isinstance(caught.value, AlreadyApplied)
    assert len(model.writes) == writes and reconciler.generation == 4


def test_a_snapshot_of_the_applied_generation_is_already_applied_unless_asked_again(reconciler, model):
    reconciler.apply_snapshot(Snapshot(4, [rule(1, A)]))
    model.kernel.add(B)                                  # drift: only ``again`` (or a drift check) rewrites it
    writes = len(model.writes)
    with pytest.raises(AlreadyApplied):
        reconciler.apply_snapshot(Snapshot(4, [rule(1, A)]))
    assert len(model.writes) == writes and model.kernel == {A, B}
    outcome = reconciler.apply_snapshot(Snapshot(4, [rule(1, A)]), again=True)
    assert (outcome.generation, outcome.mode) == (4, "full") and model.kernel == {A}


def test_a_worker_does_not_rebuild_a_snapshot_another_thread_applied_while_it_asked(conf, model):
    """The periodic check and a cast's catch-up ask the conductor at once during a bulk import: the reply that
    comes second must not rebuild the kernel again while the next cast waits for the reconciler."""
    from provfw.compute import manager as manager_mod

    snapshot = Snapshot(5, [rule(1, A), rule(2, B)])

    class Conductor:
        reports: list = []

        def get_provider_fw_rules(self, since, min_generation=None, fresh=False):
            worker.reconciler.apply_snapshot(snapshot)       # the other thread's apply won the race
            return snapshot

        def report_provider_fw_state(self, **state):
            self.reports.append(state)

    worker = manager_mod.ComputeManager(conf, driver=LibvirtConnection(conf, firewall_driver=model), host="hv1",
                                        conductor=Conductor())
    worker.reconciler.apply_snapshot(Snapshot(4, [rule(1, A)]))
    reads = []
    plan_full = model.plan_full
    model.plan_full = lambda desired: reads.append(len(desired)) or plan_full(desired)    # a kernel read each
    assert worker.sync(min_generation=5) is None
    assert reads == [2] and model.kernel == {A, B}          # one rebuild: the second reply read nothing
    assert worker.last_error is None and worker.reconciler.generation == 5


def test_a_spec_deleted_and_created_again_in_one_change_never_leaves_the_kernel(reconciler, model):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A)]))
    reconciler.apply_change(Changes(1, 3, [rule(7, A)], [rule(1, A)]))
    assert model.kernel == {A}
    assert all(A not in removed for _mode, _added, removed in model.writes)
    assert reconciler.enforced()[A].id == 7


def test_a_removal_naming_an_older_row_of_a_spec_does_not_remove_the_newer_one(reconciler, model):
    reconciler.apply_snapshot(Snapshot(1, [rule(7, A)]))       # row 7 re-created A after row 1 was deleted
    reconciler.apply_change(Changes(1, 2, [], [rule(1, A)]))   # a late removal of row 1
    assert model.kernel == {A} and reconciler.enforced()[A].id == 7


def test_a_renewal_changes_the_expiry_without_touching_the_kernel(reconciler, model, clock):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A, clock.now + 60)]))
    writes = len(model.writes)
    reconciler.apply_change(Changes(1, 2, [rule(1, A, clock.now + 86400)], []))
    assert len(model.writes) == writes
    clock.now += 120
    assert reconciler.expire() is None and model.kernel == {A}
    assert reconciler.next_expiry() == pytest.approx(clock.now - 120 + 86400)


def test_rules_expire_on_the_host_at_their_expiry_without_anyone_asking(reconciler, model, clock):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A, clock.now + 30), rule(2, B)]))
    assert reconciler.next_expiry() == clock.now + 30
    clock.now += 29
    assert reconciler.expire() is None and model.kernel == {A, B}
    clock.now += 2
    outcome = reconciler.expire()
    assert outcome.mode == "expiry" and model.kernel == {B} and reconciler.generation == 1
    assert reconciler.next_expiry() is None


def test_a_rule_already_expired_on_arrival_is_never_applied(reconciler, model, clock):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A, clock.now - 1)]))
    reconciler.apply_change(Changes(1, 2, [rule(2, B, clock.now)], []))
    assert model.kernel == set() and reconciler.rule_count == 0


def test_a_change_larger_than_full_rebuild_delta_is_a_full_rebuild(conf, reconciler, model):
    conf.set_override("full_rebuild_delta", 2, group="sets")
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A)]))
    many = [rule(10 + i, make_spec(f"192.0.2.{i}")) for i in range(1, 4)]
    outcome = reconciler.apply_change(Changes(1, 2, many, []))
    assert outcome.mode == "full" and model.writes[-1][0] == "full"
    assert model.kernel == {A, *(r.spec for r in many)}


def test_a_rule_the_kernel_refuses_is_quarantined_and_every_other_rule_applies(reconciler, model):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A)]))
    outcome = reconciler.apply_change(Changes(1, 2, [rule(2, B), rule(3, BAD), rule(4, C)], []))
    assert outcome.generation == 2 and outcome.newly_quarantined == (BAD,)
    assert model.kernel == {A, B, C}
    (held,) = reconciler.quarantine()
    assert held["id"] == 3 and held["cidr"] == BAD.cidr and "not found" in held["reason"]
    # The next change converges as if the bad rule were not there.
    reconciler.apply_change(Changes(2, 3, [], [rule(2, B)]))
    assert model.kernel == {A, C} and reconciler.generation == 3


def test_one_bad_rule_in_a_large_snapshot_costs_a_few_checks_of_the_new_rules(reconciler, model):
    reconciler.apply_snapshot(Snapshot(1, [rule(i, make_spec(f"100.64.{i // 250}.{i % 250 + 1}"))
                                           for i in range(1000)]))
    fresh = [rule(5000 + i, make_spec(f"100.65.0.{i + 1}")) for i in range(30)] + [rule(9999, BAD)]
    old = reconciler.enforced()
    outcome = reconciler.apply_snapshot(Snapshot(2, [*old.values(), *fresh]))
    assert outcome.newly_quarantined == (BAD,) and reconciler.rule_count == 1030
    assert model.checks <= 2 + 2 * 6            # the empty baseline, the old rules, a bisection of 31


def test_a_deleted_quarantined_rule_leaves_the_quarantine(reconciler, model):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A), rule(3, BAD)]))
    assert [q["id"] for q in reconciler.quarantine()] == [3]
    reconciler.apply_change(Changes(1, 2, [], [rule(3, BAD)]))
    assert reconciler.quarantine() == [] and model.kernel == {A}


def test_a_change_whose_every_rule_is_refused_is_quarantined_whole_and_the_fleet_moves_on(reconciler, model):
    """The seed's block_ips of a bad CIDR is three rules in one generation, all refused: quarantined, not a stall."""
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A)]))
    bad = [rule(2, BAD), rule(3, RuleSpec(BAD.cidr, "udp", 1, 65535)), rule(4, RuleSpec(BAD.cidr, "icmp", -1, -1))]
    outcome = reconciler.apply_change(Changes(1, 2, bad, []))
    assert outcome.generation == 2 and len(outcome.newly_quarantined) == 3
    assert [q["id"] for q in reconciler.quarantine()] == [2, 3, 4] and model.kernel == {A}
    reconciler.apply_change(Changes(2, 3, [rule(5, B)], []))
    assert model.kernel == {A, B} and reconciler.generation == 3


def test_a_host_wide_refusal_is_not_blamed_on_the_rules_and_keeps_the_previous_state(reconciler, model):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A)]))
    model.broken = True
    with pytest.raises(exception.DriverError):
        reconciler.apply_change(Changes(1, 2, [rule(2, B)], []))
    assert reconciler.generation == 1 and reconciler.quarantine() == [] and model.kernel == {A}
    model.broken = False
    reconciler.apply_change(Changes(1, 2, [rule(2, B)], []))
    assert model.kernel == {A, B}


def test_drift_repair_rewrites_what_someone_else_changed_from_the_reconcilers_own_state(reconciler, model):
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A), rule(2, B)]))
    model.kernel.discard(A)                      # another program deleted our element
    outcome = reconciler.repair_drift()
    assert outcome.changed and model.kernel == {A, B}
    assert reconciler.repair_drift().changed is False


def test_a_cast_arriving_during_a_drift_check_is_applied_at_once_and_the_check_keeps_its_state(conf, clock):
    # The reconciler's lock is free while the driver reads the kernel for a drift check: the cast's change
    # is applied at once, and the check (which read the older rules) neither writes nor records its state.
    reading, release = threading.Event(), threading.Event()

    class SlowRead(ModelKernel):
        slow = False

        def plan_full(self, desired):
            if self.slow:
                reading.set()
                assert release.wait(5)
            return super().plan_full(desired)

    model = SlowRead(conf)
    reconciler = Reconciler(LibvirtConnection(conf, firewall_driver=model), conf, clock=clock)
    reconciler.apply_snapshot(Snapshot(1, [rule(1, A)]))
    model.slow = True
    checked = []
    check = threading.Thread(target=lambda: checked.append(reconciler.repair_drift()))
    check.start()
    assert reading.wait(5)
    outcome = reconciler.apply_change(Changes(1, 2, [rule(2, B)], []))
    assert outcome.mode == "delta" and model.kernel == {A, B}
    release.set()
    check.join(5)
    assert checked[0].mode == "none" and not checked[0].changed
    assert model.kernel == {A, B} and reconciler.driver_state == 2 and reconciler.generation == 2


def test_a_compute_driver_without_a_firewall_raises_not_implemented(conf):
    from provfw.virt.fake import FakeConnection

    with pytest.raises(NotImplementedError):
        Reconciler(FakeConnection(conf), conf).apply_snapshot(Snapshot(1, [rule(1, A)]))


def test_a_state_report_while_the_worker_stops_is_no_warning(conf, model, caplog):
    """A newcomer saw "could not report the state of vm: RpcClientClosed ... (stopping)" at every clean stop."""
    from provfw import exception
    from provfw.compute import manager as manager_mod

    class Conductor:
        def report_provider_fw_state(self, **state):
            raise exception.RpcClientClosed("the RPC client of hv1 is closed (stopping)")

    class Unreachable:
        def report_provider_fw_state(self, **state):
            raise exception.ConductorUnavailable("no answer")

    caplog.set_level("DEBUG", logger="provfw.compute.manager")
    driver = LibvirtConnection(conf, firewall_driver=model)
    stopping = manager_mod.ComputeManager(conf, driver=driver, host="hv1", conductor=Conductor())
    assert stopping.report_state() is False
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    caplog.clear()
    down = manager_mod.ComputeManager(conf, driver=driver, host="hv1", conductor=Unreachable())
    assert down.report_state() is False                       # a real failure still warns
    assert [r.levelname for r in caplog.records] == ["WARNING"]


# --------------------------------------------------------------------------- casts applied together

_SPECS = [make_spec(f"192.0.2.{i}") for i in range(1, 9)]


@st.composite
def _history(draw):
    """A database's live rules and the changes of a few generations, as the db layer would cast them:
    creates (a new id), deletes, renewals (the same id, a new expiry) and re-creates (a new id, same spec)."""
    live = {spec: Rule(index + 1, spec, None) for index, spec in enumerate(_SPECS[:3])}
    initial = list(live.values())
    next_id = 100
    changes = []
    for generation in range(5, 5 + draw(st.integers(1, 6))):
        added, removed = [], []
        for spec in draw(st.lists(st.sampled_from(_SPECS), max_size=4, unique=True)):
            action = draw(st.sampled_from(["create", "delete", "renew", "recreate"]))
            held = live.get(spec)
            if held is None:
                live[spec] = Rule(next_id, spec, draw(st.sampled_from([None, 2_000_000.0])))
                added.append(live[spec])
                next_id += 1
            elif action == "delete":
                removed.append(live.pop(spec))
            elif action == "renew":
                live[spec] = Rule(held.id, spec, draw(st.sampled_from([None, 3_000_000.0])))
                added.append(live[spec])
            else:
                removed.append(live.pop(spec))
                live[spec] = Rule(next_id, spec, None)
                added.append(live[spec])
                next_id += 1
        changes.append(Changes(generation - 1, generation, added, removed))
    return initial, changes, live


@pytest.fixture(scope="module")
def module_conf(tmp_path_factory):
    """The ``conf`` fixture for a hypothesis test (which refuses function-scoped fixtures): state, and so the
    drivers' apply lock, under a temporary directory, not the user's ~/.local/state/provfw."""
    from oslo_config import cfg

    from provfw import conf as provfw_conf

    conf = cfg.ConfigOpts()
    provfw_conf.register_opts(conf)
    conf([], project="provfw", default_config_files=[])
    conf.set_override("state_path", str(tmp_path_factory.mktemp("state")))
    yield conf
    conf.reset()


@settings(max_examples=150, deadline=None)
@given(history=_history())
def test_casts_applied_together_leave_what_they_leave_applied_one_by_one(module_conf, history):
    from provfw.rules import compose_changes

    initial, changes, live = history
    conf = module_conf
    one_by_one, together = ModelKernel(conf), ModelKernel(conf)
    first = Reconciler(LibvirtConnection(conf, firewall_driver=one_by_one), conf, clock=lambda: 1_000_000.0)
    second = Reconciler(LibvirtConnection(conf, firewall_driver=together), conf, clock=lambda: 1_000_000.0)
    for reconciler in (first, second):
        reconciler.apply_snapshot(Snapshot(4, initial))
    for change in changes:
        first.apply_change(change)
    composed = compose_changes(changes)
    outcome = second.apply_change(composed)

    assert (composed.since, composed.generation) == (4, changes[-1].generation) == (4, outcome.generation)
    assert second.enforced() == first.enforced() == live
    assert together.kernel == one_by_one.kernel == set(live)
    assert second.next_expiry() == first.next_expiry()


def test_a_chain_with_a_gap_is_not_composed():
    from provfw.rules import compose_changes

    with pytest.raises(ValueError):
        compose_changes([Changes(4, 5, [rule(1, A)], []), Changes(6, 7, [rule(2, B)], [])])
    with pytest.raises(ValueError):
        compose_changes([])
    only = Changes(4, 5, [rule(1, A)], [])
    assert compose_changes([only]) is only


class _ExceptionAtEmit(logging.Handler):
    """Records each line with the exception being handled when it was emitted: oslo.log's formatter appends
    that exception's summary to a WARNING or ERROR line logged inside an ``except`` (``_get_error_summary``),
    so a line whose message already names the error would say it twice."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str, type | None]] = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage(), sys.exc_info()[0]))


def test_errors_that_name_their_exception_are_not_logged_while_it_is_handled(conf, model):
    """An operator saw the worker's "ConductorUnavailable: no conductor answered ..." line twice over during a
    conductor outage: once in the message, once appended by oslo.log."""
    from provfw import exception
    from provfw.compute import api as compute_api, manager as manager_mod

    class Unreachable:
        def get_provider_fw_rules(self, *args, **kwargs):
            raise exception.ConductorUnavailable("no conductor answered get_provider_fw_rules")

    class DeadBus:
        def cast(self, *args, **kwargs):
            raise ConnectionRefusedError(111, "Connection refused")

    seen = _ExceptionAtEmit()
    for name in ("provfw.compute.manager", "provfw.compute.api"):
        logging.getLogger(name).addHandler(seen)
    try:
        worker = manager_mod.ComputeManager(conf, driver=LibvirtConnection(conf, firewall_driver=model), host="hv1",
                                            conductor=Unreachable())
        assert worker.sync() is None
        assert compute_api.ComputeAPI(conf, publisher=DeadBus()).trigger_provider_fw_rules_refresh(7) is False
    finally:
        for name in ("provfw.compute.manager", "provfw.compute.api"):
            logging.getLogger(name).removeHandler(seen)
    errors = [(message, active) for level, message, active in seen.lines if level == "ERROR"]
    assert [message.split(":")[0] for message, _ in errors] == ["ConductorUnavailable", "could not cast "
                                                                "trigger_provider_fw_rules(generation=7)"]
    assert [active for _, active in errors] == [None, None]
