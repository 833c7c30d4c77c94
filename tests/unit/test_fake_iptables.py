"""The fake dataplane must behave like iptables-restore where provfw relies on it, or the driver tests mean nothing.

tests/functional/test_iptables_driver.py also replays one sequence on the
fake and on the real tools and compares the results.
"""

from __future__ import annotations

import pytest

from provfw import exception
from tests.lib.fake_iptables import FakeIptables

RESTORE = ["iptables-restore", "--noflush", "--wait", "10"]


def test_fresh_table_has_the_builtin_chains_and_nothing_else():
    fake = FakeIptables()
    text = fake(["iptables-save", "-t", "filter"])
    assert ":INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT" in text
    assert fake.rules("FORWARD") == []


def test_transaction_is_visible_only_after_commit_and_a_bad_line_rejects_all_of_it():
    fake = FakeIptables()
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    before = fake.save()
    bad = ("*filter\n:nova-provider - [0:0]\n-A nova-provider -s 10.0.0.0/8 -j DROP\n"
           "-I FORWARD 1 -j nova-provider\n-A nova-provider -s 10.0.0.300 -j DROP\nCOMMIT\n")
    with pytest.raises(exception.ProcessExecutionError) as info:
        fake(RESTORE, input=bad)
    assert "line 5 failed" in str(info.value)
    assert ">      5: -A nova-provider -s 10.0.0.300 -j DROP" in str(info.value)   # failing line quoted
    assert fake.save() == before
    assert fake.restores()[-1].returncode == 1


@pytest.mark.parametrize("line, reason", [
    ("-A nova-missing -j DROP", "does not exist"),
    ("-A FORWARD -j nova-missing", "does not exist"),
    ("-D FORWARD 2", "too big"),
    ("-I FORWARD 3 -j ACCEPT", "too big"),
    ("-D FORWARD -i eth9 -j ACCEPT", "matching rule"),
    ("-A FORWARD -s 2001:db8::1 -j DROP", "not an IPv4 address"),
    ("-A FORWARD -p icmpx -j DROP", "unknown protocol"),
    ("-A FORWARD -p icmp -m icmp6 --icmpv6-type 128 -j DROP", "needs IPv6"),
    ("-A FORWARD -p tcp -m tcp --dport 70000 -j DROP", "invalid port"),
    ("-A FORWARD -p tcp -m multiport --dports 20:10 -j DROP", "invalid port range"),
    ("-A FORWARD -p icmp -m icmp --icmp-type 300 -j DROP", "invalid ICMP type"),
    ("-A FORWARD --bogus 1 -j DROP", "unknown option"),
    ("-X FORWARD", "built-in"),
    ("-N " + "c" * 29, "invalid chain name"),
    ("-Q FORWARD", "unknown command"),
])
def test_bad_lines_are_refused(line, reason):
    fake = FakeIptables()
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    with pytest.raises(exception.ProcessExecutionError) as info:
        fake(RESTORE, input=f"*filter\n{line}\nCOMMIT\n")
    assert "line 2 failed" in str(info.value) and reason in str(info.value)
    assert fake.rules("FORWARD") == ["-A FORWARD -i eth0 -j ACCEPT"]


def test_long_comment_is_cut_as_iptables_nft_does():
    fake = FakeIptables()
    fake.run(4, "-A FORWARD -m comment --comment " + "x" * 300 + " -j DROP")
    assert fake.rules("FORWARD") == ['-A FORWARD -m comment --comment "' + "x" * 255 + '" -j DROP']


def test_missing_commit_applies_nothing():
    fake = FakeIptables()
    with pytest.raises(exception.ProcessExecutionError) as info:
        fake(RESTORE, input="*filter\n-A FORWARD -j DROP\n")
    assert "COMMIT expected" in str(info.value)
    assert fake.rules("FORWARD") == []


def test_chain_cannot_be_deleted_while_referenced_or_non_empty():
    fake = FakeIptables()
    fake(RESTORE, input="*filter\n:a - [0:0]\n-A a -j DROP\n-A FORWARD -j a\nCOMMIT\n")
    for text in ("*filter\n-X a\nCOMMIT\n", "*filter\n-D FORWARD 1\n-X a\nCOMMIT\n"):
        with pytest.raises(exception.ProcessExecutionError):
            fake(RESTORE, input=text)
    fake(RESTORE, input="*filter\n-D FORWARD 1\n:a - [0:0]\n-X a\nCOMMIT\n")
    assert not fake.has_chain("a")


def test_declaration_flushes_user_chain_under_noflush_but_not_builtins():
    fake = FakeIptables()
    fake(RESTORE, input="*filter\n:a - [0:0]\n-A a -j DROP\n-A FORWARD -j a\nCOMMIT\n")
    fake(RESTORE, input="*filter\n:FORWARD ACCEPT [0:0]\n:a - [0:0]\nCOMMIT\n")
    assert fake.rules("a") == []
    assert fake.rules("FORWARD") == ["-A FORWARD -j a"]


def test_without_noflush_the_whole_table_is_replaced():
    fake = FakeIptables()
    fake(RESTORE, input="*filter\n:a - [0:0]\n-A FORWARD -j a\nCOMMIT\n")
    fake(["iptables-restore"], input="*filter\n:b - [0:0]\nCOMMIT\n")
    assert not fake.has_chain("a") and fake.has_chain("b") and fake.rules("FORWARD") == []


def test_rules_are_saved_in_iptables_save_spelling():
    fake = FakeIptables()
    fake(RESTORE, input="*filter\n-A FORWARD -s 10.1.2.3/8 -p tcp --dport 22 -m comment --comment provfw:x -j DROP\n"
                        "COMMIT\n")
    assert fake.rules("FORWARD") == ['-A FORWARD -s 10.0.0.0/8 -p tcp -m tcp --dport 22 '
                                     '-m comment --comment "provfw:x" -j DROP']
    # Deleting by rulespec works with either spelling.
    fake.run(4, "-D FORWARD -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -m comment --comment provfw:x -j DROP")
    assert fake.rules("FORWARD") == []


def test_families_and_flavours_are_separate():
    fake = FakeIptables()
    fake(["ip6tables-restore", "--noflush"], input="*filter\n-A FORWARD -s 2001:db8::/32 -j DROP\nCOMMIT\n")
    fake(["iptables-legacy-restore", "--noflush"], input="*filter\n-A FORWARD -s 10.0.0.0/8 -j DROP\nCOMMIT\n")
    assert fake.rules("FORWARD", version=6) == ["-A FORWARD -s 2001:db8::/32 -j DROP"]
    assert fake.rules("FORWARD", version=4) == []
    assert fake.rules("FORWARD", version=4, flavour="legacy") == ["-A FORWARD -s 10.0.0.0/8 -j DROP"]
    assert "10.0.0.0/8" in fake(["iptables-legacy-save", "-t", "filter"])


def test_injected_failure_changes_nothing_and_is_one_shot():
    fake = FakeIptables()
    fake.fail_next_restore("xtables lock")
    with pytest.raises(exception.ProcessExecutionError) as info:
        fake(RESTORE, input="*filter\n-A FORWARD -j DROP\nCOMMIT\n")
    assert "xtables lock" in str(info.value)
    assert fake.rules("FORWARD") == []
    fake(RESTORE, input="*filter\n-A FORWARD -j DROP\nCOMMIT\n")
    assert fake.rules("FORWARD") == ["-A FORWARD -j DROP"]


def test_unknown_tools_are_not_silently_accepted():
    with pytest.raises(exception.ProcessExecutionError) as info:
        FakeIptables()(["ipset", "list"])
    assert info.value.exit_code == 127
