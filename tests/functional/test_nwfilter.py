"""NWFilterFirewall against the real libvirtd, judged by real packets on a real bridge.

One BridgeTopology (attacker ns -- host bridge -- instance ns) serves the
module.  Each test binds its own instance filter ``nova-instance-test-<tag>``
(which references a per-test provider filter ``nova-provider-<tag>`` and then
accepts everything, like a permissive security group) to the instance's
host-side port with libvirt's binding API, drives the driver with RuleUpdate
values (``Hypervisor`` keeps what the worker's reconciler would keep: the
rules, the driver's state, and changes not applied yet), and removes the
binding, its filters and its ipsets in a finally block.  The provider filter name is global in libvirtd, hence the
tag; so are ipset names, hence ``ipset_prefix = pn<tag>``.

The libvirtd outage test goes through a private Unix socket proxy in front
of libvirtd's socket: stopping the proxy looks to the driver exactly like
libvirtd going away (connection dropped, reconnects refused) without
disturbing the libvirtd that other tests use.  The test that really kills
and restarts libvirtd runs in CI (CI=true) or with PROVFW_TEST_RESTART_LIBVIRTD=1.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from provfw import exception
from provfw.rules import RuleSpec, make_spec
from provfw.virt.firewall import RuleUpdate, nwfilter
from provfw.virt.firewall import nwfilter_xml as nwx
from tests.lib import services
from tests.lib.applied import AppliedRules
from tests.lib.bridge import BridgeTopology
from tests.lib.netns import unique_tag, wait_until
from tests.lib.rule_strategies import rule_sets

pytestmark = pytest.mark.functional

ATTACKER4, OTHER4 = BridgeTopology.ATTACKER4
ATTACKER6, OTHER6 = BridgeTopology.ATTACKER6
INSTANCE4, INSTANCE6 = BridgeTopology.INSTANCE4, BridgeTopology.INSTANCE6
URI = "qemu:///system"
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
ENFORCE_WITHIN = 1.0          # seconds from asking to a dropped packet (ipset mode, existing group)
RULES_MODE_WITHIN = 10.0      # rules mode: libvirt re-instantiates the port (1.5-3 s measured on 2 busy cores)
MODES = ["rules", "ipset"]
BLOCKED_PROBE_TIMEOUT = 0.5   # a ping/connect on this bridge answers in well under a millisecond


def _libvirt():
    libvirt = pytest.importorskip("libvirt")
    return libvirt


_shared_conn = {}


@pytest.fixture(scope="module", autouse=True)
def _close_shared_conn():
    yield
    conn = _shared_conn.pop("conn", None)
    if conn is not None:
        conn.close()


@pytest.fixture
def libvirt_conn():
    """One connection for the module, reopened if libvirtd restarted since (see the restart test)."""
    services.require(services.libvirtd_running(), "a running libvirtd")
    libvirt = _libvirt()
    conn = _shared_conn.get("conn")
    try:
        alive = conn is not None and conn.isAlive()
    except libvirt.libvirtError:
        alive = False
    if not alive:
        conn = _shared_conn["conn"] = libvirt.open(URI)
    return conn


@pytest.fixture(scope="module")
def topo():
    services.require_root_netns()
    services.require_tools("ping", "ipset", "iptables", "ebtables")
    with BridgeTopology() as topology:
        yield topology


def accept_all_rules() -> list[nwx.FilterRule]:
    """A permissive 'security group' behind the provider rules: it accepts everything incoming."""
    return [nwx.FilterRule(element, (), action="accept", direction="in", priority=nwx.DEFAULT_RULE_PRIORITY)
            for element in ("all", "all-ipv6")]


class Hypervisor:
    """One test's view: its driver, its instance filter bound to the instance's port, its cleanup."""

    def __init__(self, conn, topo: BridgeTopology, conf, mode: str = "rules", uri: str = URI):
        self.conn = conn
        self.topo = topo
        self.conf = conf
        self.tag = unique_tag()
        self.provider = f"nova-provider-{self.tag}"
        self.instance_filter = f"nova-instance-test-{self.tag}"
        self.set_prefix = f"pn{self.tag}"
        conf.set_override("provider_filter", self.provider, group="libvirt")
        conf.set_override("instance_filter_pattern", f"nova-instance-test-{self.tag}*", group="libvirt")
        conf.set_override("ipset_prefix", self.set_prefix, group="libvirt")
        conf.set_override("match_mode", mode, group="libvirt")
        conf.set_override("uri", uri, group="libvirt")
        self.driver = nwfilter.NWFilterFirewall(conf)
        self.rules = AppliedRules(self.driver)
        self.bound_ports: list[str] = []
        self.filters: list[str] = []
        # Changes asked for but not applied yet: a failed refresh keeps them, as the
        # reconciler keeps the database's truth until a refresh succeeds.
        self.pending_added: list = []
        self.pending_removed: list = []

    # ------------------------------------------------------------ set-up / clean-up

    def define_instance_filter(self, name: str, reference_provider: bool = True) -> None:
        definition = nwx.FilterDef(name=name, rules=tuple(accept_all_rules()),
                                   filterrefs=(self.provider,) if reference_provider else ())
        self.conn.nwfilterDefineXML(nwx.render_filter(definition))
        self.filters.append(name)

    def bind(self, filter_name: str) -> None:
        self.conn.nwfilterBindingCreateXML(nwx.render_binding(
            self.topo.instance_port, self.topo.INSTANCE_MAC, filter_name, f"vm-{self.tag}", str(uuidlib.uuid4())))
        self.bound_ports.append(self.topo.instance_port)

    def start(self, reference_provider: bool = True) -> "Hypervisor":
        """Define the (empty) provider filter, the instance filter, and bind it to the instance's port."""
        self.rules.rebuild([])
        self.define_instance_filter(self.instance_filter, reference_provider)
        self.bind(self.instance_filter)
        return self

    def cleanup(self) -> None:
        libvirt = _libvirt()
        errors = []
        for port in self.bound_ports:
            try:
                self.conn.nwfilterBindingLookupByPortDev(port).delete()
            except libvirt.libvirtError as exc:
                errors.append(exc)
        for name in reversed(self.filters):
            try:
                self.conn.nwfilterLookupByName(name).undefine()
            except libvirt.libvirtError as exc:
                errors.append(exc)
        self.conf.set_override("uri", URI, group="libvirt")
        self.driver = nwfilter.NWFilterFirewall(self.conf)
        self.driver.teardown()
        assert self.leftover_sets() == set()
        assert errors == []

    def leftover_sets(self) -> set[str]:
        names = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=True).stdout.split()
        return {n for n in names if n.startswith(self.set_prefix)}

    # ------------------------------------------------------------ rules, as the reconciler hands them over

    def add(self, cidr: str, protocol: str = "all", from_port=None, to_port=None) -> None:
        """Ask for the rule without applying it (several adds, then one refresh, save libvirt work)."""
        self.pending_added.append(make_spec(cidr, protocol, from_port, to_port))

    def remove(self, cidr: str, protocol: str = "all", from_port=None, to_port=None) -> None:
        self.pending_removed.append(make_spec(cidr, protocol, from_port, to_port))

    def block(self, cidr: str, protocol: str = "all", from_port=None, to_port=None) -> float:
        """Create the rule and refresh; return the refresh's seconds."""
        self.add(cidr, protocol, from_port, to_port)
        return self.refresh()

    def unblock(self, cidr: str, protocol: str = "all", from_port=None, to_port=None) -> float:
        self.remove(cidr, protocol, from_port, to_port)
        return self.refresh()

    def refresh(self) -> float:
        """Apply what is pending (a delta where the driver can); return the seconds it took."""
        started = time.monotonic()
        self.rules.apply(added=self.pending_added, removed=self.pending_removed)
        self.pending_added, self.pending_removed = [], []
        return time.monotonic() - started

    @property
    def mode(self) -> str:
        """The match mode of the filter the driver defined last (from its state)."""
        return self.rules.state.mode

    def provider_uuid(self) -> str:
        return self.conn.nwfilterLookupByName(self.provider).UUIDString()


@pytest.fixture
def hypervisor_factory(libvirt_conn, topo, conf):
    made = []

    def make(mode: str = "rules", reference_provider: bool = True, uri: str = URI, start: bool = True):
        hv = Hypervisor(libvirt_conn, topo, conf, mode, uri)
        made.append(hv)
        return hv.start(reference_provider) if start else hv

    try:
        yield make
    finally:
        for hv in made:
            hv.cleanup()
        topo.wait_reachable()


def assert_blocked_now(topo, src, dst):
    assert topo.blocked(src, dst, timeout=BLOCKED_PROBE_TIMEOUT), f"{src} still reaches {dst}"


def assert_reachable_soon(topo, src, dst, timeout=5.0):
    # After an unblock, ARP/neighbour entries that failed while blocked need one more round.
    assert wait_until(lambda: topo.reachable(src, dst, timeout=0.5), timeout) is not None, \
        f"{src} does not reach {dst}"


# ---------------------------------------------------------------- XML accepted by libvirtd

def test_every_rendered_filter_is_accepted_and_stored_unchanged_by_libvirtd(libvirt_conn):
    """Each rule kind of both modes: libvirtd defines it and hands back the same content."""
    libvirt = _libvirt()
    tag = unique_tag()
    specs = [make_spec(*args) for args in [
        ("203.0.113.0/24", "all"), ("203.0.113.7", "tcp"), ("203.0.113.0/24", "tcp", 80, 90),
        ("203.0.113.0/24", "udp", 53), ("203.0.113.0/24", "icmp"), ("203.0.113.0/24", "icmp", 8),
        ("203.0.113.0/24", "icmp", 3, 1), ("203.0.113.0/24", "icmp", 0, 0),
        ("2001:db8::/32", "all"), ("2001:db8::1", "tcp", 443), ("2001:db8::/48", "udp", 1000, 2000),
        ("2001:db8::/48", "icmp"), ("2001:db8::/48", "icmp", 128), ("2001:db8::/48", "icmp", 1, 4)]]
    set_name = lambda key: f"pn{tag}{key.version}-all"      # noqa: E731
    set_rules, groups = nwx.provider_rules(specs, True, set_name)
    rules = list(nwx.rules_for_specs(specs)) + list(set_rules)
    definition = nwx.provider_filter(f"provfw-xmltest-{tag}", rules)
    set_names = [set_name(key) for key in groups]
    try:
        for key in groups:
            subprocess.run(["ipset", "create", set_name(key), "hash:net", "family", key.family], check=True)
        defined = libvirt_conn.nwfilterDefineXML(nwx.render_filter(definition))
        stored = nwx.parse_filter(defined.XMLDesc())
        assert stored.same_content(definition)
        uuid = stored.uuid
        # Redefining with the UUID read back is accepted and keeps it.
        again = libvirt_conn.nwfilterDefineXML(nwx.render_filter(dataclasses.replace(definition, uuid=uuid)))
        assert again.UUIDString() == uuid
    finally:
        try:
            libvirt_conn.nwfilterLookupByName(definition.name).undefine()
        except libvirt.libvirtError:
            pass
        for name in set_names:
            subprocess.run(["ipset", "destroy", name], check=False)


# ---------------------------------------------------------------- direction semantics

def test_direction_in_drops_the_attackers_traffic_towards_the_instance_and_out_does_not(hypervisor_factory):
    """libvirt's 'in' is traffic entering the VM; 'out' (from the VM) never sees the attacker's packets."""
    hv = hypervisor_factory()
    uuid = hv.provider_uuid()
    for direction, blocked in (("out", False), ("in", True)):
        rules = [dataclasses.replace(nwx.spec_rule(make_spec(cidr, protocol)), direction=direction)
                 for cidr, protocol in ((ATTACKER4, "all"), (ATTACKER6, "tcp"), (ATTACKER6, "icmp"))]
        hv.conn.nwfilterDefineXML(nwx.render_filter(nwx.provider_filter(hv.provider, rules, uuid)))
        assert hv.topo.blocked(ATTACKER4, INSTANCE4, timeout=BLOCKED_PROBE_TIMEOUT) is blocked
        assert hv.topo.blocked(ATTACKER6, INSTANCE6, timeout=BLOCKED_PROBE_TIMEOUT) is blocked
        assert hv.topo.reachable(OTHER4, INSTANCE4)


# ---------------------------------------------------------------- the driver, end to end

@pytest.mark.parametrize("mode", MODES)
def test_blocking_one_address_drops_its_packets_at_once_and_unblocking_lets_them_through(hypervisor_factory, mode):
    hv = hypervisor_factory(mode)
    topo = hv.topo
    uuid = hv.provider_uuid()
    hv.add("203.0.113.0/24")            # rules already in force (and, in ipset mode, the groups' sets)
    hv.block("2001:db8::/32")
    assert topo.reachable(ATTACKER4, INSTANCE4) and topo.reachable(ATTACKER6, INSTANCE6)
    # ipset mode: a new CIDR of an existing group is one set add, no libvirt work.  rules mode: libvirt
    # re-instantiates every bound port (~100 iptables/ebtables processes per port on libvirt 9.0).
    within = ENFORCE_WITHIN if mode == "ipset" else RULES_MODE_WITHIN

    assert hv.block(ATTACKER4) < within
    assert_blocked_now(topo, ATTACKER4, INSTANCE4)      # in force when refresh returns: the probes time out
    assert topo.reachable(OTHER4, INSTANCE4)
    assert topo.reachable(ATTACKER6, INSTANCE6)

    assert hv.block(f"{ATTACKER6}/128") < within
    assert_blocked_now(topo, ATTACKER6, INSTANCE6)
    assert topo.reachable(OTHER6, INSTANCE6)

    # The filter was redefined in place: same UUID, so every port that references it follows.
    assert hv.provider_uuid() == uuid
    # A second refresh with nothing new writes nothing; neither does a drift check that finds no drift.
    assert hv.rules.apply().changed is False
    assert hv.rules.repair().changed is False
    assert hv.mode == mode

    hv.remove(ATTACKER4)
    hv.unblock(f"{ATTACKER6}/128")
    assert_reachable_soon(topo, ATTACKER4, INSTANCE4)
    assert_reachable_soon(topo, ATTACKER6, INSTANCE6)
    assert hv.provider_uuid() == uuid


@pytest.mark.parametrize("mode", MODES)
def test_port_and_icmp_rules_drop_only_what_they_name(hypervisor_factory, mode):
    hv = hypervisor_factory(mode)
    topo = hv.topo
    udp_port = 5353
    echo = topo.start_udp_echo(udp_port)
    try:
        hv.add(ATTACKER4, "tcp", 8080)                    # TCP to the listener only
        hv.add(ATTACKER6, "icmp", 128)                    # ICMPv6 echo request only
        hv.add(OTHER4, "udp", 5000, 6000)                 # a UDP port range
        hv.add(OTHER6, "tcp", 1, 79)                      # a TCP range that does not include 8080
        hv.add("203.0.113.0/24")                          # and one protocol-all rule (a set in ipset mode)
        hv.refresh()
        assert not topo.can_connect(ATTACKER4, INSTANCE4, timeout=0.5)
        assert topo.can_ping(ATTACKER4, INSTANCE4)
        assert not topo.can_ping(ATTACKER6, INSTANCE6, timeout=BLOCKED_PROBE_TIMEOUT)
        assert topo.can_connect(ATTACKER6, INSTANCE6)
        assert not topo.can_udp(OTHER4, INSTANCE4, udp_port, timeout=0.5)
        assert topo.reachable(OTHER4, INSTANCE4)          # ping and TCP 8080 still pass
        assert topo.can_udp(ATTACKER4, INSTANCE4, udp_port)
        assert topo.reachable(OTHER6, INSTANCE6)
        # ipset mode: the protocol-all CIDRs go to a set; port/ICMP rules stay per CIDR (libvirt 9.0 limit).
        assert len(hv.leftover_sets()) == (1 if mode == "ipset" else 0)
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait(5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode, examples", [("rules", 20), ("ipset", 20)])
def test_every_rule_set_the_api_accepts_is_instantiated_by_libvirtd_and_stable(hypervisor_factory, mode, examples):
    """The nwfilter half of tests/functional/test_driver_properties.py: rule sets drawn from what the API
    accepts (tests.lib.rule_strategies), applied as deltas or full rebuilds to a provider filter that a
    bound port references - so libvirtd instantiates every rule into ebtables/iptables, and a rule it
    cannot instantiate fails the define - then held (rules in the filter read back from libvirtd plus host
    set members) and stable (a second apply defines nothing and writes nothing)."""
    hv = hypervisor_factory(mode)
    seen = []

    def held() -> int:
        stored = nwx.parse_filter(hv.conn.nwfilterLookupByName(hv.provider).XMLDesc())
        per_cidr = sum(1 for rule in stored.rules if not dict(rule.attrs).get("ipset"))
        members = 0
        for name in hv.leftover_sets():
            save = subprocess.run(["ipset", "save", name], capture_output=True, text=True, check=True).stdout
            members += sum(1 for line in save.splitlines() if line.startswith("add "))
        return per_cidr + members

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(specs=rule_sets(max_size=8), full=st.booleans())
    def apply_and_reapply(specs, full):
        if full:
            hv.rules.rebuild(specs)
        else:
            hv.rules.apply(added=specs - hv.rules.desired, removed=hv.rules.desired - specs)
        assert held() == len(specs), f"libvirtd and the host sets hold {held()} rules, {len(specs)} were applied"
        assert hv.rules.repair().changed is False, f"a second apply of {sorted(specs)} changed something"
        seen.append(len(specs))

    apply_and_reapply()
    assert len(seen) >= examples // 2


def test_auto_mode_switches_to_ipsets_past_the_threshold_without_letting_anyone_through(hypervisor_factory):
    hv = hypervisor_factory("auto")
    hv.conf.set_override("ipset_threshold", 2, group="libvirt")
    hv.add(ATTACKER4)
    hv.block(ATTACKER6)
    assert hv.mode == "rules" and hv.leftover_sets() == set()
    hv.block("203.0.113.0/24")
    assert hv.mode == "ipset" and len(hv.leftover_sets()) == 2
    assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)
    assert_blocked_now(hv.topo, ATTACKER6, INSTANCE6)
    hv.unblock("203.0.113.0/24")
    assert hv.mode == "rules"
    assert hv.leftover_sets() == set()                    # destroyed once the filter stopped using them
    assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)
    assert hv.topo.reachable(OTHER4, INSTANCE4)


def test_a_provider_filter_changed_behind_our_back_is_repaired(hypervisor_factory):
    hv = hypervisor_factory()
    hv.block(ATTACKER4)
    uuid = hv.provider_uuid()
    hv.conn.nwfilterDefineXML(nwx.render_filter(nwx.provider_filter(hv.provider, [], uuid)))   # someone empties it
    assert_reachable_soon(hv.topo, ATTACKER4, INSTANCE4)
    assert hv.rules.repair().changed is True
    assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)
    assert hv.rules.repair().changed is False
    assert hv.provider_uuid() == uuid


def test_the_libvirt_compute_driver_runs_the_nwfilter_driver_on_its_own_connection(libvirt_conn, conf):
    from provfw.virt import libvirt_conn as libvirt_compute

    provider = f"nova-provider-{unique_tag()}"
    conf.set_override("firewall_driver", "nwfilter", group="compute")
    conf.set_override("provider_filter", provider, group="libvirt")
    compute = libvirt_compute.LibvirtConnection(conf)
    try:
        assert isinstance(compute.firewall_driver, nwfilter.NWFilterFirewall)
        desired = frozenset({make_spec("203.0.113.0/24", "tcp", 22)})
        result = compute.refresh_provider_fw_rules(RuleUpdate.rebuild(desired))
        assert result.changed and result.state == nwfilter.NWFilterState("rules", {})
        stored = nwx.parse_filter(libvirt_conn.nwfilterLookupByName(provider).XMLDesc())
        assert stored.rules == (nwx.spec_rule(make_spec("203.0.113.0/24", "tcp", 22)),)
        assert compute.repair_provider_fw_drift(desired, result.state).changed is False
    finally:
        compute.firewall_driver.teardown()
        compute.close()


# ---------------------------------------------------------------- filter references

def test_ensure_filter_refs_makes_existing_instance_filters_enforce_provider_rules(hypervisor_factory):
    hv = hypervisor_factory(reference_provider=False)
    hv.block(ATTACKER4)
    # Not referenced: the instance's filter does not see the provider rules yet.
    assert hv.topo.reachable(ATTACKER4, INSTANCE4)
    instance_uuid = hv.conn.nwfilterLookupByName(hv.instance_filter).UUIDString()

    changed = nwfilter.ensure_filter_refs(hv.conn, f"nova-instance-test-{hv.tag}*", hv.provider)
    assert changed == [hv.instance_filter]
    assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)
    assert hv.conn.nwfilterLookupByName(hv.instance_filter).UUIDString() == instance_uuid
    assert nwfilter.ensure_filter_refs(hv.conn, f"nova-instance-test-{hv.tag}*", hv.provider) == []

    # With [libvirt] ensure_filter_refs every full plan does it - the periodic drift check too, which is
    # how instances that appear without any rule change get the reference.
    late = f"nova-instance-test-{hv.tag}-late"
    hv.define_instance_filter(late, reference_provider=False)
    hv.conf.set_override("ensure_filter_refs", True, group="libvirt")
    assert hv.rules.repair().changed is True
    assert hv.provider in nwx.parse_filter(hv.conn.nwfilterLookupByName(late).XMLDesc()).filterrefs
    assert hv.rules.repair().changed is False
    # Filters outside the pattern are never touched.
    assert hv.provider not in nwx.parse_filter(hv.conn.nwfilterLookupByName("clean-traffic").XMLDesc()).filterrefs


def test_ensure_filter_refs_refuses_to_reference_a_filter_that_does_not_exist(libvirt_conn):
    with pytest.raises(exception.DriverError, match="not defined"):
        nwfilter.ensure_filter_refs(libvirt_conn, "nova-instance-*", f"nova-provider-missing-{unique_tag()}")


# ---------------------------------------------------------------- checks (the reconciler's bisection)

def _filter_names(conn) -> set[str]:
    return {f.name() for f in conn.listAllNWFilters()}


@pytest.mark.parametrize("mode", MODES)
def test_a_check_defines_a_scratch_filter_and_removes_it_and_the_provider_filter_is_untouched(hypervisor_factory,
                                                                                              mode):
    hv = hypervisor_factory(mode)
    hv.add("203.0.113.0/24")
    hv.block(ATTACKER4)
    before = hv.conn.nwfilterLookupByName(hv.provider).XMLDesc(), hv.leftover_sets(), _filter_names(hv.conn)
    sets_before = {name: subprocess.run(["ipset", "save", name], capture_output=True, text=True).stdout
                   for name in before[1]}
    defined = []
    real_check = hv.driver._check_filter

    def watching(conn, desired):
        defined.append(desired.name)
        return real_check(conn, desired)

    hv.driver._check_filter = watching          # observe, not replace: the real define and undefine run
    hv.driver.check_provider_fw_rules([make_spec(OTHER4), make_spec(OTHER6, "tcp", 8080),
                                       make_spec("198.51.100.0/24", "icmp", 8)])
    assert defined == [f"{hv.provider}-check"]
    refused_by_libvirt = RuleSpec("198.51.100.0/24", "tcp", 70000, 70000)      # bypasses validation
    refused_by_ipset = RuleSpec("fe80::1%eth0/128", "all", -1, -1)
    for refused in (refused_by_libvirt, refused_by_ipset) if mode == "ipset" else (refused_by_libvirt,):
        with pytest.raises(exception.DriverError):
            hv.driver.check_provider_fw_rules([make_spec(OTHER4), refused])
    after = hv.conn.nwfilterLookupByName(hv.provider).XMLDesc(), hv.leftover_sets(), _filter_names(hv.conn)
    assert after == before, "no scratch filter or set left, the provider filter as it was"
    assert {name: subprocess.run(["ipset", "save", name], capture_output=True, text=True).stdout
            for name in after[1]} == sets_before
    assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)
    assert hv.topo.reachable(OTHER4, INSTANCE4)


# ---------------------------------------------------------------- libvirtd away

class LibvirtSocketProxy:
    """A private Unix socket forwarded to libvirtd's; ``stop()`` makes libvirtd vanish for its clients."""

    def __init__(self, target: str = LIBVIRT_SOCKET):
        self.target = target
        self.dir = tempfile.mkdtemp(prefix="provfw-libvirt-proxy-")
        self.path = os.path.join(self.dir, "sock")
        self.uri = f"qemu+unix:///system?socket={self.path}"
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            os.unlink(self.path)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.stop()
        os.rmdir(self.dir)


@pytest.mark.parametrize("mode", MODES)
def test_libvirtd_away_raises_driver_error_keeps_the_previous_filter_and_applies_when_back(hypervisor_factory, mode):
    proxy = LibvirtSocketProxy()
    proxy.start()
    try:
        hv = hypervisor_factory(mode, uri=proxy.uri)
        hv.block(ATTACKER4)
        assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)

        proxy.stop()                                              # libvirtd "goes away"
        if mode == "rules":
            applied = hv.rules.desired, hv.rules.state
            with pytest.raises(exception.DriverError):
                hv.block(OTHER4)                                  # a new rule needs the filter redefined
            assert hv.topo.reachable(OTHER4, INSTANCE4)
            pending = (OTHER4, INSTANCE4, lambda src, dst: hv.topo.blocked(src, dst, timeout=BLOCKED_PROBE_TIMEOUT))
        else:
            assert hv.block(OTHER4) < ENFORCE_WITHIN              # a new member of an existing set: no libvirt
            assert hv.rules.last.mode == "delta"
            assert_blocked_now(hv.topo, OTHER4, INSTANCE4)
            applied = hv.rules.desired, hv.rules.state
            with pytest.raises(exception.DriverError):
                hv.driver.repair_drift(*applied)                  # the periodic check does notice libvirtd is away
            with pytest.raises(exception.DriverError):
                hv.block(OTHER6, "tcp", 8080)                     # not set-matchable: the filter must change
            assert hv.topo.can_connect(OTHER6, INSTANCE6)
            pending = (OTHER6, INSTANCE6, lambda src, dst: not hv.topo.can_connect(src, dst, timeout=0.5))
        assert (hv.rules.desired, hv.rules.state) == applied     # the failed change is not recorded as applied
        assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)         # the previous filter stays in force
        with pytest.raises(exception.DriverError):                # still away: still an error, no hang
            hv.refresh()

        proxy.start()                                             # libvirtd is back
        hv.refresh()
        assert hv.rules.desired > applied[0]
        source, target, is_blocked = pending
        assert is_blocked(source, target)
        assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)
    finally:
        proxy.close()


def _virsh_answers() -> bool:
    return subprocess.run(["virsh", "-c", URI, "nwfilter-list"], capture_output=True, timeout=10).returncode == 0


@pytest.mark.skipif(os.environ.get("PROVFW_TEST_RESTART_LIBVIRTD") != "1" and not services.in_ci(),
                    reason="kills and restarts the shared libvirtd; runs in CI (alone on the machine) "
                           "or with PROVFW_TEST_RESTART_LIBVIRTD=1")
def test_a_real_libvirtd_restart_raises_driver_error_and_the_next_refresh_applies(hypervisor_factory):
    hv = hypervisor_factory()
    hv.block(ATTACKER4)
    pid = int(subprocess.run(["pgrep", "-x", "-o", "libvirtd"], capture_output=True, text=True,
                             check=True).stdout.split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30) is not None
        with pytest.raises(exception.DriverError):
            hv.block(OTHER4)
        assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)         # the kernel keeps what libvirt put there
    finally:
        if not services.libvirtd_running():
            subprocess.run(["libvirtd", "-d"], check=True)
        assert wait_until(_virsh_answers, 60, interval=0.5) is not None, "libvirtd did not come back"
        hv.conn = _libvirt().open(URI)        # the test's own connection died with the old daemon
        dead, _shared_conn["conn"] = _shared_conn.get("conn"), hv.conn     # later tests get the live one
        try:
            dead.close()
        except _libvirt().libvirtError:
            pass
    # libvirtd re-instantiates its bindings at start; the driver reconnects on its own.
    assert wait_until(lambda: _refresh_ok(hv), 30, interval=0.5) is not None
    assert_blocked_now(hv.topo, OTHER4, INSTANCE4)
    assert_blocked_now(hv.topo, ATTACKER4, INSTANCE4)


def _refresh_ok(hv: Hypervisor) -> bool:
    try:
        hv.refresh()
    except exception.DriverError:
        return False
    return True
