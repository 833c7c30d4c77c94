"""The fake set dataplane (tests/lib/fake_sets.py) tells the truth: each behaviour the drivers rely on."""

from __future__ import annotations

import pytest

from provfw import exception
from tests.lib.fake_sets import FakeSetDataplane


def test_ipset_restore_is_not_atomic_and_enforces_maxelem():
    plane = FakeSetDataplane()
    script = "create s hash:net family inet maxelem 2\nadd s 1.1.1.1/32\nadd s 2.2.2.0/24\nadd s 3.3.3.3\n"
    with pytest.raises(exception.ProcessExecutionError, match="Hash is full"):
        plane(["ipset", "restore"], input=script)
    assert plane.ipset.sets["s"].members == {"1.1.1.1", "2.2.2.0/24"}      # partly filled, like the kernel


def test_ipset_swap_needs_same_family_and_destroy_refuses_referenced_sets():
    plane = FakeSetDataplane()
    plane(["ipset", "restore"], input="create a hash:net family inet\ncreate b hash:net family inet6\n")
    with pytest.raises(exception.ProcessExecutionError, match="cannot be swapped"):
        plane(["ipset", "swap", "a", "b"])
    plane(["iptables-restore", "--noflush"], input="*filter\n:x - [0:0]\n-A x -m set --match-set a src -j DROP\n"
                                                   "COMMIT\n")
    with pytest.raises(exception.ProcessExecutionError, match="in use"):
        plane(["ipset", "destroy", "a"])


def test_iptables_rule_naming_a_missing_set_fails_the_whole_restore():
    plane = FakeSetDataplane()
    with pytest.raises(exception.ProcessExecutionError, match="doesn't exist"):
        plane(["iptables-restore", "--noflush"], input="*filter\n:x - [0:0]\n"
                                                       "-A x -m set --match-set nope src -j DROP\nCOMMIT\n")
    assert not plane.iptables.has_chain("x")


def test_nft_script_is_one_transaction():
    plane = FakeSetDataplane()
    script = ("add table inet t\nadd set inet t s { type ipv4_addr; }\nadd element inet t s { 1.1.1.1 }\n"
              "delete element inet t s { 2.2.2.2 }\n")
    with pytest.raises(exception.ProcessExecutionError, match="<stdin>:4"):
        plane(["nft", "-f", "-"], input=script)
    assert plane.nft.tables == {}


def test_nft_masked_lookup_drops_inside_the_prefix_only():
    plane = FakeSetDataplane()
    plane(["nft", "-f", "-"], input=(
        "add table inet t\nadd chain inet t f { type filter hook forward priority -10; policy accept; }\n"
        "add set inet t s { type ipv4_addr; }\nadd element inet t s { 10.1.0.0 }\n"
        "add rule inet t f ip saddr & 255.255.0.0 @s tcp dport 20-30 drop comment \"x\"\n"))
    assert plane.drops("10.1.2.3", "tcp", 22)
    assert not plane.drops("10.1.2.3", "tcp", 80)
    assert not plane.drops("10.2.0.1", "tcp", 22)


def test_ipset_destroy_of_a_missing_set_fails_unless_exist():
    plane = FakeSetDataplane()
    with pytest.raises(exception.ProcessExecutionError, match="does not exist"):
        plane(["ipset", "destroy", "nope"])
    plane(["ipset", "restore", "-exist"], input="destroy nope\n")


def test_nft_check_mode_validates_the_batch_and_commits_nothing():
    plane = FakeSetDataplane()
    good = "add table inet t\nadd set inet t s { type ipv4_addr; }\nadd element inet t s { 1.1.1.1 }\n"
    plane(["nft", "-c", "-f", "-"], input=good)
    assert plane.nft.tables == {} and plane.nft.checks == 1
    with pytest.raises(exception.ProcessExecutionError, match="<stdin>:3"):
        plane(["nft", "-c", "-f", "-"], input=good.replace("1.1.1.1", "fe80::1%eth0"))


def test_nft_lists_its_tables_as_data():
    plane = FakeSetDataplane()
    plane(["nft", "-f", "-"], input="add table inet t\n")
    assert '"name": "t"' in plane(["nft", "-j", "list", "tables"])


def test_an_unknown_program_is_a_missing_tool():
    with pytest.raises(exception.ToolMissing):
        FakeSetDataplane()(["ebtables-restore"])
