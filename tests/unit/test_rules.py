"""Rule values: CIDR normalisation, rule validation and protected networks (provfw.rules)."""

from __future__ import annotations

import datetime
import ipaddress

import pytest

from provfw import exception, rules
from provfw.rules import ANY, RuleSpec, make_spec, normalise_cidr

# --------------------------------------------------------------------------- CIDR normalisation

CANONICAL_CIDRS = [
    # (input, canonical form)
    ("203.0.113.5", "203.0.113.5/32"),                       # bare IPv4 address -> /32
    ("192.168.100.11/24", "192.168.100.0/24"),               # host bits cleared
    ("10.1.2.3/8", "10.0.0.0/8"),
    ("198.51.100.0/24", "198.51.100.0/24"),                  # already canonical
    ("  198.51.100.7/32\n", "198.51.100.7/32"),              # surrounding whitespace ignored
    ("2001:db8::1", "2001:db8::1/128"),                      # bare IPv6 address -> /128
    ("2001:DB8:0000:0000::/32", "2001:db8::/32"),            # compressed and lower-cased
    ("2001:0db8:0:0:0:0:0:1/64", "2001:db8::/64"),           # host bits cleared in IPv6 too
    ("FD00:18:1::3/128", "fd00:18:1::3/128"),
    ("1.2.3.4/1", "0.0.0.0/1"),                              # shortest prefix allowed
]


@pytest.mark.parametrize("given, expected", CANONICAL_CIDRS)
def test_cidr_is_normalised_to_one_canonical_string(given, expected):
    assert normalise_cidr(given) == expected


@pytest.mark.parametrize("left, right", [
    ("192.168.100.11/24", "192.168.100.200/24"),
    ("2001:db8::/32", "2001:0DB8::0/32"),
    ("10.0.0.1", "10.0.0.1/32"),
])
def test_two_spellings_of_one_network_give_equal_specs(left, right):
    assert make_spec(left, "tcp", 22) == make_spec(right, "tcp", 22)


REFUSED_CIDRS = [
    # (input, fragment the message must contain)
    ("0.0.0.0/0", "prefix length 0"),
    ("1.2.3.4/0", "prefix length 0"),
    ("::/0", "prefix length 0"),
    ("not-an-ip", "not a valid"),
    ("10.0.0.0/33", "not a valid"),
    ("10.0.0.256", "not a valid"),
    ("010.0.0.1", "not a valid"),                            # leading zeros are ambiguous (octal?)
    ("2001:db8::/129", "not a valid"),
    ("10.0.0.0/8/8", "not a valid"),
    ("::ffff:192.0.2.1", "IPv4-mapped"),                     # use the IPv4 form instead
    ("::ffff:192.0.2.0/120", "IPv4-mapped"),
    ("", "non-empty string"),
    ("   ", "non-empty string"),
    (None, "non-empty string"),
    (167772161, "non-empty string"),                         # an int is not an address here
    (["10.0.0.0/8"], "non-empty string"),
    # Only a plain network: ipaddress accepts these, the kernel tools (or our canonical form) do not.
    ("fe80::1%eth0", "no scope id"),                         # the scope id survived into the stored CIDR
    ("fe80::1%eth0/64", "no scope id"),
    ("192.0.2.0/255.255.255.0", "no netmask"),               # netmask and hostmask forms
    ("192.0.2.0/0.0.0.255", "no netmask"),
    ("192.0.2.0/024", "not a valid"),                        # zero-padded prefix
    ("::/0128", "not a valid"),                              # ipaddress reads this as ::/128
    ("١٩٢.0.2.1", "not a valid"),                            # Unicode digits
    ("192.0.2.1/٢٤", "not a valid"),
    ("192.0.2.1 /24", "not a valid"),
    ("f" * 50, "not a valid"),                               # longer than any address
]


@pytest.mark.parametrize("given, fragment", REFUSED_CIDRS)
def test_bad_cidr_is_refused_with_the_field_named(given, fragment):
    with pytest.raises(exception.InvalidInput) as info:
        normalise_cidr(given)
    assert info.value.field == "cidr"
    assert info.value.code == 400
    assert str(info.value).startswith("cidr: ")
    assert fragment in str(info.value)


def test_cidr_error_names_the_field_the_caller_asked_for():
    with pytest.raises(exception.InvalidInput) as info:
        normalise_cidr("garbage", field="protected_cidrs")
    assert info.value.field == "protected_cidrs"


def test_spec_knows_its_family_and_network():
    spec4 = make_spec("192.168.100.11/24")
    spec6 = make_spec("2001:db8::5")
    assert (spec4.version, spec6.version) == (4, 6)
    assert spec4.network == ipaddress.ip_network("192.168.100.0/24")
    assert spec6.network == ipaddress.ip_network("2001:db8::5/128")


# --------------------------------------------------------------------------- rule validation

VALID_RULES = [
    # (cidr, protocol, from_port, to_port) -> RuleSpec fields
    (("10.0.0.0/8", "tcp", 22, None), ("10.0.0.0/8", "tcp", 22, 22)),          # single port
    (("10.0.0.0/8", "tcp", 1000, 2000), ("10.0.0.0/8", "tcp", 1000, 2000)),
    (("10.0.0.0/8", "tcp", None, None), ("10.0.0.0/8", "tcp", 1, 65535)),      # no ports: every port
    (("10.0.0.0/8", "udp", 53, 53), ("10.0.0.0/8", "udp", 53, 53)),
    (("10.0.0.0/8", "udp", "1", "65535"), ("10.0.0.0/8", "udp", 1, 65535)),    # numeric strings accepted
    (("10.0.0.0/8", " TCP ", 80, None), ("10.0.0.0/8", "tcp", 80, 80)),        # protocol case-folded
    (("10.0.0.0/8", "icmp", None, None), ("10.0.0.0/8", "icmp", ANY, ANY)),   # any ICMP
    (("10.0.0.0/8", "icmp", 8, None), ("10.0.0.0/8", "icmp", 8, ANY)),        # echo request, any code
    (("10.0.0.0/8", "icmp", 3, 1), ("10.0.0.0/8", "icmp", 3, 1)),             # type 3 code 1
    (("10.0.0.0/8", "icmp", 0, 0), ("10.0.0.0/8", "icmp", 0, 0)),             # type 0 is a real type
    (("10.0.0.0/8", "icmp", -1, -1), ("10.0.0.0/8", "icmp", ANY, ANY)),
    (("10.0.0.0/8", "icmp", 254, 255), ("10.0.0.0/8", "icmp", 254, 255)),     # the highest type and code
    (("2001:db8::/32", "icmp", 0, 255), ("2001:db8::/32", "icmp", 0, 255)),
    (("2001:db8::/32", "icmp", 128, None), ("2001:db8::/32", "icmp", 128, ANY)),  # ICMPv6 echo request
    (("10.0.0.0/8", "all", None, None), ("10.0.0.0/8", "all", ANY, ANY)),
    (("10.0.0.0/8", "all", -1, -1), ("10.0.0.0/8", "all", ANY, ANY)),
    (("10.0.0.0/8", None, None, None), ("10.0.0.0/8", "all", ANY, ANY)),       # protocol defaults to all
]


@pytest.mark.parametrize("args, expected", VALID_RULES)
def test_valid_rule_is_normalised(args, expected):
    assert make_spec(*args) == RuleSpec(*expected)


INVALID_RULES = [
    # (cidr, protocol, from_port, to_port), field named, fragment
    (("10.0.0.0/8", "tcp", 0, None), "from_port", "out of range 1-65535"),
    (("10.0.0.0/8", "tcp", 65536, None), "from_port", "out of range"),
    (("10.0.0.0/8", "tcp", 22, 65536), "to_port", "out of range"),
    (("10.0.0.0/8", "udp", -1, -1), "from_port", "out of range"),             # -1 means nothing for ports
    (("10.0.0.0/8", "tcp", "-5", None), "from_port", "out of range"),
    (("10.0.0.0/8", "tcp", 2000, 1000), "from_port", "greater than to_port"),
    (("10.0.0.0/8", "tcp", None, 80), "from_port", "required"),
    (("10.0.0.0/8", "tcp", "http", None), "from_port", "must be an integer"),
    (("10.0.0.0/8", "tcp", 22.5, None), "from_port", "must be an integer"),
    (("10.0.0.0/8", "tcp", True, None), "from_port", "must be an integer"),   # bool is not a port
    (("10.0.0.0/8", "tcp", 22, False), "to_port", "must be an integer"),
    (("10.0.0.0/8", "icmp", True, None), "from_port", "must be an integer"),
    (("10.0.0.0/8", "sctp", None, None), "protocol", "not one of"),
    (("10.0.0.0/8", "ipv6-icmp", None, None), "protocol", "not one of"),
    (("10.0.0.0/8", "", None, None), "protocol", "not one of"),
    (("10.0.0.0/8", 6, None, None), "protocol", "not one of"),
    (("10.0.0.0/8", "icmp", 256, None), "from_port", "out of range 0-254"),
    # iptables reads ICMP type 255 as "any type": refused rather than enforced as something else.
    (("10.0.0.0/8", "icmp", 255, None), "from_port", "iptables matches it as any type"),
    (("2001:db8::/32", "icmp", 255, 0), "from_port", "reserved"),
    (("10.0.0.0/8", "icmp", -2, None), "from_port", "out of range"),
    (("10.0.0.0/8", "icmp", 3, 256), "to_port", "out of range 0-255"),
    (("10.0.0.0/8", "icmp", None, 1), "to_port", "needs an ICMP type"),       # code without a type
    (("10.0.0.0/8", "icmp", -1, 0), "to_port", "needs an ICMP type"),
    (("10.0.0.0/8", "all", 22, None), "from_port", "omitted"),                # 'all' with ports
    (("10.0.0.0/8", "all", None, 80), "to_port", "omitted"),
    (("10.0.0.0/8", "all", 1, 65535), "from_port", "omitted"),
    (("0.0.0.0/0", "tcp", 22, None), "cidr", "prefix length 0"),              # cidr checked first
]


@pytest.mark.parametrize("args, field, fragment", INVALID_RULES)
def test_invalid_rule_is_refused_naming_the_field(args, field, fragment):
    with pytest.raises(exception.InvalidInput) as info:
        make_spec(*args)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)
    assert info.value.code == 400


@pytest.mark.parametrize("body, field", [
    ({}, "cidr"),
    ({"protocol": "tcp"}, "cidr"),
    ({"cidr": "10.0.0.0/8", "protocol": "tcp", "from_port": "x"}, "from_port"),
    (["10.0.0.0/8"], "body"),
    ("10.0.0.0/8", "body"),
])
def test_spec_from_body_names_the_bad_field(body, field):
    with pytest.raises(exception.InvalidInput) as info:
        rules.spec_from_body(body)
    assert info.value.field == field


def test_spec_from_body_defaults_to_all_protocols():
    assert rules.spec_from_body({"cidr": "203.0.113.9"}) == RuleSpec("203.0.113.9/32", "all", ANY, ANY)


@pytest.mark.parametrize("value, ok", [(None, True), ("spam source", True), ("x" * 255, True), ("😀" * 255, True),
                                       ("x" * 256, False), (42, False), ("a\x00b", False), ("two\nlines", False),
                                       ("\x1b[2J", False), ("\x9b31m", False), ("tab\there", False)])
def test_description_is_an_optional_short_string(value, ok):
    if ok:
        assert rules.validate_description(value) == value
    else:
        with pytest.raises(exception.InvalidInput) as info:
            rules.validate_description(value)
        assert info.value.field == "description"


def test_external_block_is_tcp_udp_and_icmp_over_every_port():
    assert rules.external_block_specs("198.51.100.7") == [
        RuleSpec("198.51.100.7/32", "tcp", 1, 65535),
        RuleSpec("198.51.100.7/32", "udp", 1, 65535),
        RuleSpec("198.51.100.7/32", "icmp", ANY, ANY),
    ]


def test_specs_sort_and_hash_by_value():
    a, b = make_spec("10.0.0.0/8", "tcp", 22), make_spec("10.0.0.0/8", "tcp", 22)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.cidr = "10.0.0.1/32"  # frozen: a spec used as a dict key must never change


# --------------------------------------------------------------------------- protected networks

PROTECTED = rules.parse_protected_networks(["127.0.0.0/8", "::1/128", "10.20.0.0/16", "fd00:aa::/48"])


@pytest.mark.parametrize("cidr, hit", [
    ("127.0.0.1/32", "127.0.0.0/8"),            # inside
    ("10.20.30.0/24", "10.20.0.0/16"),          # inside
    ("10.0.0.0/8", "10.20.0.0/16"),             # a superset overlaps too
    ("::1/128", "::1/128"),
    ("::/1", "::1/128"),                        # IPv6 superset
    ("fd00:aa:0:1::/64", "fd00:aa::/48"),
    ("10.21.0.0/16", None),                     # adjacent, no overlap
    ("128.0.0.0/1", None),
    ("2001:db8::/32", None),
])
def test_protected_overlap(cidr, hit):
    found = rules.protected_overlap(normalise_cidr(cidr), PROTECTED)
    assert (str(found) if found else None) == hit


def test_families_never_overlap_each_other():
    # ::/1 contains ::a14:0 (the bits of 10.20.0.0) but an IPv6 rule cannot match IPv4 traffic.
    assert rules.protected_overlap("::/1", rules.parse_protected_networks(["10.20.0.0/16"])) is None


def test_rule_overlapping_a_protected_network_is_refused_with_409():
    with pytest.raises(exception.ProtectedNetwork) as info:
        rules.check_not_protected(make_spec("10.20.5.5"), PROTECTED)
    assert info.value.code == 409
    assert "10.20.0.0/16" in str(info.value) and info.value.protected == "10.20.0.0/16"
    rules.check_not_protected(make_spec("203.0.113.0/24"), PROTECTED)  # unprotected: no error


def test_bad_protected_network_config_fails_loudly():
    with pytest.raises(exception.ConfigError) as info:
        rules.parse_protected_networks(["10.0.0.0/8", "mgmt-net"])
    assert "mgmt-net" in str(info.value)


# --------------------------------------------------------------------------- expiry

NOW = datetime.datetime(2026, 6, 1, 12, 0, 0)


@pytest.mark.parametrize("text, expected", [
    ("2026-12-01T00:00:00Z", datetime.datetime(2026, 12, 1)),
    ("2026-12-01t00:00:00z", datetime.datetime(2026, 12, 1)),
    ("2026-12-01T02:30:00+02:30", datetime.datetime(2026, 12, 1)),
    ("2026-11-30T19:00:00-05:00", datetime.datetime(2026, 12, 1)),
    ("2026-12-01T00:00:00.5Z", datetime.datetime(2026, 12, 1, 0, 0, 0, 500000)),
    ("2026-12-01T00:00:00.123456789Z", datetime.datetime(2026, 12, 1, 0, 0, 0, 123456)),   # truncated to us
])
def test_an_rfc3339_time_in_any_offset_becomes_naive_utc(text, expected):
    assert rules.parse_timestamp(text) == expected


@pytest.mark.parametrize("text", [
    "2026-12-01T00:00:00",            # no offset: a different instant on every machine
    "2026-12-01 00:00:00Z",           # RFC 3339 ABNF needs the T
    "2026-12-01",
    "20261201T000000Z",               # ISO 8601 basic format, not RFC 3339
    "2026-12-01T00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "2026-12-01T00:00:60Z",           # leap second: not representable
    "2026-12-01T00:00:00+24:00",
    "0001-01-01T00:00:00+14:00",      # before year 1 in UTC (OverflowError inside)
    "9999-12-31T23:59:59-14:00",      # after year 9999 in UTC
    "٢٠٢٦-12-01T00:00:00Z",
    "2026-12-01T00:00:00Z\n",
    42,
])
def test_anything_but_an_rfc3339_time_with_an_offset_is_refused_naming_the_field(text):
    with pytest.raises(exception.InvalidInput) as info:
        rules.parse_timestamp(text)
    assert info.value.field == "expires_at"


def test_expiry_is_ttl_or_expires_at_ahead_and_within_ten_years():
    assert rules.expiry(now=NOW) is None
    assert rules.expiry(ttl=60, now=NOW) == NOW + datetime.timedelta(seconds=60)
    assert rules.expiry(ttl=60.0, now=NOW) == NOW + datetime.timedelta(seconds=60)
    assert rules.expiry(expires_at="2026-06-01T12:00:01Z", now=NOW) == NOW + datetime.timedelta(seconds=1)
    assert rules.expiry(ttl=rules.MAX_LIFETIME, now=NOW) == NOW + datetime.timedelta(seconds=rules.MAX_LIFETIME)
    far = (NOW + datetime.timedelta(seconds=rules.MAX_LIFETIME + 1)).isoformat() + "Z"
    for kwargs, field, fragment in [
        ({"ttl": 0}, "ttl", "between 1 and"),
        ({"ttl": rules.MAX_LIFETIME + 1}, "ttl", "between 1 and"),
        ({"ttl": 1.5}, "ttl", "integer"),
        ({"ttl": True}, "ttl", "integer"),
        ({"expires_at": "2026-06-01T12:00:00Z"}, "expires_at", "in the past"),
        ({"expires_at": far}, "expires_at", "ten years"),
        ({"expires_at": "9999-12-31T23:59:59Z"}, "expires_at", "ten years"),
        ({"ttl": 60, "expires_at": "2027-01-01T00:00:00Z"}, "ttl", "not both"),
    ]:
        with pytest.raises(exception.InvalidInput) as info:
            rules.expiry(now=NOW, **kwargs)
        assert info.value.field == field and fragment in str(info.value), kwargs


# --------------------------------------------------------------------------- merge_changes (group commit)

def _rule(rule_id: int, cidr: str, expires_at: float | None = None) -> rules.Rule:
    return rules.Rule(rule_id, make_spec(cidr), expires_at)


def test_merged_change_keeps_every_addition_and_removal_of_its_mutations():
    one = rules.Changes(4, 5, [_rule(10, "192.0.2.1")], [])
    two = rules.Changes(4, 5, [_rule(11, "192.0.2.2")], [_rule(3, "198.51.100.0/24")])
    merged = rules.merge_changes([one, two])
    assert (merged.since, merged.generation) == (4, 5)
    assert [r.id for r in merged.added] == [10, 11] and [r.id for r in merged.removed] == [3]


def test_a_rule_created_and_removed_in_one_group_is_only_removed():
    merged = rules.merge_changes([rules.Changes(4, 5, [_rule(10, "192.0.2.1")], []),
                                  rules.Changes(4, 5, [], [_rule(10, "192.0.2.1")])])
    assert merged.added == [] and [r.id for r in merged.removed] == [10]


def test_the_last_addition_of_a_rule_wins():
    merged = rules.merge_changes([rules.Changes(4, 5, [_rule(10, "192.0.2.1", 100.0)], []),
                                  rules.Changes(4, 5, [_rule(10, "192.0.2.1", 900.0)], [])])
    assert [(r.id, r.expires_at) for r in merged.added] == [(10, 900.0)]


def test_a_single_change_is_its_own_merge_and_mixed_generations_are_refused():
    one = rules.Changes(4, 5, [_rule(10, "192.0.2.1")], [])
    assert rules.merge_changes([one]) is one
    with pytest.raises(ValueError):
        rules.merge_changes([one, rules.Changes(5, 6, [], [])])
    with pytest.raises(ValueError):
        rules.merge_changes([])


def test_wire_rules_decode_in_bulk_as_the_per_rule_form_does():
    wire = [[7, "192.0.2.0/24", "tcp", 22, 22, None], (8, "2001:db8::1/128", "all", -1, -1, 1700000000),
            [9, "198.51.100.7/32", "icmp", 8, -1, 1700000000.5]]
    decoded = rules.rules_from_wire(wire)
    assert decoded == [rules.Rule.from_wire(item) for item in wire]
    expected = [list(item[:5]) + [None if item[5] is None else float(item[5])] for item in wire]
    assert [rule.to_wire() for rule in decoded] == expected
    first = decoded[0]
    assert (first.id, first.spec, first.expires_at) == (7, RuleSpec("192.0.2.0/24", "tcp", 22, 22), None)
    assert type(decoded[1].expires_at) is float and type(first.spec) is RuleSpec
    assert {first: 1}[rules.Rule(7, make_spec("192.0.2.0/24", "tcp", 22, 22))] == 1     # hashable by value


@pytest.mark.parametrize("item", [
    [1, "192.0.2.1/32", "tcp", 22, 22],                   # five fields
    [1, "192.0.2.1/32", "tcp", 22, 22, None, None],       # seven
    {"id": 1},                                            # not a list
    "1,192.0.2.1/32,tcp,22,22,",
    ["1", "192.0.2.1/32", "tcp", 22, 22, None],           # id as text
    [1, "192.0.2.1/32", "tcp", True, 22, None],           # a JSON true is not a port
    [1, "192.0.2.1/32", "tcp", 22.0, 22, None],
    [1, None, "tcp", 22, 22, None],
    [1, "192.0.2.1/32", "tcp", 22, 22, "soon"],
    [1, "192.0.2.1/32", "tcp", 22, 22, False],
])
def test_a_malformed_wire_rule_is_refused_by_both_decoders(item):
    with pytest.raises(ValueError):
        rules.rules_from_wire([[2, "192.0.2.2/32", "all", -1, -1, None], item])
    with pytest.raises(ValueError):
        rules.Rule.from_wire(item)
