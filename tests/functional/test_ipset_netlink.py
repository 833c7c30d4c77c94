"""ipset over netlink against the real kernel, inside a namespace of the test's own.

The same member changes as ``ipset restore -exist`` (what the ipset tool then
saves is the proof), the kernel's refusals as the driver errors the
reconciler decides on, and the fall-back to the tool when no netlink socket
can be had.
"""

from __future__ import annotations

import pytest

from provfw import exception, runner as runner_mod
from provfw.virt.firewall import base, ipset, ipset_netlink
from tests.lib import services
from tests.lib.netns import netns_exec, run, unique_tag

pytestmark = pytest.mark.functional


@pytest.fixture
def ns():
    services.require_root_netns()
    services.require_tools("ipset")
    name = f"pfwnl-{unique_tag()}"
    run("ip", "netns", "add", name)
    try:
        netns_exec(name, "ipset", "create", "pfw4-all-any", "hash:net", "family", "inet", "maxelem", "300")
        netns_exec(name, "ipset", "create", "pfw6-all-any", "hash:net", "family", "inet6")
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def members(ns: str, name: str) -> set[str]:
    saved = netns_exec(ns, "ipset", "save", name).stdout
    return {line.split()[2] for line in saved.splitlines() if line.startswith("add ")}


def test_member_changes_reach_the_namespaces_sets_as_restore_exist_would(ns):
    client = ipset_netlink.IpsetNetlink(ns)
    try:
        client.change([("add", "pfw4-all-any", "192.0.2.1"), ("add", "pfw4-all-any", "198.51.100.0/24"),
                       ("add", "pfw4-all-any", "192.0.2.1"),        # present already: -exist
                       ("del", "pfw4-all-any", "203.0.113.5"),      # absent already: -exist
                       ("add", "pfw6-all-any", "2001:db8::/32"), ("add", "pfw6-all-any", "2001:db8:1::1")])
        assert members(ns, "pfw4-all-any") == {"192.0.2.1", "198.51.100.0/24"}
        assert members(ns, "pfw6-all-any") == {"2001:db8::/32", "2001:db8:1::1"}
        client.change([("del", "pfw4-all-any", "192.0.2.1")])
        assert members(ns, "pfw4-all-any") == {"198.51.100.0/24"}
        # More changes than one send carries: every one is sent and acknowledged.
        many = [("add", "pfw4-all-any", f"10.1.{i // 256}.{i % 256}") for i in range(250)]
        client.change(many)
        assert len(members(ns, "pfw4-all-any")) == 251
        # The host's own namespace saw none of it.
        assert "pfw4-all-any" not in run("ipset", "list", "-n").stdout.split()
    finally:
        client.close()


def test_the_kernels_refusals_are_driver_errors_naming_the_change(ns):
    client = ipset_netlink.IpsetNetlink(ns)
    try:
        with pytest.raises(exception.KernelObjectMissing, match="add pfw4-nosuch 192.0.2.1: The set"):
            client.change([("add", "pfw4-nosuch", "192.0.2.1")])
        client.change([("add", "pfw4-all-any", f"10.2.{i // 256}.{i % 256}") for i in range(300)])
        with pytest.raises(exception.DriverError, match="192.0.2.9: Hash is full") as refused:
            client.change([("add", "pfw4-all-any", "192.0.2.9"), ("del", "pfw4-all-any", "10.2.0.0")])
        assert not isinstance(refused.value, exception.KernelObjectMissing)
        # The kernel answers each change on its own: the del after the refused add was applied.
        assert "10.2.0.0" not in members(ns, "pfw4-all-any")
        # The socket is still good after refusals.
        client.change([("add", "pfw4-all-any", "192.0.2.9")])
        assert "192.0.2.9" in members(ns, "pfw4-all-any")
    finally:
        client.close()


def test_refusals_anywhere_in_a_send_are_read_though_only_its_last_change_asks_for_an_answer(ns):
    # Only the last message of a send carries NLM_F_ACK; the kernel answers refusals unasked.  A refusal in
    # the middle of a send and one of its last change are both read, and every other change is applied.
    client = ipset_netlink.IpsetNetlink(ns)
    try:
        last = ipset_netlink.MAX_BATCH - 1
        changes = [("add", "pfw4-all-any", f"10.3.0.{i}") for i in range(last + 1)]
        for index in (5, last):
            changes[index] = ("add", "pfw4-nosuch", f"10.3.0.{index}")
        with pytest.raises(exception.KernelObjectMissing, match=r"add pfw4-nosuch 10\.3\.0\.5: .*and 1 more"):
            client.change(changes)
        applied = {f"10.3.0.{i}" for i in range(last + 1)} - {"10.3.0.5", f"10.3.0.{last}"}
        assert members(ns, "pfw4-all-any") == applied
        # Nothing of those answers is left on the socket for the next change to misread.
        client.change([("del", "pfw4-all-any", "10.3.0.0")])
        assert members(ns, "pfw4-all-any") == applied - {"10.3.0.0"}
    finally:
        client.close()


def test_without_a_netlink_socket_the_delta_runs_ipset_restore(ns):
    runner = runner_mod.Runner(ns)
    command = base.Command(("ipset", "restore", "-exist"), "add pfw4-all-any 192.0.2.77\n", what="ipset restore")
    unreachable = ipset_netlink.IpsetNetlink(f"pfwnl-missing-{unique_tag()}")   # no such namespace: OSError
    step = ipset.member_step(command, runner, unreachable)
    assert isinstance(step, base.Call)
    assert base.execute(base.Plan(None, sets=(step,)), runner) is True
    assert "192.0.2.77" in members(ns, "pfw4-all-any")
    # A runner that is not the real one (a test's fake dataplane) keeps the command itself.
    assert ipset.netlink_for(object()) is None
    assert ipset.member_step(command, runner, None) is command


def test_long_runs_go_in_bulk_messages_and_reach_the_sets_as_restore_exist_would(ns):
    client = ipset_netlink.IpsetNetlink(ns)
    netns_exec(ns, "ipset", "create", "pfw4-bulk", "hash:net", "family", "inet", "maxelem", "20000")
    try:
        hosts = [f"10.4.{i // 256}.{i % 256}" for i in range(5000)]
        networks = [f"10.{8 + i // 256}.{i % 256}.0/24" for i in range(600)]
        v6 = [f"2001:db8:{i + 1:x}::/48" for i in range(300)] + [f"2001:db8:ffff::{i + 1:x}" for i in range(300)]
        client.change([("add", "pfw4-bulk", m) for m in hosts + networks] + [("add", "pfw4-bulk", hosts[0])]
                      + [("add", "pfw6-all-any", m) for m in v6])
        assert members(ns, "pfw4-bulk") == set(hosts + networks)
        assert members(ns, "pfw6-all-any") == set(v6)
        client.change([("del", "pfw4-bulk", m) for m in hosts[:4000] + ["192.0.2.200"]])    # one absent: -exist
        assert members(ns, "pfw4-bulk") == set(hosts[4000:] + networks)
    finally:
        client.close()


def test_a_bulk_message_the_kernel_refuses_is_a_driver_error_naming_its_run(ns):
    client = ipset_netlink.IpsetNetlink(ns)
    try:
        run_ = [f"10.5.{i // 256}.{i % 256}" for i in range(400)]               # the set holds 300
        with pytest.raises(exception.DriverError, match=r"add pfw4-all-any \(400 members, 10\.5\.0\.0 to "
                                                        r"10\.5\.1\.143.*\): Hash is full"):
            client.change([("add", "pfw4-all-any", m) for m in run_])
        assert members(ns, "pfw4-all-any") == set(run_[:300])    # the kernel stopped at the first refused
        with pytest.raises(exception.KernelObjectMissing):
            client.change([("add", "pfw4-nosuch", m) for m in run_])
        client.change([("del", "pfw4-all-any", m) for m in run_])                # the socket is still good
        assert members(ns, "pfw4-all-any") == set()
    finally:
        client.close()


def test_a_full_plan_filled_over_netlink_leaves_the_sets_the_restore_would(ns):
    runner = runner_mod.Runner(ns)
    client = ipset_netlink.IpsetNetlink(ns)
    naming = ipset.SetNaming("pfw")
    conf = _SetsConf()
    netns_exec(ns, "ipset", "add", "pfw4-all-any", "192.0.2.1")
    try:
        rebuilt = {f"10.6.{i // 256}.{i % 256}" for i in range(2000)}          # a swap of the live set
        new = {f"2001:db8:{i + 1:x}::/48" for i in range(1500)}                   # a set created and filled
        desired = {ipset.MatchKey(4, "all", -1, -1): rebuilt, ipset.MatchKey(6, "tcp", 22, 22): new}
        planned = ipset.plan_sets(desired, ipset.read_sets(runner, naming.owns), naming, conf)
        (step,) = planned.restore_steps(runner, client)
        assert isinstance(step, base.Call) and "3500 members over netlink" in step.describe()
        assert base.execute(base.Plan(None, sets=(step,)), runner) is True
        found = ipset.read_sets(runner, naming.owns)
        assert {name: s.members for name, s in found.items() if name != "pfw6-all-any"} == {
            "pfw4-all-any": rebuilt, "pfw6-tcp-22": new}

        # A fill the kernel refuses runs the plan's cleanup: the scratch set does not outlive it.
        over = ipset.SetsPlan(("create pfw4-over hash:net family inet maxelem 1024",),
                              {"pfw4-over": [f"10.7.{i // 256}.{i % 256}" for i in range(2000)]}, (),
                              ("pfw4-over",), (), {})
        with pytest.raises(exception.DriverError, match="Hash is full"):
            base.execute(base.Plan(None, sets=over.restore_steps(runner, client)), runner)
        assert "pfw4-over" not in netns_exec(ns, "ipset", "list", "-n").stdout.split()
        # Without a netlink socket the whole restore runs instead.
        unreachable = ipset_netlink.IpsetNetlink(f"pfwnl-missing-{unique_tag()}")
        fallback = ipset.SetsPlan(("create pfw4-fallback hash:net family inet maxelem 4096",),
                                  {"pfw4-fallback": [f"10.8.{i // 256}.{i % 256}" for i in range(1500)]},
                                  ("add pfw4-all-any 192.0.2.99",), ("pfw4-fallback",), (), {})
        (step,) = fallback.restore_steps(runner, unreachable)
        assert isinstance(step, base.Call) and base.execute(base.Plan(None, sets=(step,)), runner)
        assert len(members(ns, "pfw4-fallback")) == 1500 and "192.0.2.99" in members(ns, "pfw4-all-any")
    finally:
        client.close()


class _SetsConf:
    class sets:
        min_set_size = 1024
        headroom = 2.0
        full_rebuild_delta = 1000
