"""IptablesFirewallDriver (the linear chain) driven with RuleUpdate values against FakeIptables,
which interprets the restore input.  No database: the rules are values, as the reconciler hands them over."""

from __future__ import annotations

import threading

import pytest

from provfw import exception
from provfw.rules import RuleSpec, make_spec
from provfw.virt import firewall
from provfw.virt.firewall import iptables
from provfw.virt.firewall.iptables import IptablesFirewallDriver
from tests.lib.applied import AppliedRules
from tests.lib.fake_iptables import FakeIptables

BLOCK4 = make_spec("203.0.113.5")
WEB4 = make_spec("198.51.100.0/24", "tcp", 8080)
BLOCK6 = make_spec("2001:db8::/32", "icmp", 128)
EXTRA = [make_spec(f"192.0.2.{i}") for i in range(1, 6)]
JUMP = '-A FORWARD -m comment --comment "provfw:jump" -j nova-provider'
REFUSED = RuleSpec("fe80::1%eth0/128", "all", -1, -1)       # bypasses validation; ip6tables cannot resolve it


@pytest.fixture
def fake():
    return FakeIptables()


@pytest.fixture
def driver(conf, fake):
    return IptablesFirewallDriver(conf, runner=fake)


@pytest.fixture
def rules(driver):
    return AppliedRules(driver)


def enforced(fake, version=4, flavour="nft") -> set:
    """The specs whose DROP rule is in the fake kernel's provider chain."""
    by_hash = {iptables.rule_hash(s): s for s in (BLOCK4, WEB4, BLOCK6, *EXTRA)}
    comments = [iptables.comment_of(r) for r in fake.rules("nova-provider", version, flavour=flavour)]
    return {by_hash[c] for c in comments if c in by_hash}


def test_a_full_apply_enforces_the_rules_in_both_families(rules, fake):
    applied = rules.block(BLOCK4, WEB4, BLOCK6)
    assert (applied.mode, applied.changed, applied.state) == ("full", True, iptables.LinearState(3))
    assert enforced(fake, 4) == {BLOCK4, WEB4} and enforced(fake, 6) == {BLOCK6}
    for version in (4, 6):
        assert fake.rules("FORWARD", version) == [JUMP]
        assert fake.has_chain("nova-local", version)
    assert len(fake.restores(4)) == 1 and len(fake.restores(6)) == 1


def test_every_change_is_a_full_plan_and_a_second_apply_writes_nothing(rules, fake):
    rules.block(BLOCK4)
    assert rules.block(WEB4).mode == "full"
    writes = len(fake.writes())
    assert rules.repair().changed is False
    assert len(fake.writes()) == writes


def test_a_change_in_one_family_writes_only_that_family(rules, fake):
    rules.block(BLOCK4)
    before4, before6 = len(fake.restores(4)), len(fake.restores(6))
    rules.block(BLOCK6)
    assert len(fake.restores(4)) == before4 and len(fake.restores(6)) == before6 + 1
    assert enforced(fake, 6) == {BLOCK6}


def test_a_removed_rule_stops_being_enforced(rules, fake):
    rules.block(BLOCK4, WEB4)
    rules.unblock(BLOCK4)
    assert enforced(fake) == {WEB4}


def test_a_failed_restore_keeps_the_kernel_and_the_next_call_converges(rules, fake):
    rules.block(BLOCK4)
    kernel_before = fake.save(4)
    fake.fail_next_restore("Another app is currently holding the xtables lock.")
    with pytest.raises(exception.DriverError, match="xtables lock"):
        rules.block(WEB4)
    assert fake.save(4) == kernel_before and rules.desired == {BLOCK4}
    rules.block(WEB4)
    assert enforced(fake) == {BLOCK4, WEB4}


def test_a_failure_in_the_second_family_is_retried_and_converges(rules, fake):
    fake.fail_next_restore("refused", version=6)
    with pytest.raises(exception.DriverError):
        rules.block(BLOCK4, BLOCK6)
    assert rules.state is None, "nothing recorded as applied: IPv6 is missing"
    assert enforced(fake, 4) == {BLOCK4} and enforced(fake, 6) == set()
    rules.block(BLOCK4, BLOCK6)
    assert enforced(fake, 6) == {BLOCK6}


def test_after_someone_flushes_the_provider_chain_repair_restores_it(rules, fake):
    rules.block(BLOCK4, WEB4)
    fake.run(4, "-F nova-provider")
    assert enforced(fake) == set()
    assert rules.repair().changed is True
    assert enforced(fake) == {BLOCK4, WEB4}
    assert rules.repair().changed is False


def test_after_someone_deletes_the_jump_repair_puts_it_back_first(rules, fake):
    rules.block(BLOCK4)
    fake.run(4, "-D FORWARD 1")
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    fake.run(4, "-A FORWARD -j nova-provider")
    assert rules.repair().changed is True
    assert fake.rules("FORWARD") == [JUMP, "-A FORWARD -i eth0 -j ACCEPT"]


def test_repair_enforces_exactly_the_rules_it_is_given(driver, fake):
    driver.refresh_provider_fw_rules(firewall.RuleUpdate.rebuild(frozenset({BLOCK4, WEB4})))
    fake.run(4, "-F nova-provider")
    driver.repair_drift(frozenset({BLOCK4}))
    assert enforced(fake) == {BLOCK4}


def test_nova_local_contents_survive_every_apply(rules, fake):
    fake.run(4, "-N nova-local")
    fake.run(4, "-A nova-local -s 10.9.0.0/16 -j ACCEPT")
    rules.block(BLOCK4)
    rules.block(WEB4)
    rules.unblock(BLOCK4)
    fake.run(4, "-F nova-provider")
    rules.repair()
    assert fake.rules("nova-local") == ["-A nova-local -s 10.9.0.0/16 -j ACCEPT"]
    assert all(":nova-local" not in call.input for call in fake.restores(4))


def test_teardown_removes_provider_chain_and_jump_in_both_families(rules, driver, fake):
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    rules.block(BLOCK4, BLOCK6)
    driver.teardown()
    for version in (4, 6):
        assert not fake.has_chain("nova-provider", version)
    assert fake.rules("FORWARD", 4) == ["-A FORWARD -i eth0 -j ACCEPT"] and fake.rules("FORWARD", 6) == []
    writes = len(fake.writes())
    driver.teardown()
    assert len(fake.writes()) == writes, "a second teardown finds nothing to remove"


@pytest.mark.parametrize("backend, tools", [
    ("auto", {"iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"}),
    ("legacy", {"iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-save",
                "ip6tables-legacy-restore"}),
    ("nft", {"iptables-nft-save", "iptables-nft-restore", "ip6tables-nft-save", "ip6tables-nft-restore"}),
])
def test_backend_option_selects_the_iptables_flavour(conf, fake, backend, tools):
    conf.set_override("backend", backend, group="iptables")
    conf.set_override("wait_seconds", 3, group="iptables")
    AppliedRules(IptablesFirewallDriver(conf, runner=fake)).block(BLOCK4)
    assert {c.cmd[0] for c in fake.calls} == tools
    restore = fake.restores(4)[0].cmd
    assert "--noflush" in restore and restore[restore.index("--wait") + 1] == "3"
    flavour = "legacy" if backend == "legacy" else "nft"
    assert enforced(fake, 4, flavour) == {BLOCK4}


def test_configured_chain_names_are_used(conf, fake):
    conf.set_override("provider_chain", "pfw-provider", group="iptables")
    conf.set_override("local_chain", "pfw-local", group="iptables")
    AppliedRules(IptablesFirewallDriver(conf, runner=fake)).block(BLOCK4)
    assert len(fake.rules("pfw-provider")) == 2 and fake.has_chain("pfw-local")
    assert not fake.has_chain("nova-provider")


def test_concurrent_refreshes_leave_one_consistent_chain(driver, fake):
    errors = []

    def refresh():
        try:
            driver.refresh_provider_fw_rules(firewall.RuleUpdate.rebuild(frozenset(EXTRA)))
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


# --------------------------------------------------------------------------- checks

def test_a_check_of_valid_rules_parses_them_with_restore_test_and_changes_nothing(rules, driver, fake):
    rules.block(BLOCK4)
    saved = fake.save(4), fake.save(6)
    driver.check_provider_fw_rules([WEB4, BLOCK6, *EXTRA])
    assert (fake.save(4), fake.save(6)) == saved
    checks = [c for c in fake.calls if "--test" in c.cmd]
    assert {c.version for c in checks} == {4, 6} and all(c.returncode == 0 for c in checks)
    assert all(":provfw-check - [0:0]" in c.input for c in checks)


def test_a_check_of_a_rule_the_tools_refuse_raises_and_changes_nothing(rules, driver, fake):
    rules.block(BLOCK4, BLOCK6)
    saved = fake.save(4), fake.save(6)
    with pytest.raises(exception.DriverError, match="fe80::1%eth0"):
        driver.check_provider_fw_rules([BLOCK6, REFUSED])
    assert (fake.save(4), fake.save(6)) == saved
    driver.check_provider_fw_rules([BLOCK6])            # the rest passes: what a bisection relies on
