"""From parsed entries to rule specs (provfw.feeds.importer): the policy half of an import.

``build_from_entries`` reads IPv4 networks on a fast path (bounds and text from integers); these tests hold it
to the one-rule checks (``importer.check_one``, ``rules.cidr_text``) for any network, protected or not.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from provfw import exception, rules
from provfw.feeds import formats, importer

# 203.0.113.0/24 lies in a /8 no non-global range touches: only the protected check can refuse it.
PROTECTED = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("203.0.113.0/24"),
             ipaddress.ip_network("2001:db8:1::/48")]


def networks():
    v4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 32)).map(
        lambda t: ipaddress.IPv4Network(t, strict=False))
    v6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(1, 128)).map(
        lambda t: ipaddress.IPv6Network(t, strict=False))
    interesting = st.sampled_from([item.network for item in rules.NON_GLOBAL_RANGES] + PROTECTED
                                  + [ipaddress.ip_network("192.0.0.0/16"), ipaddress.ip_network("8.8.8.8/32")])
    return st.one_of(v4, v6, interesting)


@settings(max_examples=400, deadline=None)
@given(network=networks(), allow=st.booleans(), compact=st.booleans())
@example(network=ipaddress.ip_network("10.0.0.0/8"), allow=False, compact=True)
@example(network=ipaddress.ip_network("192.0.2.128/25"), allow=True, compact=True)
@example(network=ipaddress.ip_network("192.0.3.0/24"), allow=False, compact=True)
@example(network=ipaddress.ip_network("203.0.113.7/32"), allow=True, compact=True)
@example(network=ipaddress.ip_network("203.0.114.7/32"), allow=False, compact=True)
@example(network=ipaddress.ip_network("0.0.0.0/1"), allow=False, compact=False)
@example(network=ipaddress.ip_network("8.0.0.0/7"), allow=False, compact=True)
@example(network=ipaddress.ip_network("11.0.0.0/8"), allow=False, compact=True)
def test_an_entry_becomes_the_rule_or_the_refusal_a_single_rule_would(network, allow, compact):
    # Both forms an IPv4 entry arrives in: an IPv4Network, and a parsed list's compact integer (whose /8 is
    # checked once for every entry in it: _clear_first_octets).
    like = importer.template("tcp", 22, 22)
    value = formats.compact_v4(int(network.network_address), network.prefixlen) \
        if compact and network.version == 4 else network
    built = importer.build_from_entries([(7, value)], [], 0, like, PROTECTED, allow)
    spec = rules.RuleSpec(network.with_prefixlen, "tcp", 22, 22)
    try:
        hit = importer.check_one(spec, PROTECTED, allow)
    except (exception.ProtectedNetwork, exception.NonGlobalNetwork) as refusal:
        assert built.specs == [] and [r.line for r in built.refused] == [7]
        assert built.refused[0].value == network.with_prefixlen
        if isinstance(refusal, exception.ProtectedNetwork):
            assert built.refused[0].reason == refusal.message
        else:
            # The list's reason is the single rule's message without its "cidr: " field prefix.
            assert "cidr: " + built.refused[0].reason == refusal.message
        return
    assert built.specs == [spec] and built.refused == []
    assert built.non_global == ([(7, network.with_prefixlen, hit)] if hit else [])
    assert built.non_global_count == (1 if hit else 0)


@pytest.mark.parametrize("cidr, other, said", [
    ("10.0.0.0/8", "10.0.0.0/8", "is"), ("10.1.2.3/32", "10.0.0.0/8", "lies within"),
    ("0.0.0.0/1", "10.0.0.0/8", "contains"), ("2001:db8::/32", "2001:db8::/32", "is"),
    ("fe80::/9", "fe80::/10", "contains"), ("10.0.0.0/8", "fe80::/10", "overlaps")])
def test_a_refusal_says_how_the_network_meets_the_range(cidr, other, said):
    assert exception.relation(cidr, other) == said


def test_a_non_global_refusal_names_the_api_field_and_the_cli_flag():
    message = exception.NonGlobalNetwork("10.0.0.0/8", "10.0.0.0/8", "private network (RFC 1918)").message
    assert message == ("cidr: 10.0.0.0/8 is 10.0.0.0/8, private network (RFC 1918); blocking it needs "
                       "allow_non_global (provfw CLI: --allow-non-global)")


def test_the_same_network_twice_is_one_spec_and_the_list_order_is_kept():
    entries = [formats.Entry(1, ipaddress.ip_network("203.0.113.9/32")),
               formats.Entry(2, ipaddress.ip_network("198.51.100.0/24")),
               formats.Entry(3, ipaddress.ip_network("2001:db8:ff::/48")),
               formats.Entry(4, ipaddress.ip_network("203.0.113.9/32"))]
    built = importer.build_from_entries(entries, [], 0, importer.template(), [], False)
    assert [s.cidr for s in built.specs] == ["203.0.113.9/32", "198.51.100.0/24", "2001:db8:ff::/48"]
    assert built.entries == 4


@pytest.mark.parametrize("text", ["192.0.2.1\n", "10.1.2.3/8\n", "0.0.0.0/8\n"])
def test_parsed_lists_and_single_rules_agree_on_what_is_refused(text):
    parsed = formats.parse(text, "plain")
    built = importer.build_specs(parsed, importer.template(), PROTECTED, False)
    assert built.specs == [] and len(built.refused) == 1


def _list_lines():
    """Lines of a block list: bare IPv4 addresses and CIDRs (some with host bits set, some protected or
    non-global, some in /8s that are clear), other values, comments, junk."""
    octet = st.sampled_from([0, 1, 8, 10, 45, 77, 127, 169, 172, 192, 198, 203, 224, 255]) | st.integers(0, 255)
    address = st.tuples(octet, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)).map(
        lambda t: ".".join(map(str, t)))
    cidr = st.tuples(address, st.sampled_from(["", "/32", "/24", "/8", "/7", "/1", "/16"])).map("".join)
    other = st.sampled_from(["# comment", "", "2001:db8::/32", "198.51.100.1-198.51.100.9", "not an address",
                             "203.0.113.0/255.255.255.0", "01.2.3.4", "192.0.2.1/33"])
    return st.lists(st.one_of(cidr, cidr, cidr, other), max_size=40)


@settings(max_examples=300, deadline=None)
@given(lines=_list_lines(), allow=st.booleans(), counted=st.booleans())
def test_parsing_with_the_rule_template_builds_what_parsing_then_building_does(lines, allow, counted):
    # importer.parse_specs lets the parser hand over entries in clear /8s as rules (formats.Ready); the
    # answer must be the two steps' answer, refusals, order, counts and all.
    text = "\n".join(f"{line}\t{n}" if counted and line and line[0].isdigit() else line
                     for n, line in enumerate(lines))
    fmt = "ipsum" if counted else "plain"
    like = importer.template("udp", 53, 53)
    parsed, built = importer.parse_specs(text, fmt, None, like, PROTECTED, allow)
    two_steps = importer.build_specs(formats.parse(text, fmt), like, PROTECTED, allow)
    assert built == two_steps
    assert parsed.entries == formats.parse(text, fmt).entries
