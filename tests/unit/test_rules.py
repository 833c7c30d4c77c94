"""Rule values: CIDR normalisation, rule validation and protected networks (provfw.rules)."""

from __future__ import annotations

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
    (("10.0.0.0/8", "icmp", 255, 255), ("10.0.0.0/8", "icmp", 255, 255)),
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
    (("10.0.0.0/8", "icmp", 256, None), "from_port", "out of range 0-255"),
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


@pytest.mark.parametrize("value, ok", [(None, True), ("spam source", True), ("x" * 255, True),
                                       ("x" * 256, False), (42, False)])
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
