"""Firewall drivers over a real SQLite database: ProviderFirewallBase's bookkeeping, deltas and expiry, and
IptablesFirewallDriver end to end against FakeIptables (which interprets the restore input).
"""

from __future__ import annotations

import datetime
import threading

import pytest

from provfw import exception
from provfw.db import api as db
from provfw.rules import make_spec
from provfw.virt import firewall, iptables
from tests.lib.fake_iptables import FakeIptables

BLOCK4 = make_spec("203.0.113.5")
WEB4 = make_spec("198.51.100.0/24", "tcp", 8080)
BLOCK6 = make_spec("2001:db8::/32", "icmp", 128)
LAYOUT = iptables.ChainLayout()
JUMP = '-A FORWARD -m comment --comment "provfw:jump" -j nova-provider'


@pytest.fixture
def fake():
    return FakeIptables()


@pytest.fixture
def driver(conf, sqlite_db, fake):
    return firewall.IptablesFirewallDriver(conf, runner=fake)


def provider_comments(fake, version=4, flavour="nft"):
    return [iptables.comment_of(r) for r in fake.rules("nova-provider", version, flavour=flavour)]


def enforced(fake, version=4, flavour="nft") -> set:
    """The specs whose DROP rule is in the fake kernel's provider chain."""
    by_hash = {iptables.rule_hash(s): s for s in (BLOCK4, WEB4, BLOCK6, *EXTRA)}
    return {by_hash[c] for c in provider_comments(fake, version, flavour) if c in by_hash}


EXTRA = [make_spec(f"192.0.2.{i}") for i in range(1, 6)]


# --------------------------------------------------------------------------- the seed's base class

def test_base_driver_does_nothing_itself():
    base = firewall.FirewallDriver()
    for call in (base.refresh_provider_fw_rules, base.repair_drift, base.teardown):
        with pytest.raises(NotImplementedError):
            call()
    assert base.expire_rules() is None and base.applied_generation is None


# --------------------------------------------------------------------------- IptablesFirewallDriver end to end

def test_refresh_enforces_the_database_rules_in_both_families(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    db.provider_fw_rule_create(WEB4)
    _, generation = db.provider_fw_rule_create(BLOCK6)
    result = driver.refresh_provider_fw_rules()
    assert (result.generation, result.rule_count, result.changed, result.mode) == (generation, 3, True, "full")
    assert driver.applied_generation == generation
    assert enforced(fake, 4) == {BLOCK4, WEB4} and enforced(fake, 6) == {BLOCK6}
    for version in (4, 6):
        assert fake.rules("FORWARD", version) == [JUMP]
        assert fake.has_chain("nova-local", version)
    assert len(fake.restores(4)) == 1 and len(fake.restores(6)) == 1


def test_second_refresh_with_no_change_writes_nothing(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    driver.refresh_provider_fw_rules()
    writes = len(fake.writes())
    result = driver.refresh_provider_fw_rules()
    assert result.changed is False
    assert len(fake.writes()) == writes


def test_a_change_in_one_family_writes_only_that_family(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    driver.refresh_provider_fw_rules()
    db.provider_fw_rule_create(BLOCK6)
    before4, before6 = len(fake.restores(4)), len(fake.restores(6))
    driver.refresh_provider_fw_rules()
    assert len(fake.restores(4)) == before4
    assert len(fake.restores(6)) == before6 + 1
    assert enforced(fake, 6) == {BLOCK6}


def test_deleted_rule_stops_being_enforced(driver, fake):
    rule, _ = db.provider_fw_rule_create(BLOCK4)
    db.provider_fw_rule_create(WEB4)
    driver.refresh_provider_fw_rules()
    generation = db.provider_fw_rule_destroy(rule.id)
    result = driver.refresh_provider_fw_rules()
    assert result.generation == generation
    assert enforced(fake) == {WEB4}
    assert driver.applied_specs() == [WEB4]


def test_failed_restore_keeps_kernel_and_bookkeeping_on_the_previous_state(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    first = driver.refresh_provider_fw_rules()
    kernel_before = fake.save(4)
    db.provider_fw_rule_create(WEB4)
    fake.fail_next_restore("Another app is currently holding the xtables lock.")
    with pytest.raises(exception.DriverError) as info:
        driver.refresh_provider_fw_rules()
    assert "xtables lock" in str(info.value)
    assert fake.save(4) == kernel_before
    assert driver.applied_generation == first.generation
    assert driver.applied_specs() == [BLOCK4]
    retry = driver.refresh_provider_fw_rules()
    assert retry.generation == first.generation + 1 and enforced(fake) == {BLOCK4, WEB4}


def test_failure_in_the_second_family_is_retried_and_converges(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    db.provider_fw_rule_create(BLOCK6)
    fake.fail_next_restore("refused", version=6)
    with pytest.raises(exception.DriverError):
        driver.refresh_provider_fw_rules()
    assert driver.applied_generation is None          # not recorded as applied: IPv6 is missing
    assert enforced(fake, 4) == {BLOCK4} and enforced(fake, 6) == set()
    driver.refresh_provider_fw_rules()
    assert enforced(fake, 6) == {BLOCK6}


def test_after_someone_flushes_the_provider_chain_repair_restores_it(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    db.provider_fw_rule_create(WEB4)
    driver.refresh_provider_fw_rules()
    fake.run(4, "-F nova-provider")
    assert enforced(fake) == set()
    assert driver.repair_drift() is True
    assert enforced(fake) == {BLOCK4, WEB4}
    assert driver.repair_drift() is False


def test_after_someone_deletes_the_jump_repair_puts_it_back_first(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    driver.refresh_provider_fw_rules()
    fake.run(4, "-D FORWARD 1")
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    fake.run(4, "-A FORWARD -j nova-provider")
    assert driver.repair_drift() is True
    assert fake.rules("FORWARD") == [JUMP, "-A FORWARD -i eth0 -j ACCEPT"]


def test_repair_before_the_first_apply_does_nothing(driver, fake):
    assert driver.repair_drift() is False
    assert fake.calls == []


def test_repair_uses_what_was_applied_not_the_database(driver, fake):
    db.provider_fw_rule_create(BLOCK4)
    driver.refresh_provider_fw_rules()
    db.provider_fw_rule_create(WEB4)            # not applied yet: no cast arrived
    fake.run(4, "-F nova-provider")
    driver.repair_drift()
    assert enforced(fake) == {BLOCK4}


def test_nova_local_contents_survive_every_apply(driver, fake):
    fake.run(4, "-N nova-local")
    fake.run(4, "-A nova-local -s 10.9.0.0/16 -j ACCEPT")
    rule, _ = db.provider_fw_rule_create(BLOCK4)
    driver.refresh_provider_fw_rules()
    db.provider_fw_rule_create(WEB4)
    driver.refresh_provider_fw_rules()
    db.provider_fw_rule_destroy(rule.id)
    driver.refresh_provider_fw_rules()
    fake.run(4, "-F nova-provider")
    driver.repair_drift()
    assert fake.rules("nova-local") == ["-A nova-local -s 10.9.0.0/16 -j ACCEPT"]
    assert all(":nova-local" not in call.input for call in fake.restores(4))


def test_teardown_removes_provider_chain_and_jump_in_both_families(driver, fake):
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    db.provider_fw_rule_create(BLOCK4)
    db.provider_fw_rule_create(BLOCK6)
    driver.refresh_provider_fw_rules()
    driver.teardown()
    for version in (4, 6):
        assert not fake.has_chain("nova-provider", version)
    assert fake.rules("FORWARD", 4) == ["-A FORWARD -i eth0 -j ACCEPT"] and fake.rules("FORWARD", 6) == []
    assert driver.applied_generation is None and driver.rule_count == 0


@pytest.mark.parametrize("backend, tools", [
    ("auto", {"iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"}),
    ("legacy", {"iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-save",
                "ip6tables-legacy-restore"}),
    ("nft", {"iptables-nft-save", "iptables-nft-restore", "ip6tables-nft-save", "ip6tables-nft-restore"}),
])
def test_backend_option_selects_the_iptables_flavour(conf, sqlite_db, fake, backend, tools):
    conf.set_override("backend", backend, group="iptables")
    conf.set_override("wait_seconds", 3, group="iptables")
    db.provider_fw_rule_create(BLOCK4)
    firewall.IptablesFirewallDriver(conf, runner=fake).refresh_provider_fw_rules()
    assert {c.cmd[0] for c in fake.calls} == tools
    restore = fake.restores(4)[0].cmd
    assert "--noflush" in restore and restore[restore.index("--wait") + 1] == "3"
    flavour = "legacy" if backend == "legacy" else "nft"
    assert enforced(fake, 4, flavour) == {BLOCK4}


def test_configured_chain_names_are_used(conf, sqlite_db, fake):
    conf.set_override("provider_chain", "pfw-provider", group="iptables")
    conf.set_override("local_chain", "pfw-local", group="iptables")
    db.provider_fw_rule_create(BLOCK4)
    firewall.IptablesFirewallDriver(conf, runner=fake).refresh_provider_fw_rules()
    assert len(fake.rules("pfw-provider")) == 2 and fake.has_chain("pfw-local")
    assert not fake.has_chain("nova-provider")


def test_concurrent_refreshes_leave_one_consistent_chain(driver, fake):
    for spec in EXTRA:
        db.provider_fw_rule_create(spec)
    errors = []

    def refresh():
        try:
            driver.refresh_provider_fw_rules(full=True)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert enforced(fake) == set(EXTRA) and fake.rules("FORWARD") == [JUMP]
    assert len(fake.restores(4)) == 1          # serialised: later applies found nothing to change


# --------------------------------------------------------------------------- expiry (controlled clock)

class Clock:
    def __init__(self):
        self.now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(firewall, "utcnow", clock)
    return clock


def test_rule_expires_on_the_host_without_the_database(driver, fake, clock, tmp_path):
    expires = clock.now + datetime.timedelta(minutes=5)
    db.provider_fw_rule_create(BLOCK4, expires_at=expires)
    db.provider_fw_rule_create(WEB4)
    driver.refresh_provider_fw_rules()
    assert driver.next_expiry() == expires
    assert driver.expire_rules() is None              # not yet
    assert enforced(fake) == {BLOCK4, WEB4}

    db.configure(f"sqlite:///{tmp_path}/missing-dir/none.sqlite")   # the database is gone
    clock.now = expires + datetime.timedelta(seconds=1)
    result = driver.expire_rules()
    assert result is not None and result.mode == "expiry" and result.rule_count == 1
    assert enforced(fake) == {WEB4}
    assert driver.next_expiry() is None


def test_already_expired_rule_is_never_applied(driver, fake, clock):
    db.provider_fw_rule_create(BLOCK4, expires_at=clock.now - datetime.timedelta(seconds=1))
    db.provider_fw_rule_create(WEB4)
    result = driver.refresh_provider_fw_rules()
    assert result.rule_count == 1 and enforced(fake) == {WEB4}


# --------------------------------------------------------------------------- deltas (drivers with supports_delta)

class SetModelDriver(firewall.ProviderFirewallBase):
    """A delta-capable driver whose 'kernel' is a set, applying a delta as an ipset batch would:
    every add line, then every del line."""

    name = "set-model"
    supports_delta = True

    def __init__(self, conf):
        super().__init__(conf, runner=FakeIptables())
        self.kernel: set = set()
        self.deltas: list[tuple[list, list]] = []
        self.fulls = 0

    def apply_full(self, specs):
        self.fulls += 1
        changed = self.kernel != set(specs)
        self.kernel = set(specs)
        return changed

    def apply_delta(self, added, removed):
        self.deltas.append((list(added), list(removed)))
        self.kernel |= set(added)
        self.kernel -= set(removed)
        return True


def test_delta_driver_reads_only_the_changes_after_the_first_full(conf, sqlite_db):
    driver = SetModelDriver(conf)
    rule, _ = db.provider_fw_rule_create(BLOCK4)
    assert driver.refresh_provider_fw_rules().mode == "full"
    db.provider_fw_rule_create(WEB4)
    db.provider_fw_rule_destroy(rule.id)
    result = driver.refresh_provider_fw_rules()
    assert result.mode == "delta" and result.generation == db.provider_fw_generation_get()
    assert driver.deltas == [([WEB4], [BLOCK4])]
    assert driver.kernel == {WEB4} and driver.fulls == 1
    assert driver.refresh_provider_fw_rules().mode == "none"


def test_rule_deleted_and_created_again_between_refreshes_stays_enforced(conf, sqlite_db):
    driver = SetModelDriver(conf)
    rule, _ = db.provider_fw_rule_create(BLOCK4)
    driver.refresh_provider_fw_rules()
    db.provider_fw_rule_destroy(rule.id)
    db.provider_fw_rule_create(BLOCK4, description="blocked again")
    driver.refresh_provider_fw_rules()
    for added, removed in driver.deltas:
        assert not set(added) & set(removed), "a spec both added and removed in one delta"
    assert driver.kernel == {BLOCK4}
    assert driver.applied_specs() == [BLOCK4]


def test_large_delta_becomes_a_full_rebuild(conf, sqlite_db):
    conf.set_override("full_rebuild_delta", 2, group="sets")
    driver = SetModelDriver(conf)
    driver.refresh_provider_fw_rules()
    db.provider_fw_rules_create_many(EXTRA)
    result = driver.refresh_provider_fw_rules()
    assert result.mode == "full" and driver.fulls == 2 and driver.deltas == []
    assert driver.kernel == set(EXTRA)


def test_failed_delta_keeps_bookkeeping_and_is_retried(conf, sqlite_db):
    driver = SetModelDriver(conf)
    driver.refresh_provider_fw_rules()
    start = driver.applied_generation
    db.provider_fw_rule_create(BLOCK4)

    def refuse(added, removed):
        raise exception.DriverError("kernel refused the batch")

    driver.apply_delta, real = refuse, driver.apply_delta
    with pytest.raises(exception.DriverError):
        driver.refresh_provider_fw_rules()
    assert driver.applied_generation == start and driver.applied_specs() == []
    driver.apply_delta = real
    driver.refresh_provider_fw_rules()
    assert driver.kernel == {BLOCK4}


def test_noop_driver_tracks_generations_without_a_kernel(conf, sqlite_db):
    driver = firewall.NoopFirewallDriver(conf)
    _, generation = db.provider_fw_rule_create(BLOCK4)
    result = driver.refresh_provider_fw_rules()
    assert result.generation == generation and result.rule_count == 1 and result.changed is False
    assert driver.repair_drift() is False


# --------------------------------------------------------------------------- loading drivers

@pytest.mark.parametrize("name, cls", [
    ("iptables", firewall.IptablesFirewallDriver),
    ("IptablesFirewallDriver", firewall.IptablesFirewallDriver),
    ("noop", firewall.NoopFirewallDriver),
    ("provfw.virt.firewall.NoopFirewallDriver", firewall.NoopFirewallDriver),
])
def test_firewall_driver_is_loaded_by_alias_or_dotted_path(conf, name, cls):
    conf.set_override("firewall_driver", name, group="compute")
    assert type(firewall.load_firewall_driver(conf)) is cls


@pytest.mark.parametrize("name", ["nosuch", "provfw.virt.firewall.NoSuchDriver", "provfw.nosuch.Driver"])
def test_unknown_firewall_driver_is_a_config_error(conf, name):
    conf.set_override("firewall_driver", name, group="compute")
    with pytest.raises(exception.ConfigError) as info:
        firewall.load_firewall_driver(conf)
    assert name in str(info.value)
