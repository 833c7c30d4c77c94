"""Pure iptables functions: rule rendering, iptables-save parsing, and the restore transaction
(provfw.virt.firewall.iptables).

The restore tests apply what ``build_restore`` returns to ``FakeIptables``,
which interprets it the way iptables-restore --noflush does, and then look at
the resulting table: what matters is the state reached, not the exact text.
"""

from __future__ import annotations

import shlex

import pytest

from provfw import names
from provfw.rules import make_spec
from provfw.virt.firewall import iptables
from tests.lib.fake_iptables import FakeIptables

LAYOUT = iptables.ChainLayout()
JUMP = '-A FORWARD -m comment --comment "provfw:jump" -j nova-provider'


def match_part(spec) -> str:
    """The rendered rule without the chain, the comment and the target."""
    rule = iptables.render_drop_rule("nova-provider", spec)
    assert rule.startswith("-A nova-provider ")
    assert rule.endswith(f"-m comment --comment {iptables.rule_hash(spec)} -j DROP")
    return rule[len("-A nova-provider "):-len(f" -m comment --comment {iptables.rule_hash(spec)} -j DROP")]


RENDERED = [
    (("203.0.113.5", "tcp", 22), "-s 203.0.113.5/32 -p tcp -m tcp --dport 22"),
    (("203.0.113.0/24", "tcp", 1000, 2000), "-s 203.0.113.0/24 -p tcp -m multiport --dports 1000:2000"),
    (("203.0.113.0/24", "tcp"), "-s 203.0.113.0/24 -p tcp -m multiport --dports 1:65535"),
    (("203.0.113.0/24", "udp", 53), "-s 203.0.113.0/24 -p udp -m udp --dport 53"),
    (("203.0.113.0/24", "udp", 5000, 5100), "-s 203.0.113.0/24 -p udp -m multiport --dports 5000:5100"),
    (("203.0.113.0/24", "icmp"), "-s 203.0.113.0/24 -p icmp"),
    (("203.0.113.0/24", "icmp", 8), "-s 203.0.113.0/24 -p icmp -m icmp --icmp-type 8"),
    (("203.0.113.0/24", "icmp", 3, 1), "-s 203.0.113.0/24 -p icmp -m icmp --icmp-type 3/1"),
    (("203.0.113.0/24", "icmp", 0, 0), "-s 203.0.113.0/24 -p icmp -m icmp --icmp-type 0/0"),
    (("203.0.113.0/24", "all"), "-s 203.0.113.0/24"),
    (("2001:db8::/32", "tcp", 443), "-s 2001:db8::/32 -p tcp -m tcp --dport 443"),
    (("2001:db8::/32", "icmp"), "-s 2001:db8::/32 -p ipv6-icmp"),
    # The IPv6 ICMP type is honoured (Nova dropped it) and spelled for ip6tables.
    (("2001:db8::/32", "icmp", 128), "-s 2001:db8::/32 -p ipv6-icmp -m icmp6 --icmpv6-type 128"),
    (("2001:db8::/32", "icmp", 1, 4), "-s 2001:db8::/32 -p ipv6-icmp -m icmp6 --icmpv6-type 1/4"),
    (("2001:db8::1", "all"), "-s 2001:db8::1/128"),
]


@pytest.mark.parametrize("args, expected", RENDERED)
def test_drop_rule_rendering(args, expected):
    assert match_part(make_spec(*args)) == expected


@pytest.mark.parametrize("args, expected", RENDERED)
def test_rendered_rule_is_accepted_by_the_family_it_belongs_to(args, expected):
    spec = make_spec(*args)
    fake = FakeIptables()
    tool = "iptables-restore" if spec.version == 4 else "ip6tables-restore"
    fake([tool, "--noflush"], input=f"*filter\n:nova-provider - [0:0]\n"
         f"{iptables.render_drop_rule('nova-provider', spec)}\nCOMMIT\n")
    saved = fake.rules("nova-provider", version=spec.version)
    assert len(saved) == 1
    assert iptables.comment_of(saved[0]) == iptables.rule_hash(spec)


def test_every_spec_has_its_own_comment_and_it_is_stable():
    specs = [make_spec(*args) for args, _ in RENDERED]
    hashes = [iptables.rule_hash(s) for s in specs]
    assert len(set(hashes)) == len(hashes)
    assert all(h.startswith(names.COMMENT_PREFIX) for h in hashes)
    assert iptables.rule_hash(make_spec("203.0.113.5", "tcp", 22)) == iptables.rule_hash(
        make_spec("203.0.113.5/32", "TCP", "22", "22"))


def test_provider_chain_is_per_family_sorted_and_ends_with_the_jump_to_nova_local():
    specs = [make_spec("203.0.113.9"), make_spec("2001:db8::/32", "icmp", 128), make_spec("198.51.100.0/24", "udp")]
    v4 = iptables.desired_provider_rules(specs, 4, LAYOUT)
    v6 = iptables.desired_provider_rules(list(reversed(specs)), 6, LAYOUT)
    assert [iptables.comment_of(line) for line in v4[:-1]] == [
        iptables.rule_hash(make_spec("198.51.100.0/24", "udp")), iptables.rule_hash(make_spec("203.0.113.9"))]
    assert len(v6) == 2 and "ipv6-icmp" in v6[0]
    for lines in (v4, v6):
        assert lines[-1].endswith("-j nova-local")
        assert iptables.comment_of(lines[-1]) == iptables.tail_comment(LAYOUT)
    assert iptables.desired_provider_rules(specs, 4, LAYOUT) == iptables.desired_provider_rules(
        list(reversed(specs)), 4, LAYOUT)


def test_empty_rule_set_still_continues_to_nova_local():
    assert iptables.desired_provider_rules([], 4, LAYOUT) == [
        f"-A nova-provider -m comment --comment {iptables.tail_comment(LAYOUT)} -j nova-local"]


@pytest.mark.parametrize("name", ["x" * 29, "", "has space"])
def test_chain_names_over_the_kernel_limit_fail_at_start(name):
    with pytest.raises(Exception) as info:
        iptables.ChainLayout(provider=name)
    assert "chain name" in str(info.value)


# --------------------------------------------------------------------------- parse_save

SAVE_OUTPUT = """# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:nova-provider - [0:0]
-A nova-provider -j RETURN
COMMIT
*filter
:INPUT ACCEPT [10:600]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:nova-local - [0:0]
:nova-provider - [0:0]
-A FORWARD -m comment --comment "provfw:jump" -j nova-provider
-A FORWARD -i eth0 -j ACCEPT
-A nova-local -s 10.9.0.0/16 -j ACCEPT
-A nova-provider -s 203.0.113.5/32 -m comment --comment "provfw:e831a3455e29d433" -j DROP
-A nova-provider -m comment --comment provfw:unquoted -j nova-local
COMMIT
# Completed
"""


def test_parse_save_reads_only_the_filter_table():
    state = iptables.parse_save(SAVE_OUTPUT)
    assert state.chains == {"INPUT", "FORWARD", "OUTPUT", "nova-local", "nova-provider"}
    assert state.comments("nova-provider") == ["provfw:e831a3455e29d433", "provfw:unquoted"]
    assert state.comments("FORWARD") == ["provfw:jump", ""]
    assert state.rules["nova-local"] == ["-A nova-local -s 10.9.0.0/16 -j ACCEPT"]
    assert state.comments("absent") == []


def test_parse_save_of_nothing_is_an_empty_table():
    state = iptables.parse_save("")
    assert state.chains == set() and state.rules == {}


# --------------------------------------------------------------------------- build_restore against the fake

SPECS = [make_spec("203.0.113.5"), make_spec("198.51.100.0/24", "tcp", 8080), make_spec("192.0.2.0/24", "icmp", 8)]


def apply(fake: FakeIptables, specs, version: int = 4) -> str | None:
    """One driver-style apply: read the kernel, build the transaction, write it if any."""
    tool = "iptables" if version == 4 else "ip6tables"
    state = iptables.parse_save(fake([f"{tool}-save", "-t", "filter"]))
    restore = iptables.build_restore(state, iptables.desired_provider_rules(specs, version, LAYOUT), LAYOUT)
    if restore is not None:
        fake([f"{tool}-restore", "--noflush", "--wait", "10"], input=restore)
    return restore


def provider_comments(fake: FakeIptables, version: int = 4) -> list[str]:
    return [iptables.comment_of(r) for r in fake.rules("nova-provider", version)]


def expected_comments(specs, version: int = 4) -> list[str]:
    return [iptables.comment_of(line) for line in iptables.desired_provider_rules(specs, version, LAYOUT)]


def test_first_apply_creates_chains_rules_and_the_jump_in_one_transaction():
    fake = FakeIptables()
    text = apply(fake, SPECS)
    assert text is not None and text.count("COMMIT") == 1
    assert len(fake.restores()) == 1
    assert provider_comments(fake) == expected_comments(SPECS)
    assert fake.rules("FORWARD") == [JUMP]
    assert fake.has_chain("nova-local") and fake.rules("nova-local") == []


def test_second_apply_with_no_change_writes_nothing():
    fake = FakeIptables()
    apply(fake, SPECS)
    assert apply(fake, list(reversed(SPECS))) is None
    assert len(fake.restores()) == 1


def test_a_changed_rule_set_rewrites_the_provider_chain_only():
    fake = FakeIptables()
    apply(fake, SPECS)
    text = apply(fake, SPECS[:2])
    assert ":nova-provider - [0:0]" in text
    assert ":nova-local" not in text and "FORWARD" not in text
    assert provider_comments(fake) == expected_comments(SPECS[:2])
    assert fake.rules("FORWARD") == [JUMP]


def test_rules_unchanged_but_chain_reordered_by_someone_is_rewritten():
    fake = FakeIptables()
    apply(fake, SPECS)
    first = fake.rules("nova-provider")[0]
    fake.run(4, "-D nova-provider 1")
    fake.run(4, "-I nova-provider 2 " + first[len("-A nova-provider "):])
    assert provider_comments(fake) != expected_comments(SPECS)
    assert apply(fake, SPECS) is not None
    assert provider_comments(fake) == expected_comments(SPECS)


def test_deleted_jump_is_restored_without_touching_the_provider_chain():
    fake = FakeIptables()
    apply(fake, SPECS)
    fake.run(4, "-D FORWARD 1")
    text = apply(fake, SPECS)
    assert text is not None and ":nova-provider" not in text
    assert fake.rules("FORWARD") == [JUMP]
    assert provider_comments(fake) == expected_comments(SPECS)


def test_jump_moved_behind_another_rule_is_put_back_first():
    fake = FakeIptables()
    apply(fake, SPECS)
    fake.run(4, "-I FORWARD 1 -i eth0 -j ACCEPT")
    assert fake.rules("FORWARD") == ["-A FORWARD -i eth0 -j ACCEPT", JUMP]
    apply(fake, SPECS)
    assert fake.rules("FORWARD") == [JUMP, "-A FORWARD -i eth0 -j ACCEPT"]


@pytest.mark.parametrize("extra", [
    "-A FORWARD -m comment --comment provfw:jump -j nova-provider",   # a second copy of ours, last
    "-I FORWARD 1 -j nova-provider",                                    # a bare jump someone added in front
    "-A FORWARD -o eth1 -j nova-provider",                              # a narrower jump to our chain
])
def test_duplicated_jump_ends_up_first_and_only(extra):
    fake = FakeIptables()
    apply(fake, SPECS)
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    fake.run(4, extra)
    apply(fake, SPECS)
    assert fake.rules("FORWARD") == [JUMP, "-A FORWARD -i eth0 -j ACCEPT"]
    assert apply(fake, SPECS) is None


def test_foreign_forward_rules_are_kept_in_order():
    fake = FakeIptables()
    for line in ("-A FORWARD -i eth0 -j ACCEPT", "-A FORWARD -o eth0 -j DROP"):
        fake.run(4, line)
    apply(fake, SPECS)
    assert fake.rules("FORWARD") == [JUMP, "-A FORWARD -i eth0 -j ACCEPT", "-A FORWARD -o eth0 -j DROP"]


def test_nova_local_is_created_when_absent_and_then_never_declared():
    fake = FakeIptables()
    first = apply(fake, SPECS)
    assert ":nova-local - [0:0]" in first
    fake.run(4, "-A nova-local -s 10.9.0.0/16 -j ACCEPT")
    fake.run(4, "-F nova-provider")           # force a rewrite of the provider chain
    second = apply(fake, SPECS)
    assert second is not None and ":nova-local" not in second
    assert fake.rules("nova-local") == ["-A nova-local -s 10.9.0.0/16 -j ACCEPT"]


def test_existing_nova_local_with_contents_is_untouched_from_the_first_apply():
    fake = FakeIptables()
    fake.run(4, "-N nova-local")
    fake.run(4, "-A nova-local -p tcp -m tcp --dport 22 -j ACCEPT")
    fake.run(4, "-A nova-local -j DROP")
    before = fake.rules("nova-local")
    for specs in (SPECS, SPECS[:1], [], SPECS):
        text = apply(fake, specs)
        assert text is None or ":nova-local" not in text
        assert fake.rules("nova-local") == before


def test_declaring_an_existing_chain_under_noflush_would_flush_it():
    # Why build_restore never declares nova-local: the fake (like iptables-restore) flushes it.
    fake = FakeIptables()
    fake.run(4, "-N nova-local")
    fake.run(4, "-A nova-local -j DROP")
    fake(["iptables-restore", "--noflush"], input="*filter\n:nova-local - [0:0]\nCOMMIT\n")
    assert fake.rules("nova-local") == []


def test_ipv6_is_applied_to_its_own_table():
    specs = SPECS + [make_spec("2001:db8::/32", "icmp", 128)]
    fake = FakeIptables()
    apply(fake, specs, 4)
    apply(fake, specs, 6)
    assert provider_comments(fake, 6) == expected_comments(specs, 6)
    assert len(provider_comments(fake, 6)) == 2 and len(provider_comments(fake, 4)) == 4
    assert apply(fake, specs, 6) is None


def test_restore_text_is_valid_shell_quoting_for_every_rule():
    text = apply(FakeIptables(), SPECS + [make_spec("10.0.0.0/8", "all")])
    for line in text.splitlines():
        shlex.split(line)


def test_removal_takes_out_jump_and_chain_but_leaves_nova_local():
    fake = FakeIptables()
    fake.run(4, "-A FORWARD -i eth0 -j ACCEPT")
    apply(fake, SPECS)
    fake.run(4, "-A nova-local -j ACCEPT")
    removal = iptables.build_removal(iptables.parse_save(fake(["iptables-save"])), LAYOUT)
    fake(["iptables-restore", "--noflush"], input=removal)
    assert fake.rules("FORWARD") == ["-A FORWARD -i eth0 -j ACCEPT"]
    assert not fake.has_chain("nova-provider")
    assert fake.rules("nova-local") == ["-A nova-local -j ACCEPT"]
    assert iptables.build_removal(iptables.parse_save(fake(["iptables-save"])), LAYOUT) is None


def test_count_drop_rules_ignores_the_tail_and_foreign_rules():
    fake = FakeIptables()
    apply(fake, SPECS)
    fake.run(4, "-A nova-provider -s 10.0.0.1 -j DROP")
    assert iptables.count_drop_rules(iptables.parse_save(fake(["iptables-save"])), LAYOUT) == 3


def test_custom_chain_names_are_used_everywhere():
    layout = iptables.ChainLayout("pfw-prov", "pfw-local", "FORWARD")
    fake = FakeIptables()
    restore = iptables.build_restore(iptables.parse_save(fake(["iptables-save"])),
                                     iptables.desired_provider_rules(SPECS, 4, layout), layout)
    fake(["iptables-restore", "--noflush"], input=restore)
    assert len(fake.rules("pfw-prov")) == 4 and fake.has_chain("pfw-local")
    assert not fake.has_chain("nova-provider")
    assert fake.rules("FORWARD") == ['-A FORWARD -m comment --comment "provfw:jump" -j pfw-prov']
