"""Set-based drivers on a real kernel: namespaces, real sets, real packets.

The hypervisor namespace of ``RoutedTopology`` is the dataplane
(``[compute] dataplane_netns``); rules come from a real SQLite database
through the db layer.  A ``RecordingRunner`` runs every command for real
and remembers it, so a test can say what kind of apply happened.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import time

import pytest

from provfw import exception, runner as runner_mod
from provfw.db import api as db
from provfw.rules import make_spec
from provfw.virt import ipset_driver, iptc_driver, nftables_driver, sets
from provfw.virt.firewall import utcnow
from tests.lib import services
from tests.lib.netns import RoutedTopology, netns_exec, wait_until
from tests.lib.traffic import Flood, InstanceCounter

pytestmark = [pytest.mark.functional, pytest.mark.timeout(240)]

DRIVERS = {"ipset": ipset_driver.IpsetFirewallDriver, "nftables": nftables_driver.NftablesFirewallDriver,
           "iptc": iptc_driver.IptcFirewallDriver}


class RecordingRunner(runner_mod.Runner):
    """The real Runner, remembering each command it ran."""

    def __init__(self, netns: str):
        super().__init__(netns)
        self.commands: list[tuple[tuple[str, ...], str | None]] = []

    def execute(self, cmd, input=None, check=True):
        self.commands.append((tuple(cmd), input))
        return super().execute(cmd, input=input, check=check)

    def writes(self) -> list[tuple[str, ...]]:
        reads = {("ipset", "save"), ("nft", "-j")}
        return [c for c, _ in self.commands if c[:2] not in reads and not c[0].endswith("-save")]


@pytest.fixture
def topo():
    services.require_root_netns()
    services.require_tools("ipset", "nft", "iptables-restore", "iptables-legacy-save")
    with RoutedTopology() as topology:
        yield topology


def make_driver(kind: str, conf, topo) -> tuple:
    conf.set_override("dataplane_netns", topo.hv, "compute")
    runner = RecordingRunner(topo.hv)
    return DRIVERS[kind](conf=conf, runner=runner), runner


def hosts(count: int, base: str = "100.64.0.0") -> list:
    start = int(ipaddress.ip_address(base))
    return [make_spec(str(ipaddress.ip_address(start + i))) for i in range(count)]


ATTACKER, BYSTANDER = RoutedTopology.ATTACKER4
ATTACKER6, BYSTANDER6 = RoutedTopology.ATTACKER6


# ----------------------------------------------------------------------------- scale

@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_a_100k_entry_set_blocks_an_address_inside_and_passes_one_outside(kind, conf, topo, sqlite_db):
    specs = hosts(99_990) + [make_spec(f"100.{96 + i}.0.0/16") for i in range(8)]
    specs += [make_spec(ATTACKER), make_spec(ATTACKER6)]
    db.provider_fw_rules_create_many(specs)
    driver, runner = make_driver(kind, conf, topo)
    result = driver.refresh_provider_fw_rules()
    assert result.mode == "full" and result.rule_count == 100_000
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.blocked(ATTACKER6, topo.INSTANCE6)
    assert topo.reachable(BYSTANDER, topo.INSTANCE4) and topo.reachable(BYSTANDER6, topo.INSTANCE6)
    runner.commands.clear()
    assert driver.repair_drift() is False and runner.writes() == [], "a second apply writes nothing"


# ----------------------------------------------------------------------------- no window during rebuilds

def _rebuild_specs(round_number: int) -> list:
    return [make_spec(ATTACKER)] + hosts(9_999, str(ipaddress.ip_address("100.64.0.0") + 10_000 * round_number))


def _flood_counts(topo, counter, rebuild) -> tuple[int, int]:
    """(packets sent, packets that reached the instance) while ``rebuild`` runs."""
    before = counter.packets()
    flood = Flood(topo, ATTACKER)
    try:
        time.sleep(0.2)
        rebuild()
        time.sleep(0.2)
    finally:
        sent = flood.stop()
    return sent, counter.packets() - before


@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_ten_full_rebuilds_of_10k_entries_let_no_packet_of_a_flooding_blocked_source_through(kind, conf, topo):
    conf.set_override("full_rebuild_delta", 1000, "sets")
    counter = InstanceCounter(topo)
    sent, arrived = _flood_counts(topo, counter, lambda: time.sleep(0.3))
    assert arrived > 100, f"the flood must reach the instance before blocking (sent {sent}, arrived {arrived})"
    driver, runner = make_driver(kind, conf, topo)
    driver.apply_full(_rebuild_specs(0))

    def ten_rebuilds():
        for round_number in range(1, 11):
            runner.commands.clear()
            assert driver.apply_full(_rebuild_specs(round_number)) is True
            written = "\n".join(i or "" for _, i in runner.commands)
            # Each round really replaced the set's contents through the atomic path.
            assert ("swap pfw4-all-any-t pfw4-all-any" in written if kind == "ipset"
                    else "flush set inet provfw pfw4_all_p32" in written)

    sent, arrived = _flood_counts(topo, counter, ten_rebuilds)
    assert sent > 10_000, f"the flood sent only {sent} packets"
    assert arrived == 0, f"{arrived} of {sent} blocked packets reached the instance during ten full rebuilds"


def test_the_flood_counter_does_see_leaks_of_a_flush_then_restore_rebuild(conf, topo):
    """Control for the test above: the naive rebuild the design forbids is caught leaking."""
    counter = InstanceCounter(topo)
    driver, runner = make_driver("ipset", conf, topo)
    driver.apply_full(_rebuild_specs(0))

    def naive_rebuilds():
        for round_number in range(1, 4):
            lines = ["flush pfw4-all-any"] + [f"add pfw4-all-any {sets.ipset_member(s.cidr)}"
                                              for s in _rebuild_specs(round_number)]
            runner(["ipset", "restore", "-exist"], input="\n".join(lines) + "\n")

    sent, arrived = _flood_counts(topo, counter, naive_rebuilds)
    assert arrived > 0, f"flush-then-restore leaked nothing out of {sent}: the counter cannot see leaks"


# ----------------------------------------------------------------------------- deltas and expiry

@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_add_delete_and_expiry_are_deltas_and_the_kernel_matches_the_database_after_each(kind, conf, topo,
                                                                                        sqlite_db):
    db.provider_fw_rules_create_many(hosts(2000))
    driver, runner = make_driver(kind, conf, topo)
    assert driver.refresh_provider_fw_rules().mode == "full"

    def assert_delta_only(result, mode):
        assert result.mode == mode
        assert len(runner.commands) == 1, runner.commands          # no kernel read, one write
        runner.commands.clear()
        assert driver.apply_full([s for s, _ in db.provider_fw_snapshot().rules]) is False, \
            "kernel differs from the database"
        runner.commands.clear()

    runner.commands.clear()
    rule, _ = db.provider_fw_rule_create(make_spec(ATTACKER))
    assert_delta_only(driver.refresh_provider_fw_rules(), "delta")
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.reachable(BYSTANDER, topo.INSTANCE4)

    db.provider_fw_rule_destroy(rule.id)
    assert_delta_only(driver.refresh_provider_fw_rules(), "delta")
    assert wait_until(lambda: topo.reachable(ATTACKER, topo.INSTANCE4), 5)

    db.provider_fw_rules_create_many([make_spec(ATTACKER)], expires_at=utcnow() + datetime.timedelta(seconds=2))
    assert_delta_only(driver.refresh_provider_fw_rules(), "delta")
    assert topo.blocked(ATTACKER, topo.INSTANCE4)
    time.sleep(2.1)
    result = driver.expire_rules()
    assert result is not None and result.mode == "expiry" and len(runner.commands) == 1
    runner.commands.clear()
    assert wait_until(lambda: topo.reachable(ATTACKER, topo.INSTANCE4), 5)
    assert driver.apply_full([s for s, _ in db.provider_fw_snapshot().rules]) is False


# ----------------------------------------------------------------------------- set sizes

def _kernel_members(runner, name: str) -> set[str]:
    return ipset_driver.parse_ipset_save(runner(["ipset", "save"]))[name].members


def test_a_restore_past_the_set_size_never_leaves_a_partly_filled_set_and_a_bigger_set_is_swapped_in(
        conf, topo, monkeypatch):
    conf.set_override("min_set_size", 1024, "sets")
    conf.set_override("headroom", 1.1, "sets")
    conf.set_override("full_rebuild_delta", 100, "sets")
    driver, runner = make_driver("ipset", conf, topo)
    first = [make_spec(ATTACKER)] + hosts(999)
    driver.apply_full(first)
    before = _kernel_members(runner, "pfw4-all-any")
    assert len(before) == 1000

    # The kernel refuses the fill half way ("Hash is full"): nothing may be swapped in.
    bigger = [make_spec(ATTACKER)] + hosts(2999, "100.70.0.0")
    monkeypatch.setattr(sets, "set_capacity", lambda entries, conf: 1500)
    with pytest.raises(exception.DriverError, match="Hash is full"):
        driver.apply_full(bigger)
    monkeypatch.undo()
    assert _kernel_members(runner, "pfw4-all-any") == before
    assert set(ipset_driver.parse_ipset_save(runner(["ipset", "save"]))) == {"pfw4-all-any"}
    assert topo.blocked(ATTACKER, topo.INSTANCE4)

    # Sized right, the same rebuild goes into a bigger temporary set, swapped with the 1100-entry one.
    driver.apply_full(bigger)
    live = ipset_driver.parse_ipset_save(runner(["ipset", "save"]))["pfw4-all-any"]
    assert live.maxelem >= 3300 and len(live.members) == 3000

    # A delta past maxelem becomes a rebuild into a bigger set, not a half-applied restore.
    driver._rules = dict.fromkeys(bigger)
    driver.apply_delta(hosts(400, "100.80.0.0"), [])
    assert len(_kernel_members(runner, "pfw4-all-any")) == 3400
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.reachable(BYSTANDER, topo.INSTANCE4)


# ----------------------------------------------------------------------------- iptc on legacy iptables

def test_iptc_commits_the_chain_to_legacy_iptables_and_repairs_a_deleted_jump(conf, topo, sqlite_db):
    services.require(_iptc_importable(), "python-iptables (import iptc)")
    db.provider_fw_rules_create_many(hosts(1000) + [make_spec(ATTACKER), make_spec(ATTACKER6),
                                                     make_spec("198.18.9.0/24", "tcp", 8080)])
    driver, runner = make_driver("iptc", conf, topo)
    assert driver.refresh_provider_fw_rules().mode == "full"
    legacy = netns_exec(topo.hv, "iptables-legacy-save", "-t", "filter").stdout
    assert "-A FORWARD -m comment --comment \"provfw:jump\" -j nova-provider" in legacy
    assert "--match-set pfw4-all-any src" in legacy and "--match-set pfw4-tcp-8080 src" in legacy
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.blocked(ATTACKER6, topo.INSTANCE6)
    assert topo.reachable(BYSTANDER, topo.INSTANCE4)

    netns_exec(topo.hv, "iptables-legacy", "-D", "FORWARD", "1")
    assert topo.reachable(ATTACKER, topo.INSTANCE4)
    assert driver.repair_drift() is True
    assert topo.blocked(ATTACKER, topo.INSTANCE4)
    runner.commands.clear()
    assert driver.repair_drift() is False and runner.writes() == []

    driver.teardown()
    assert "nova-provider" not in netns_exec(topo.hv, "iptables-legacy-save", "-t", "filter").stdout
    assert topo.reachable(ATTACKER, topo.INSTANCE4)


def _iptc_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import iptc"], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["ipset", "nftables"])
def test_teardown_removes_everything_the_driver_put_in_the_namespace(kind, conf, topo):
    driver, runner = make_driver(kind, conf, topo)
    driver.apply_full([make_spec(ATTACKER), make_spec("198.18.9.0/24", "udp", 53)])
    assert topo.blocked(ATTACKER, topo.INSTANCE4)
    driver.teardown()
    assert topo.reachable(ATTACKER, topo.INSTANCE4)
    assert runner(["ipset", "list", "-n"]).strip() == ""
    assert "provfw" not in runner(["nft", "list", "tables"])
    assert "nova-provider" not in runner(["iptables-save", "-t", "filter"])
