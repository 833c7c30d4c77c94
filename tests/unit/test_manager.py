"""ComputeManager over a real SQLite database, with real compute and firewall drivers
(FakeConnection, and LibvirtConnection around the iptables driver on FakeIptables)."""

from __future__ import annotations

import pytest

from provfw.compute import manager as compute_manager
from provfw.db import api as db
from provfw.rules import make_spec
from provfw.virt import firewall, iptables
from provfw.virt.fake import FakeConnection
from provfw.virt.libvirt_conn import LibvirtConnection
from tests.lib.fake_iptables import FakeIptables

HOST = "hv-unit-1"
BLOCK4 = make_spec("203.0.113.5")
WEB4 = make_spec("198.51.100.0/24", "tcp", 8080)


@pytest.fixture
def fake():
    return FakeIptables()


@pytest.fixture
def manager(conf, sqlite_db, fake):
    connection = LibvirtConnection(conf, firewall_driver=firewall.IptablesFirewallDriver(conf, runner=fake))
    return compute_manager.ComputeManager(conf, driver=connection, host=HOST)


def enforced(fake) -> set:
    by_hash = {iptables.rule_hash(s): s for s in (BLOCK4, WEB4)}
    return {by_hash[iptables.comment_of(r)] for r in fake.rules("nova-provider")
            if iptables.comment_of(r) in by_hash}


# --------------------------------------------------------------------------- FakeConnection (the seed's NotImplemented)

def test_fake_connection_not_implemented_is_recorded_on_the_service_row(conf, sqlite_db):
    manager = compute_manager.ComputeManager(conf, driver=FakeConnection(conf), host="hv-fake")
    _, generation = db.provider_fw_rule_create(BLOCK4)
    assert manager.trigger_provider_fw_rules(generation=generation) is None   # recorded, not raised
    row = db.service_get("hv-fake")
    assert row is not None
    assert "refresh_provider_fw_rules is not implemented" in row.last_error
    assert row.driver == "fake"
    assert row.applied_generation == -1                                        # nothing was applied
    assert manager.applied_generation is None


def test_fake_connection_survives_start_up_and_periodic_checks(conf, sqlite_db):
    manager = compute_manager.ComputeManager(conf, driver=FakeConnection(conf), host="hv-fake")
    assert manager.init_host() is None
    manager.periodic_check()
    manager.periodic_check()
    assert "not implemented" in db.service_get("hv-fake").last_error


# --------------------------------------------------------------------------- casts

def test_start_up_applies_the_database_and_reports_it(manager, fake):
    db.provider_fw_rule_create(BLOCK4)
    _, generation = db.provider_fw_rule_create(WEB4)
    result = manager.init_host()
    assert result.generation == generation and enforced(fake) == {BLOCK4, WEB4}
    row = db.service_get(HOST)
    assert (row.applied_generation, row.rule_count, row.last_error) == (generation, 2, None)
    assert row.driver == "libvirt/iptables" and row.applied_at is not None


def test_cast_whose_generation_was_already_applied_does_nothing(manager, fake):
    _, generation = db.provider_fw_rule_create(BLOCK4)
    manager.init_host()
    calls = len(fake.calls)
    for stale in (generation, generation - 1, 0):
        assert manager.trigger_provider_fw_rules(generation=stale) is None
    assert len(fake.calls) == calls                     # did not even read the kernel


def test_cast_with_a_newer_generation_applies_it(manager, fake):
    db.provider_fw_rule_create(BLOCK4)
    manager.init_host()
    _, generation = db.provider_fw_rule_create(WEB4)
    manager.dispatch("trigger_provider_fw_rules", {"generation": generation})
    assert manager.applied_generation == generation and enforced(fake) == {BLOCK4, WEB4}
    assert db.service_get(HOST).applied_generation == generation


def test_cast_without_a_generation_always_refreshes(manager, fake):
    manager.init_host()
    db.provider_fw_rule_create(BLOCK4)
    assert manager.trigger_provider_fw_rules() is not None
    assert enforced(fake) == {BLOCK4}


def test_unknown_cast_is_ignored(manager, fake):
    manager.dispatch("reboot_instance", {"instance": "x"})
    manager.dispatch("__init__", {})
    assert fake.calls == []


def test_failed_apply_is_recorded_and_the_old_rules_stay(manager, fake):
    _, first = db.provider_fw_rule_create(BLOCK4)
    manager.init_host()
    _, second = db.provider_fw_rule_create(WEB4)
    fake.fail_next_restore("Another app is currently holding the xtables lock.")
    assert manager.trigger_provider_fw_rules(generation=second) is None
    row = db.service_get(HOST)
    assert "xtables lock" in row.last_error and row.applied_generation == first
    assert enforced(fake) == {BLOCK4}
    # The next periodic check retries because an error is outstanding, and clears it.
    manager.periodic_check()
    row = db.service_get(HOST)
    assert row.last_error is None and row.applied_generation == second
    assert enforced(fake) == {BLOCK4, WEB4}


# --------------------------------------------------------------------------- periodic check

def test_periodic_check_applies_a_generation_whose_cast_was_lost(manager, fake):
    manager.init_host()
    _, generation = db.provider_fw_rule_create(BLOCK4)          # no cast
    manager.periodic_check()
    assert manager.applied_generation == generation and enforced(fake) == {BLOCK4}


def test_periodic_check_repairs_drift_when_the_generation_is_current(manager, fake):
    db.provider_fw_rule_create(BLOCK4)
    manager.init_host()
    fake.run(4, "-F nova-provider")
    fake.run(4, "-D FORWARD 1")
    manager.periodic_check()
    assert enforced(fake) == {BLOCK4}
    assert fake.rules("FORWARD") == ['-A FORWARD -m comment --comment "provfw:jump" -j nova-provider']
    writes = len(fake.writes())
    manager.periodic_check()                                     # nothing drifted: nothing written
    assert len(fake.writes()) == writes


def test_periodic_check_before_any_apply_does_a_full_apply(manager, fake):
    db.provider_fw_rule_create(BLOCK4)
    manager.periodic_check()
    assert enforced(fake) == {BLOCK4}


def test_periodic_check_with_the_database_down_keeps_enforcing(manager, fake, tmp_path):
    db.provider_fw_rule_create(BLOCK4)
    manager.init_host()
    applied = manager.applied_generation
    db.configure(f"sqlite:///{tmp_path}/missing-dir/none.sqlite")
    manager.periodic_check()                                     # logs, does not raise
    assert manager.applied_generation == applied and enforced(fake) == {BLOCK4}


def test_heartbeat_stamps_the_service_row(manager):
    manager.heartbeat()
    first = db.service_get(HOST).heartbeat_at
    manager.heartbeat()
    assert first is not None and db.service_get(HOST).heartbeat_at >= first
    assert len(db.service_get_all()) == 1


def test_noop_driver_reports_generations_too(conf, sqlite_db):
    connection = LibvirtConnection(conf, firewall_driver=firewall.NoopFirewallDriver(conf))
    manager = compute_manager.ComputeManager(conf, driver=connection, host="hv-noop")
    _, generation = db.provider_fw_rule_create(BLOCK4)
    manager.init_host()
    row = db.service_get("hv-noop")
    assert (row.applied_generation, row.rule_count, row.driver) == (generation, 1, "libvirt/noop")
