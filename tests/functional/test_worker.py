"""The compute worker's manager and service against a real conductor (in-process, memory:// bus, SQLite).

What the worker does with what it is told, and what it reports: the firewall
driver is the noop driver or FakeConnection (the seed's NotImplementedError),
the conductor is the real ConductorService with its database.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from provfw import exception
from provfw.compute import manager as compute_manager
from provfw.compute import service as compute_service
from provfw.db import api as db
from provfw.rules import Changes, make_spec
from provfw.virt.fake import FakeConnection
from provfw.virt.firewall.base import NoopFirewallDriver
from provfw.virt.libvirt_conn import LibvirtConnection
from tests.lib.bus import ConductorThread
from tests.lib.netns import wait_until

pytestmark = pytest.mark.functional

A = make_spec("203.0.113.0/24")
B = make_spec("198.51.100.7")


@pytest.fixture
def bus(conf, sqlite_db):
    conf.set_override("transport_url", "memory://")
    conf.set_override("control_exchange", f"provfw_worker_{time.monotonic_ns()}")
    conf.set_override("report_flush_interval", 0.05, group="conductor")
    conf.set_override("generation_cache_ttl", 0.0, group="conductor")
    conf.set_override("call_timeout", 1.0, group="conductor")
    conf.set_override("reconcile_interval", 3600, group="compute")
    conf.set_override("heartbeat_interval", 3600, group="compute")
    conductor = ConductorThread(conf)
    yield conductor
    conductor.stop()


def noop_manager(conf, host="hv1") -> compute_manager.ComputeManager:
    return compute_manager.ComputeManager(conf, LibvirtConnection(conf, firewall_driver=NoopFirewallDriver(conf)),
                                          host=host)


def row(host="hv1"):
    return db.service_get(host)


def reported(host, field, value, timeout=5.0) -> bool:
    return wait_until(lambda: row(host) is not None and getattr(row(host), field) == value, timeout) is not None


def test_start_up_applies_what_the_conductor_serves_and_reports_it(conf, bus):
    db.provider_fw_rule_create(A)
    _, generation = db.provider_fw_rule_create(B)
    manager = noop_manager(conf)
    outcome = manager.init_host()
    assert (outcome.generation, outcome.rule_count, outcome.mode) == (generation, 2, "full")
    assert reported("hv1", "applied_generation", generation)
    assert (row().rule_count, row().driver, row().last_error) == (2, "libvirt/noop", None)


def test_fake_connection_not_implemented_is_reported_and_the_worker_keeps_heartbeating(conf, bus):
    conf.set_override("heartbeat_interval", 1, group="compute")
    worker = compute_service.ComputeService(conf, compute_manager.ComputeManager(conf, FakeConnection(conf),
                                                                                 host="hv-fake"))
    worker.start()
    try:
        assert worker.started.wait(10), "a driver that cannot enforce must not keep the worker from serving"
        assert worker.manager.not_implemented
        assert wait_until(lambda: "does not implement" in (getattr(row("hv-fake"), "last_error", None) or ""),
                          5) is not None
        assert row("hv-fake").driver == "fake"
        first = row("hv-fake").heartbeat_at
        assert wait_until(lambda: row("hv-fake").heartbeat_at > first, 5) is not None
    finally:
        worker.stop()


def test_a_cast_for_a_generation_already_applied_does_nothing(conf, bus):
    rule, generation = db.provider_fw_rule_create(A)
    manager = noop_manager(conf)
    manager.init_host()
    assert manager.trigger_provider_fw_rules(generation=generation, previous_generation=generation - 1,
                                             added=[db.rule_of(rule).to_wire()], removed=[]) is None


def test_a_cast_with_a_malformed_change_falls_back_to_asking_the_conductor(conf, bus):
    manager = noop_manager(conf)
    manager.init_host()
    _, generation = db.provider_fw_rule_create(A)
    outcome = manager.trigger_provider_fw_rules(generation=generation, previous_generation=generation - 1,
                                                added=[["not", "a", "rule"]], removed=[])
    assert outcome.generation == generation and A in manager.reconciler.enforced()


def test_a_cast_that_skips_a_generation_fetches_the_gap(conf, bus):
    manager = noop_manager(conf)
    manager.init_host()
    db.provider_fw_rule_create(A)                          # its cast is lost
    rule, generation = db.provider_fw_rule_create(B)
    change = Changes(generation - 1, generation, [db.rule_of(rule)], [])
    outcome = manager.trigger_provider_fw_rules(generation=generation, previous_generation=change.since,
                                                added=[r.to_wire() for r in change.added], removed=[])
    assert outcome.generation == generation
    assert set(manager.reconciler.enforced()) == {A, B}
    assert bus.stats["delta_reads"] >= 1


def test_a_conductor_with_a_stale_cached_generation_never_rolls_a_host_back(conf, bus):
    """Found by tests/e2e/test_quarantine.py: a cached generation older than the host's served an old snapshot."""
    conf.set_override("generation_cache_ttl", 3600.0, group="conductor")
    manager = noop_manager(conf)
    manager.init_host()                                  # the conductor caches the generation now
    rule, generation = db.provider_fw_rule_create(A)
    manager.trigger_provider_fw_rules(generation=generation, previous_generation=generation - 1,
                                      added=[db.rule_of(rule).to_wire()], removed=[])
    assert manager.applied_generation == generation
    manager.periodic_check()
    assert manager.applied_generation == generation and A in manager.reconciler.enforced()
    assert manager.last_error is None


def test_a_host_starting_after_a_change_gets_the_snapshot_of_that_change_whatever_the_cache_says(conf, bus):
    """Found by the SIGKILL resilience test: a restarted worker got a snapshot cached before the last change."""
    conf.set_override("generation_cache_ttl", 3600.0, group="conductor")
    first = noop_manager(conf, "hv1")
    first.init_host()                                    # the conductor caches generation and snapshot now
    _, generation = db.provider_fw_rule_create(A)
    restarted = noop_manager(conf, "hv2")
    outcome = restarted.init_host()
    assert outcome.generation == generation and A in restarted.reconciler.enforced()


def test_the_periodic_check_applies_a_generation_whose_cast_was_lost(conf, bus):
    manager = noop_manager(conf)
    manager.init_host()
    _, generation = db.provider_fw_rule_create(A)
    manager.periodic_check()
    assert manager.applied_generation == generation and A in manager.reconciler.enforced()


def test_the_resync_after_the_consumer_connects_is_not_answered_from_the_conductors_cache(conf, bus):
    """A cast lost between the initial snapshot and the consumer's binding is younger than the cache's TTL."""
    conf.set_override("generation_cache_ttl", 3600.0, group="conductor")
    service = compute_service.ComputeService(conf, noop_manager(conf))
    service.manager.init_host()
    service.started.set()
    service.manager.periodic_check()                   # the conductor now caches this generation
    _, generation = db.provider_fw_rule_create(A)      # its cast reaches nobody

    service.manager.periodic_check()
    assert A not in service.manager.reconciler.enforced(), "a periodic check may be answered from the cache"
    service._on_bus_connect()
    assert service.manager.applied_generation == generation and A in service.manager.reconciler.enforced()


def test_the_periodic_check_repairs_drift_when_nothing_changed(conf, bus):
    class Drifting(NoopFirewallDriver):
        repaired = 0

        def repair_drift(self, desired, state=None):
            self.repaired += 1
            return super().repair_drift(desired, state)

    firewall = Drifting(conf)
    manager = compute_manager.ComputeManager(conf, LibvirtConnection(conf, firewall_driver=firewall), host="hv1")
    manager.init_host()
    manager.periodic_check()
    assert firewall.repaired == 1


def test_without_a_conductor_the_worker_keeps_its_rules_and_reports_the_error(conf, bus):
    db.provider_fw_rule_create(A)
    manager = noop_manager(conf)
    manager.init_host()
    bus.stop()                                                  # no conductor answers any more
    manager.periodic_check()
    assert A in manager.reconciler.enforced()
    assert "ConductorUnavailable" in manager.last_error
    with pytest.raises(exception.ProvfwError):
        manager.init_host()


def test_provfw_compute_refuses_to_start_with_database_credentials(tmp_path):
    config = tmp_path / "compute.conf"
    config.write_text("[DEFAULT]\ntransport_url = memory://\n[database]\nconnection = sqlite:////tmp/x.sqlite\n")
    result = subprocess.run([sys.executable, "-m", "provfw.cmd.compute", "--config-file", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "[database] connection" in result.stderr and "conductor" in result.stderr


def test_the_worker_never_loads_the_database_layer_or_a_database_driver():
    code = ("import sys; import provfw.cmd.compute, provfw.compute.service, provfw.compute.manager, "
            "provfw.virt.libvirt_conn; "
            "bad = sorted(m for m in sys.modules if m.startswith(('provfw.db', 'sqlalchemy', 'psycopg2', "
            "'pymysql', 'alembic'))); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the worker imported {result.stdout.strip()}"


# --------------------------------------------------------------------------- casts applied together

class CountingNoop(NoopFirewallDriver):
    """Enforces nothing; counts (and optionally slows) every refresh, as a linear chain rebuild would be slow."""

    def __init__(self, conf, delay: float = 0.0):
        super().__init__(conf)
        self.delay = delay
        self.refreshes = 0

    def refresh_provider_fw_rules(self, update, state=None):
        self.refreshes += 1
        time.sleep(self.delay)
        return super().refresh_provider_fw_rules(update, state)


def _casts(count: int, first: int = 1) -> list[dict]:
    """``count`` one-rule creates, each as the API casts it."""
    casts = []
    for index in range(first, first + count):
        rule, generation = db.provider_fw_rule_create(make_spec(f"192.0.2.{index}"))
        casts.append({"generation": generation, "previous_generation": generation - 1,
                      "added": [db.rule_of(rule).to_wire()], "removed": []})
    return casts


def test_casts_that_chain_are_applied_as_one_change_without_asking_the_conductor(conf, bus):
    firewall = CountingNoop(conf)
    manager = compute_manager.ComputeManager(conf, LibvirtConnection(conf, firewall_driver=firewall), host="hv1")
    manager.init_host()
    casts = _casts(4)
    rule = db.provider_fw_rule_get_all(cidr="192.0.2.2/32")[0]
    result = db.provider_fw_rule_destroy(rule.id)
    casts.append({"generation": result.generation, "previous_generation": result.generation - 1, "added": [],
                  "removed": [db.rule_of(rule).to_wire()]})
    refreshes, reads = firewall.refreshes, dict(bus.stats)

    manager.dispatch_many([("trigger_provider_fw_rules", cast) for cast in reversed(casts)]
                          + [("trigger_provider_fw_rules", casts[0])])      # any order, one repeated
    assert firewall.refreshes == refreshes + 1
    assert manager.applied_generation == result.generation
    assert {spec.cidr for spec in manager.reconciler.enforced()} == {"192.0.2.1/32", "192.0.2.3/32", "192.0.2.4/32"}
    assert [bus.stats.get(key, 0) for key in ("delta_reads", "snapshot_reads")] == \
        [reads.get(key, 0) for key in ("delta_reads", "snapshot_reads")]


def test_casts_with_a_gap_apply_what_chains_and_ask_the_conductor_once_for_the_rest(conf, bus):
    manager = noop_manager(conf)
    manager.init_host()
    casts = _casts(5)
    del casts[2]                                                 # lost
    reads = bus.stats.get("delta_reads", 0)
    outcome = manager.apply_casts(casts)
    assert outcome.generation == casts[-1]["generation"] == manager.applied_generation
    assert len(manager.reconciler.enforced()) == 5
    assert bus.stats.get("delta_reads", 0) == reads + 1


def test_a_worker_slower_than_the_casts_catches_up_with_one_apply_for_what_queued(conf, bus):
    """Before, every cast was applied in turn: ten casts to a driver taking 0.4 s were ten applies and 4 s."""
    from provfw.compute import api as compute_api

    firewall = CountingNoop(conf, delay=0.4)
    worker = compute_service.ComputeService(conf, compute_manager.ComputeManager(
        conf, LibvirtConnection(conf, firewall_driver=firewall), host="hv-slow"))
    worker.start()
    caster = compute_api.ComputeAPI(conf)
    try:
        assert worker.ready.wait(10) and worker.consumer.connected.wait(10)
        refreshes = firewall.refreshes
        last = None
        for index in range(10):
            rule, last = db.provider_fw_rule_create(make_spec(f"198.51.100.{index + 1}"))
            assert caster.notify(Changes(last - 1, last, [db.rule_of(rule)], []))
        assert wait_until(lambda: worker.manager.applied_generation == last, 10) is not None
        assert len(worker.manager.reconciler.enforced()) == 10
        assert firewall.refreshes - refreshes <= 3, f"{firewall.refreshes - refreshes} applies for 10 casts"
    finally:
        caster.close()
        worker.stop()


def test_a_lone_apply_is_reported_at_once_and_a_burst_of_casts_in_one_report_after_the_interval(conf, bus):
    """Before, every apply sent its own report from the applier: 20 casts were 20 publishes with a confirm on the
    worker and 20 rows for the conductor to write, from every host of the fleet."""
    from provfw.compute import api as compute_api

    conf.set_override("report_min_interval", 3.0, group="compute")
    worker = compute_service.ComputeService(conf, noop_manager(conf, "hv-burst"))
    worker.start()
    caster = compute_api.ComputeAPI(conf)

    def cast_one(index):
        rule, generation = db.provider_fw_rule_create(make_spec(f"198.51.100.{index}"))
        assert caster.notify(Changes(generation - 1, generation, [db.rule_of(rule)], []))
        return generation

    try:
        assert worker.ready.wait(10) and worker.consumer.connected.wait(10)
        assert reported("hv-burst", "applied_generation", worker.manager.applied_generation)
        reports = bus.stats["reports"]
        lone = cast_one(1)
        started = time.monotonic()
        assert reported("hv-burst", "applied_generation", lone)
        assert time.monotonic() - started < 2.0, "the first report after a quiet spell waited for the interval"
        assert bus.stats["reports"] == reports + 1

        last = None
        for index in range(2, 22):
            last = cast_one(index)
        assert wait_until(lambda: worker.manager.applied_generation == last, 10) is not None
        assert row("hv-burst").applied_generation < last      # within the interval of the lone report
        assert reported("hv-burst", "applied_generation", last, timeout=10)
        assert row("hv-burst").rule_count == 21
        assert bus.stats["reports"] <= reports + 3, f"{bus.stats['reports'] - reports} reports for 21 casts"
    finally:
        caster.close()
        worker.stop()
