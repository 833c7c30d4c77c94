"""IptablesFirewallDriver against the real kernel, judged by real packets.

One RoutedTopology (attacker -- hypervisor -- instance) serves the module; the
driver manages the hypervisor namespace's FORWARD chain through a real Runner,
with both iptables flavours: the host default (nft) and ``backend = legacy``.
Rules are handed over as RuleUpdate values (``tests.lib.applied.AppliedRules``
keeps what the worker's reconciler would keep); no database.  Each test
starts from an empty filter table and leaves one behind.
"""

from __future__ import annotations

import pytest

from provfw import exception, runner as runner_mod
from provfw.rules import RuleSpec, make_spec
from provfw.virt.firewall import iptables
from provfw.virt.firewall.iptables import IptablesFirewallDriver
from tests.lib import services
from tests.lib.applied import AppliedRules
from tests.lib.fake_iptables import FakeIptables
from tests.lib.netns import RoutedTopology, netns_exec, save_rule_set

pytestmark = pytest.mark.functional

ATTACKER4, OTHER4 = RoutedTopology.ATTACKER4
ATTACKER6, OTHER6 = RoutedTopology.ATTACKER6
INSTANCE4, INSTANCE6 = RoutedTopology.INSTANCE4, RoutedTopology.INSTANCE6
BACKENDS = ["auto", "legacy"]        # auto = the host's iptables alternative, nf_tables on Debian 12
EMPTY_FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
PROBE_TIMEOUT = 0.5


class RecordingRunner(runner_mod.Runner):
    """The real Runner (it still executes everything) that remembers what it ran."""

    def __init__(self, netns: str):
        super().__init__(netns)
        self.commands: list[list[str]] = []

    def execute(self, cmd, input=None, check=True):
        self.commands.append(list(cmd))
        return super().execute(cmd, input=input, check=check)

    def restores(self) -> list[list[str]]:
        return [c for c in self.commands if c[0].endswith("-restore")]


@pytest.fixture(scope="module")
def topology():
    services.require_root_netns()
    services.require_tools("iptables-restore", "ip6tables-restore", "iptables-legacy-restore",
                           "ip6tables-legacy-restore", "ping")
    with RoutedTopology() as topo:
        yield topo


def tools(backend: str) -> tuple[str, str]:
    suffix = "" if backend == "auto" else f"-{backend}"
    return f"iptables{suffix}", f"ip6tables{suffix}"


class Dataplane:
    """The hypervisor namespace as one test sees it: driver, runner, and 'another process'."""

    def __init__(self, topo: RoutedTopology, conf, backend: str):
        self.topo = topo
        self.backend = backend
        self.conf = conf
        conf.set_override("dataplane_netns", topo.hv, group="compute")
        conf.set_override("backend", backend, group="iptables")
        self.runner = RecordingRunner(topo.hv)
        self.driver = IptablesFirewallDriver(conf, runner=self.runner)
        self.rules = AppliedRules(self.driver)

    def other_process(self, version: int, *args: str) -> None:
        """Run an iptables command in the hypervisor, as some other program would."""
        netns_exec(self.topo.hv, tools(self.backend)[0 if version == 4 else 1], *args)

    def save(self, version: int = 4) -> str:
        return netns_exec(self.topo.hv, f"{tools(self.backend)[0 if version == 4 else 1]}-save", "-t",
                          "filter").stdout

    def state(self, version: int = 4) -> iptables.TableState:
        return iptables.parse_save(self.save(version))

    def reset(self) -> None:
        for tool in tools(self.backend):
            netns_exec(self.topo.hv, f"{tool}-restore", input=EMPTY_FILTER)

    # Packet probes, from the attacker namespace to the instance.
    def blocked(self, src: str, dst: str) -> bool:
        return self.topo.blocked(src, dst, timeout=PROBE_TIMEOUT)

    def reachable(self, src: str, dst: str) -> bool:
        return self.topo.reachable(src, dst, timeout=2.0)


@pytest.fixture(params=BACKENDS)
def dataplane(request, topology, conf):
    plane = Dataplane(topology, conf, request.param)
    plane.reset()
    assert plane.reachable(ATTACKER4, INSTANCE4) and plane.reachable(ATTACKER6, INSTANCE6)
    yield plane
    plane.reset()


@pytest.fixture
def default_dataplane(topology, conf):
    plane = Dataplane(topology, conf, "auto")
    plane.reset()
    yield plane
    plane.reset()


# --------------------------------------------------------------------------- blocking with real packets

@pytest.mark.parametrize("attacker, other, instance", [(ATTACKER4, OTHER4, INSTANCE4),
                                                       (ATTACKER6, OTHER6, INSTANCE6)], ids=["ipv4", "ipv6"])
def test_block_stops_one_address_and_unblock_lets_it_through_again(dataplane, attacker, other, instance):
    dataplane.rules.block(make_spec(attacker))
    assert dataplane.blocked(attacker, instance)
    assert dataplane.reachable(other, instance)

    dataplane.rules.unblock(make_spec(attacker))
    assert dataplane.reachable(attacker, instance)


@pytest.mark.parametrize("attacker, instance", [(ATTACKER4, INSTANCE4), (ATTACKER6, INSTANCE6)],
                         ids=["ipv4", "ipv6"])
def test_tcp_rule_for_8080_blocks_tcp_but_not_ping(default_dataplane, attacker, instance):
    default_dataplane.rules.block(make_spec(attacker, "tcp", 8080))
    assert not default_dataplane.topo.can_connect(attacker, instance, timeout=PROBE_TIMEOUT)
    assert default_dataplane.topo.can_ping(attacker, instance)


@pytest.mark.parametrize("attacker, instance, echo_request", [(ATTACKER4, INSTANCE4, 8), (ATTACKER6, INSTANCE6, 128)],
                         ids=["icmp", "icmpv6"])
def test_icmp_type_rule_blocks_ping_but_not_tcp(default_dataplane, attacker, instance, echo_request):
    default_dataplane.rules.block(make_spec(attacker, "icmp", echo_request))
    assert not default_dataplane.topo.can_ping(attacker, instance, timeout=PROBE_TIMEOUT)
    assert default_dataplane.topo.can_connect(attacker, instance)


def test_rule_for_a_network_blocks_every_address_in_it(default_dataplane):
    default_dataplane.rules.block(make_spec("198.18.1.0/30"))      # .2 and .3 (host bits cleared)
    assert not default_dataplane.topo.can_connect(ATTACKER4, INSTANCE4, timeout=PROBE_TIMEOUT)
    assert not default_dataplane.topo.can_connect(OTHER4, INSTANCE4, timeout=PROBE_TIMEOUT)
    assert default_dataplane.reachable(ATTACKER6, INSTANCE6)    # another family is another rule


# --------------------------------------------------------------------------- cost and drift

def test_second_apply_with_no_change_runs_no_restore(dataplane):
    first = dataplane.rules.block(make_spec(ATTACKER4), make_spec(ATTACKER6, "tcp", 8080))
    assert first.changed and len(dataplane.runner.restores()) == 2
    dataplane.runner.commands.clear()
    assert dataplane.rules.apply().mode == "none" and dataplane.runner.commands == []

    second = dataplane.rules.repair()
    assert second.changed is False
    assert dataplane.runner.restores() == []
    assert {c[0] for c in dataplane.runner.commands} == {f"{t}-save" for t in tools(dataplane.backend)}


def test_after_another_process_flushes_the_provider_chain_repair_restores_it(dataplane):
    dataplane.rules.block(make_spec(ATTACKER4))
    dataplane.other_process(4, "-F", "nova-provider")
    assert dataplane.reachable(ATTACKER4, INSTANCE4)              # the drift really opened a hole
    assert dataplane.rules.repair().changed is True
    assert dataplane.blocked(ATTACKER4, INSTANCE4)
    assert dataplane.rules.repair().changed is False


def test_after_another_process_deletes_the_forward_jump_repair_restores_it(dataplane):
    dataplane.rules.block(make_spec(ATTACKER6))
    dataplane.other_process(6, "-D", "FORWARD", "1")
    dataplane.other_process(6, "-I", "FORWARD", "1", "-p", "udp", "-j", "ACCEPT")
    assert dataplane.reachable(ATTACKER6, INSTANCE6)
    assert dataplane.rules.repair().changed is True
    assert dataplane.blocked(ATTACKER6, INSTANCE6)
    forward = dataplane.state(6).rules["FORWARD"]
    assert iptables.comment_of(forward[0]) == "provfw:jump" and len(forward) == 2


def test_nova_local_contents_survive_applies(dataplane):
    # Security groups live in nova-local; ours only continue to it.  Reject OTHER's TCP there.
    dataplane.other_process(4, "-N", "nova-local")
    dataplane.other_process(4, "-A", "nova-local", "-s", OTHER4, "-p", "tcp", "--dport", "8080",
                            "-j", "REJECT", "--reject-with", "tcp-reset")
    before = dataplane.state(4).rules["nova-local"]
    dataplane.rules.block(make_spec(ATTACKER4))
    dataplane.rules.block(make_spec("192.0.2.0/24", "udp", 53))
    dataplane.rules.unblock(make_spec(ATTACKER4))
    dataplane.other_process(4, "-F", "nova-provider")
    dataplane.rules.repair()

    assert dataplane.state(4).rules["nova-local"] == before
    assert not dataplane.topo.can_connect(OTHER4, INSTANCE4, timeout=PROBE_TIMEOUT)   # nova-local still decides
    assert dataplane.topo.can_ping(OTHER4, INSTANCE4)
    assert dataplane.reachable(ATTACKER4, INSTANCE4)


def test_refused_transaction_changes_nothing_and_the_old_block_holds(dataplane):
    dataplane.rules.block(make_spec(ATTACKER4))
    saved = dataplane.save(4)

    # A second writer whose transaction is refused by the kernel at its last line
    # (its forward chain does not exist) after re-declaring and refilling the chain.
    dataplane.conf.set_override("forward_chain", "nova-missing", group="iptables")
    broken = AppliedRules(IptablesFirewallDriver(dataplane.conf, runner=runner_mod.Runner(dataplane.topo.hv)))
    with pytest.raises(exception.ProcessExecutionError) as info:
        broken.block(make_spec(ATTACKER4), make_spec(OTHER4))
    assert "failing input" in str(info.value) and "nova-missing" in str(info.value)

    assert save_rule_set(dataplane.save(4)) == save_rule_set(saved)
    assert dataplane.blocked(ATTACKER4, INSTANCE4)
    assert dataplane.reachable(OTHER4, INSTANCE4)


def test_teardown_removes_what_the_driver_added(dataplane):
    dataplane.rules.block(make_spec(ATTACKER4), make_spec(ATTACKER6))
    dataplane.driver.teardown()
    for version in (4, 6):
        state = dataplane.state(version)
        assert "nova-provider" not in state.chains and state.rules.get("FORWARD", []) == []
    assert dataplane.reachable(ATTACKER4, INSTANCE4) and dataplane.reachable(ATTACKER6, INSTANCE6)


# --------------------------------------------------------------------------- checks (the reconciler's bisection)

def test_a_check_of_rules_the_kernel_takes_passes_and_changes_nothing(dataplane):
    dataplane.rules.block(make_spec(ATTACKER4))
    saved = save_rule_set(dataplane.save(4)), save_rule_set(dataplane.save(6))
    dataplane.runner.commands.clear()
    dataplane.driver.check_provider_fw_rules([make_spec(OTHER4), make_spec(ATTACKER6, "icmp", 128, 0),
                                              make_spec("192.0.2.0/24", "tcp", 1000, 2000)])
    assert [c for c in dataplane.runner.restores() if "--test" not in c] == []
    assert (save_rule_set(dataplane.save(4)), save_rule_set(dataplane.save(6))) == saved
    assert dataplane.blocked(ATTACKER4, INSTANCE4) and dataplane.reachable(OTHER4, INSTANCE4)


def test_a_check_of_a_rule_the_kernel_refuses_raises_and_leaves_everything_as_it_was(dataplane):
    dataplane.rules.block(make_spec(ATTACKER4), make_spec(ATTACKER6))
    saved = save_rule_set(dataplane.save(4)), save_rule_set(dataplane.save(6))
    refused = RuleSpec("fe80::1%eth0/128", "all", -1, -1)         # bypasses validation
    for _ in range(2):
        with pytest.raises(exception.DriverError, match="fe80::1%eth0"):
            dataplane.driver.check_provider_fw_rules([make_spec(OTHER6), refused])
    assert (save_rule_set(dataplane.save(4)), save_rule_set(dataplane.save(6))) == saved
    assert "provfw-check" not in dataplane.save(6)
    assert dataplane.blocked(ATTACKER6, INSTANCE6) and dataplane.reachable(OTHER6, INSTANCE6)


# --------------------------------------------------------------------------- the fake tells the truth

def test_fake_dataplane_reaches_the_same_tables_as_the_real_tools(dataplane, conf):
    """Replay one story on FakeIptables and on the kernel; the saved tables must agree at every step."""
    fake = FakeIptables()
    fake_rules = AppliedRules(IptablesFirewallDriver(conf, runner=fake))
    flavour = "legacy" if dataplane.backend == "legacy" else "nft"

    def both(version: int, *args: str) -> None:
        dataplane.other_process(version, *args)
        fake.run(version, " ".join(args), flavour=flavour)

    def agree(step: str) -> None:
        for version in (4, 6):
            real = dataplane.state(version)
            mirrored = iptables.parse_save(fake.save(version, flavour=flavour))
            assert real.chains == mirrored.chains, (step, version)
            assert real.rules == mirrored.rules, (step, version)

    both(4, "-N", "nova-local")
    both(4, "-A", "nova-local", "-s", "10.9.0.0/16", "-j", "ACCEPT")
    both(4, "-A", "FORWARD", "-i", dataplane.topo.hv_attacker_if, "-j", "ACCEPT")
    first = make_spec(ATTACKER4, "tcp", 1000, 2000)
    for rules in (dataplane.rules, fake_rules):
        rules.block(first, make_spec(ATTACKER6, "icmp", 128, 0), make_spec("192.0.2.0/24", "udp", 53))
    agree("first apply")
    both(4, "-F", "nova-provider")
    both(6, "-D", "FORWARD", "1")
    both(4, "-A", "FORWARD", "-j", "nova-provider")
    for rules in (dataplane.rules, fake_rules):
        assert rules.repair().changed is True
    agree("repair")
    for rules in (dataplane.rules, fake_rules):
        rules.unblock(first)
    agree("second apply")
    for rules in (dataplane.rules, fake_rules):
        rules.driver.teardown()
    agree("teardown")
