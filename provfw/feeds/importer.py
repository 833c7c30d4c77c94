"""From a parsed block list to the rules provfw may make of it: the policy half of an import.

Design
    Pure, like ``formats``: the import endpoint and the conductor's feed
    syncer call ``build_specs`` on a ``formats.Parsed`` and get the rule
    specs to sync and the refusals, each with its line.  Two policies apply,
    in this order:

    1. protected networks (``protected_cidrs``): always refused, nobody can opt
       out per request - they are the management plane;
    2. non-global ranges (``rules.NON_GLOBAL_RANGES``: loopback, link-local,
       0.0.0.0/8, RFC 1918, CGNAT, unique-local, multicast): refused unless
       the caller opted in (``allow_non_global``, the configuration option or
       the request's override); what was let through that way is returned in
       ``Built.non_global`` so the caller audits it.

    Every entry gets the same protocol and ports (``template``), as one
    import or one feed has one description and one expiry.

Thread-safety: no shared state.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Iterable, Sequence

from provfw import exception, rules
from provfw.feeds import formats

MAX_NON_GLOBAL_AUDITED = 100


@dataclasses.dataclass(frozen=True)
class Built:
    """``specs``: distinct rule specs in list order.  ``refused``: the parser's refusals and the policy's,
    sorted by line.  ``non_global``: (line, cidr, range) of non-global entries let through by the opt-in, at
    most MAX_NON_GLOBAL_AUDITED (``non_global_count`` counts them all).  ``entries``: networks the list
    gave; ``duplicates``: networks it repeated."""

    specs: list[rules.RuleSpec]
    refused: list[formats.Refused]
    non_global: list[tuple[int, str, str]]
    non_global_count: int
    entries: int
    duplicates: int


def template(protocol: object = "all", from_port: object = None, to_port: object = None) -> rules.RuleSpec:
    """Validate the protocol and ports every entry of a list gets; InvalidInput naming the field otherwise."""
    return rules.make_spec("192.0.2.0/24", protocol, from_port, to_port)


def build_specs(parsed: formats.Parsed, like: rules.RuleSpec, protected: Sequence[rules.Network],
                allow_non_global: bool) -> Built:
    """The rule specs ``parsed`` asks for, with ``like``'s protocol and ports, and the refusals."""
    return build_from_entries(parsed.items, parsed.refused, parsed.duplicates, like, protected, allow_non_global)


def parse_specs(data: bytes | str, format: str, column: str | None, like: rules.RuleSpec,
                protected: Sequence[rules.Network], allow_non_global: bool) -> tuple[formats.Parsed, Built]:
    """``formats.parse`` then ``build_specs``, in one pass over most entries of a large list: the parser
    hands over each IPv4 entry in a /8 no protected or non-global range touches as its rule spec
    (``formats.Ready``).  The same ``Built`` as the two steps; 0.1 s less for a 120k-entry list
    (docs/feeds.md).  Raises what ``formats.parse`` raises."""
    parsed = formats.parse(data, format, column, formats.Ready(like, _clear_first_octets(_bounds(protected))))
    return parsed, build_specs(parsed, like, protected, allow_non_global)


def build_from_entries(entries: Iterable[tuple[int, rules.Network | int | rules.RuleSpec]],
                       refused: Iterable[formats.Refused], duplicates: int, like: rules.RuleSpec,
                       protected: Sequence[rules.Network], allow_non_global: bool) -> Built:
    """As ``build_specs``, for entries read some other way (a JSON list): ``formats.Entry`` values, or
    ``(line, network)`` pairs in the form of ``formats.Parsed.items`` (a ``RuleSpec`` there was built by the
    parser for this ``like`` and ``protected``: ``parse_specs``)."""
    specs: dict[rules.RuleSpec, None] = {}
    out = list(refused)
    non_global: list[tuple[int, str, str]] = []
    count = non_global_count = 0
    # Integer bounds, computed once per network and once for the protected ones: this loop runs per entry
    # of a 120k-entry list, where ipaddress' own overlap and formatting cost more than parsing did.
    guarded = _bounds(protected)
    text, between, ntoa, v4 = rules.cidr_text, rules.non_global_between, socket.inet_ntoa, ipaddress.IPv4Network
    make = tuple.__new__
    suffix = formats.PREFIX_SUFFIX
    protocol, low_port, high_port = like.protocol, like.from_port, like.to_port
    clear = _clear_first_octets(guarded)
    spec_type = rules.RuleSpec
    for line, network in entries:
        count += 1
        if type(network) is spec_type:
            # Built by the parser (formats.Ready, parse_specs): in a clear /8, with like's protocol and ports.
            specs[network] = None
            continue
        if type(network) is int or type(network) is v4:
            if type(network) is int:
                # formats.compact_v4: a bare IPv4 line of a parsed list, read without an ipaddress object.
                start, length = network >> 6, network & 63
            else:
                # An IPv4 network (from a range, a netmask, a JSON list): bounds and text from integers, in C.
                start, length = int(network.network_address), network.prefixlen
            cidr = ntoa(start.to_bytes(4, "big")) + suffix[length]
            if length >= 8 and clear[start >> 24]:
                # Inside a /8 that no protected or non-global range touches: most entries of a public list.
                specs[make(rules.RuleSpec, (cidr, protocol, low_port, high_port))] = None
                continue
            version = 4
            end = start | ((1 << (32 - length)) - 1)
        else:
            version = network.version
            start = int(network.network_address)
            end = start | ((1 << (network.max_prefixlen - network.prefixlen)) - 1)
            cidr = text(network)
        hit = None
        for guard_version, low, high, net in guarded:
            if guard_version == version and low <= end and start <= high:
                hit = net
                break
        if hit is not None:
            said = exception.relation_of_bounds(start, end, low, high)
            out.append(formats.Refused(line, cidr, exception.ProtectedNetwork(cidr, str(hit), said).message))
            continue
        reserved = between(version, start, end)
        if reserved is not None:
            if not allow_non_global:
                range_ = reserved.network
                said = exception.relation_of_bounds(start, end, int(range_.network_address),
                                                    int(range_.broadcast_address))
                out.append(formats.Refused(line, cidr, f"{cidr} {said} {range_}, {reserved.name}; "
                                                       f"{exception.NON_GLOBAL_HINT}"))
                continue
            non_global_count += 1
            if len(non_global) < MAX_NON_GLOBAL_AUDITED:
                non_global.append((line, cidr, str(reserved.network)))
        specs[make(rules.RuleSpec, (cidr, protocol, low_port, high_port))] = None
    out.sort(key=lambda item: item.line)
    return Built(list(specs), out, non_global, non_global_count, count, duplicates)


def _bounds(protected: Sequence[rules.Network]) -> list[tuple[int, int, int, rules.Network]]:
    """(version, first address, last address, network) of each protected network, as integers."""
    return [(net.version, int(net.network_address), int(net.broadcast_address), net) for net in protected]


def _clear_first_octets(guarded: list[tuple[int, int, int, rules.Network]]) -> list[bool]:
    """For each first octet of IPv4: True when no protected network (``guarded``' bounds) and no non-global
    range overlaps its /8, so an entry of prefix length 8 or more starting there needs neither check."""
    clear = []
    for octet in range(256):
        low, high = octet << 24, (octet << 24) | 0xFFFFFF
        clear.append(rules.non_global_between(4, low, high) is None and not any(
            version == 4 and guard_low <= high and low <= guard_high for version, guard_low, guard_high, _ in guarded))
    return clear


def check_one(spec: rules.RuleSpec, protected: Sequence[rules.Network], allow_non_global: bool) -> str | None:
    """For a single rule: raise ProtectedNetwork or NonGlobalNetwork (409); return the non-global range let
    through by the opt-in (to audit), or None."""
    rules.check_not_protected(spec, protected)
    reserved = rules.non_global_overlap(spec.network)
    if reserved is None:
        return None
    if not allow_non_global:
        raise exception.NonGlobalNetwork(spec.cidr, str(reserved.network), reserved.name)
    return str(reserved.network)
