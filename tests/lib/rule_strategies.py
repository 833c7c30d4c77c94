"""Hypothesis strategies for the rules the API accepts, and the API's own verdict on a request body.

Bodies of ``POST /v1/provider-fw-rules`` are drawn field by field from the
domains ``provfw.rules`` defines (the constants the API's JSON Schema
publishes), with weight on the edges: IPv6 in every spelling the grammar
admits (compressed, exploded, upper case, a dotted IPv4 tail, the
IPv4-compatible ``::a.b.c.d``), supernets down to /1, host bits set, bare
addresses, ports 1 and 65535, single ports and ranges, ICMP and ICMPv6 types
0 and 254 and codes 0 and 255, "any".  Each drawn body then goes through the
API's validation path - ``schemas.validate("RuleCreate", body)``, the check
the Router runs before any controller, then ``rules.spec_from_body`` with
the default protected networks, the controller's check - and only bodies it
accepts become rules (``api_spec`` returns None for the rest, which a test
discards with ``assume``).  So the rules a test gets are exactly rules the
API would have stored, and their specs are what the API would have stored.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import assume, strategies as st

from provfw import conf as provfw_conf
from provfw import exception, rules
from provfw.api import schemas
from provfw.feeds import importer

# The API's default protected networks ([DEFAULT] protected_cidrs): a body overlapping one is a 409.
PROTECTED = rules.parse_protected_networks(
    next(opt.default for opt in provfw_conf.list_opts()[0][1] if opt.name == "protected_cidrs"))


def api_spec(body: dict[str, Any]) -> rules.RuleSpec | None:
    """The spec the API stores for ``body``, or None when the API refuses it (400 or 409).

    With the API's default policy: a non-global range is refused unless the body opts in
    (``allow_non_global``), so the driver tests still draw private, link-local and unique-local networks.
    """
    try:
        schemas.validate("RuleCreate", body)
        spec = rules.spec_from_body(body, PROTECTED)
        importer.check_one(spec, PROTECTED, bool(body.get("allow_non_global")))
        return spec
    except (exception.InvalidInput, exception.ProtectedNetwork, exception.NonGlobalNetwork):
        return None


# --------------------------------------------------------------------------- addresses

_V4_EDGES = ["0.0.0.1", "1.2.3.4", "128.0.0.0", "203.0.113.7", "255.255.255.255", "198.18.1.2"]
_V6_EDGES = ["::", "::2", "8000::", "2001:db8::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
             "::1.2.3.4", "64:ff9b::c000:201", "fd00:18:1::2", "2001:db8:0:0:1::1", "1:0:0:1:0:0:0:1"]


def _v4_address() -> st.SearchStrategy[ipaddress.IPv4Address]:
    return st.one_of(st.sampled_from(_V4_EDGES).map(ipaddress.IPv4Address),
                     st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address))


def _hextets() -> st.SearchStrategy[int]:
    # Runs of zero groups are what the spellings differ on (where "::" goes, a dotted tail).
    return st.lists(st.one_of(st.just(0), st.just(0xffff), st.integers(0, 0xffff)), min_size=8, max_size=8) \
        .map(lambda groups: sum(g << (16 * (7 - i)) for i, g in enumerate(groups)))


def _v6_address() -> st.SearchStrategy[ipaddress.IPv6Address]:
    return st.one_of(st.sampled_from(_V6_EDGES).map(ipaddress.IPv6Address),
                     _hextets().map(ipaddress.IPv6Address),
                     st.integers(0, 2**32 - 1).map(ipaddress.IPv6Address),          # ::a.b.c.d
                     st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))


def _v6_spelling(address: ipaddress.IPv6Address, how: str) -> str:
    if how == "exploded":
        return address.exploded
    if how == "upper":
        return str(address).upper()
    if how == "dotted":                    # the last 32 bits as a dotted quad, which the grammar admits
        head = address.exploded.rsplit(":", 2)[0]
        return f"{head}:{ipaddress.IPv4Address(int(address) & 0xffffffff)}"
    return str(address)


_V4_PREFIXES = st.one_of(st.sampled_from([None, 1, 2, 8, 16, 24, 31, 32]), st.integers(1, 32))
_V6_PREFIXES = st.one_of(st.sampled_from([None, 1, 2, 32, 48, 64, 96, 120, 127, 128]), st.integers(1, 128))


@st.composite
def cidr_texts(draw) -> str:
    """A cidr field as a client might write it (host bits may be set; the API clears them)."""
    if draw(st.booleans()):
        text, prefix = str(draw(_v4_address())), draw(_V4_PREFIXES)
    else:
        how = draw(st.sampled_from(["compressed", "exploded", "upper", "dotted"]))
        text, prefix = _v6_spelling(draw(_v6_address()), how), draw(_V6_PREFIXES)
    return text if prefix is None else f"{text}/{prefix}"


# --------------------------------------------------------------------------- ports

_PORTS = st.one_of(st.sampled_from([rules.MIN_PORT, 2, 1023, 1024, 8080, 65534, rules.MAX_PORT]),
                   st.integers(rules.MIN_PORT, rules.MAX_PORT))
_ICMP_TYPES = st.one_of(st.sampled_from([0, 3, 8, 128, 135, rules.MAX_ICMP_TYPE]), st.integers(0, rules.MAX_ICMP_TYPE))
_ICMP_CODES = st.one_of(st.sampled_from([rules.ANY, 0, 1, rules.MAX_ICMP]), st.integers(0, rules.MAX_ICMP))


@st.composite
def _port_fields(draw, protocol: str | None) -> dict[str, Any]:
    if protocol in ("tcp", "udp"):
        form = draw(st.sampled_from(["every", "single", "range", "same"]))
        if form == "every":
            return {}
        start = draw(_PORTS)
        if form == "single":
            return {"from_port": start}
        if form == "same":
            return {"from_port": start, "to_port": start}
        end = draw(_PORTS)
        return {"from_port": min(start, end), "to_port": max(start, end)}
    if protocol == "icmp":
        form = draw(st.sampled_from(["any", "any-explicit", "type", "type-code"]))
        if form == "any":
            return {}
        if form == "any-explicit":
            return {"from_port": rules.ANY, "to_port": rules.ANY}
        kind = draw(_ICMP_TYPES)
        return {"from_port": kind} if form == "type" else {"from_port": kind, "to_port": draw(_ICMP_CODES)}
    # all (or left out / null): ports left out, null or -1
    return draw(st.sampled_from([{}, {"from_port": None, "to_port": None},
                                 {"from_port": rules.ANY, "to_port": rules.ANY}]))


@st.composite
def rule_bodies(draw) -> dict[str, Any]:
    """A body of ``POST /v1/provider-fw-rules`` (mostly ones the API accepts; check with ``api_spec``)."""
    body: dict[str, Any] = {"cidr": draw(cidr_texts())}
    protocol = draw(st.sampled_from(["absent", None, *rules.PROTOCOLS, "tcp", "udp", "icmp"]))
    if protocol != "absent":
        body["protocol"] = protocol
    body.update(draw(_port_fields(None if protocol == "absent" else protocol)))
    if draw(st.booleans()):
        body["allow_non_global"] = True
    return body


@st.composite
def rule_sets(draw, max_size: int = 12) -> frozenset[rules.RuleSpec]:
    """Between one and ``max_size`` rules the API accepts, as the specs it would store."""
    bodies = draw(st.lists(rule_bodies(), min_size=1, max_size=max_size))
    specs = frozenset(spec for spec in map(api_spec, bodies) if spec is not None)
    assume(specs)
    return specs
