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


def build_from_entries(entries: Iterable[tuple[int, rules.Network | int]], refused: Iterable[formats.Refused],
                       duplicates: int, like: rules.RuleSpec, protected: Sequence[rules.Network],
                       allow_non_global: bool) -> Built:
    """As ``build_specs``, for entries read some other way (a JSON list): ``formats.Entry`` values, or
    ``(line, network)`` pairs in the form of ``formats.Parsed.items``."""
    specs: dict[rules.RuleSpec, None] = {}
    out = list(refused)
    non_global: list[tuple[int, str, str]] = []
    count = non_global_count = 0
    # Integer bounds, computed once per network and once for the protected ones: this loop runs per entry
    # of a 120k-entry list, where ipaddress' own overlap and formatting cost more than parsing did.
    guarded = [(net.version, int(net.network_address), int(net.broadcast_address), net) for net in protected]
    text, between, ntoa, v4 = rules.cidr_text, rules.non_global_between, socket.inet_ntoa, ipaddress.IPv4Network
    make = tuple.__new__
    suffix = [f"/{length}" for length in range(33)]     # an f-string per entry was a seventh of this loop
    protocol, low_port, high_port = like.protocol, like.from_port, like.to_port
    for line, network in entries:
        count += 1
        if type(network) is int:
            # formats.compact_v4: a bare IPv4 line of a parsed list, read without an ipaddress object.
            version, start, length = 4, network >> 6, network & 63
            end = start | ((1 << (32 - length)) - 1)
            cidr = ntoa(start.to_bytes(4, "big")) + suffix[length]
        elif type(network) is v4:
            # An IPv4 network (from a range, a netmask, a JSON list): the bounds and the text from integers, in C.
            version, start, length = 4, int(network.network_address), network.prefixlen
            end = start | ((1 << (32 - length)) - 1)
            cidr = ntoa(start.to_bytes(4, "big")) + suffix[length]
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
            out.append(formats.Refused(line, cidr, exception.ProtectedNetwork(cidr, str(hit)).message))
            continue
        reserved = between(version, start, end)
        if reserved is not None:
            if not allow_non_global:
                out.append(formats.Refused(line, cidr, f"{cidr} overlaps {reserved.network}, {reserved.name}; "
                                                       "blocking it needs allow_non_global"))
                continue
            non_global_count += 1
            if len(non_global) < MAX_NON_GLOBAL_AUDITED:
                non_global.append((line, cidr, str(reserved.network)))
        specs[make(rules.RuleSpec, (cidr, protocol, low_port, high_port))] = None
    out.sort(key=lambda item: item.line)
    return Built(list(specs), out, non_global, non_global_count, count, duplicates)


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
