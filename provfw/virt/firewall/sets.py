"""Grouping of provider rules by what a packet must match besides its source.

Design
------
A set-based driver does not write one kernel rule per provider rule.  It
groups the rules by their *match key* - address family, protocol, port range
/ ICMP type and code - and keeps the source networks of each group in a
kernel set.  One firewall rule per group (ipset, iptc, nwfilter's ipset
mode) or per group and prefix length (nftables) then drops every packet
whose source is in the set: the cost per packet no longer grows with the
number of blocked networks, and adding a network is adding a set element.

Everything here is a pure function of ``RuleSpec`` values and configuration:
no command is run, nothing is cached.  The kernel-specific parts live with
their tool: set names, member spelling and sizing in
``provfw.virt.firewall.ipset``, per-prefix sets in ``...firewall.nftables``.

Thread-safety: stateless; safe from any thread.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import time
from typing import Callable, Iterable

from oslo_config import cfg

from provfw import exception
from provfw.rules import ANY, RuleSpec


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class MatchKey:
    """What a packet must match besides its source: one kernel set per key."""

    version: int
    protocol: str
    from_port: int
    to_port: int

    @property
    def family(self) -> str:
        """ipset's family name: ``inet`` or ``inet6``."""
        return "inet" if self.version == 4 else "inet6"

    def label(self) -> str:
        """A readable, identifier-safe name part: ``4_tcp_1_65535``, ``6_icmp_128_any``, ``4_all``."""
        if self.protocol == "all":
            return f"{self.version}_all"
        ports = [("any" if p == ANY else str(p)) for p in (self.from_port, self.to_port)]
        return f"{self.version}_{self.protocol}_{ports[0]}_{ports[1]}"


def match_key(spec: RuleSpec) -> MatchKey:
    return MatchKey(spec.version, spec.protocol, spec.from_port, spec.to_port)


def group_specs(specs: Iterable[RuleSpec]) -> dict[MatchKey, list[RuleSpec]]:
    """Specs grouped by match key; each group's order follows the input."""
    groups: dict[MatchKey, list[RuleSpec]] = {}
    for spec in specs:
        groups.setdefault(match_key(spec), []).append(spec)
    return groups


#: Entries a long loop of a full plan handles between two ``cooperate`` calls.
YIELD_EVERY = 8192


def cooperate() -> None:
    """Let the worker's other green threads run in the middle of a loop over a whole rule set.

    A worker runs under eventlet, where a loop that never blocks keeps the one OS thread: a cast arriving
    while a drift check planned 120k rules waited for it (``group_members`` 0.07-0.16 s, ``parse_save``
    0.1 s; the +1 CIDR tail of docs/benchmarks.md, measured 2026-12-01).  ``time.sleep(0)`` is eventlet's
    ``sleep(0)`` there, and only a release of the GIL elsewhere.
    """
    time.sleep(0)


def group_members(specs: Iterable[RuleSpec],
                  members: Callable[[int, list[str]], set[str]]) -> dict[MatchKey, set[str]]:
    """The specs' members grouped by match key: ``members(version, cidrs)`` of each key's CIDRs.

    The hot path of a 120k-rule full apply.  Specs are taken apart as the
    tuples they are and each key's CIDRs collected in a list; ``members``
    then spells a whole group at once (the ipset driver with ``map`` of a
    ``str`` method, no Python call per member): 0.17 -> 0.11 s for 120k
    specs against a ``member(cidr)`` call each (measured 2026-12-01).  Only
    one ``MatchKey`` is built per group.  Yields (``cooperate``) every
    ``YIELD_EVERY`` specs.
    """
    buckets: dict[tuple, list[str]] = {}
    specs = iter(specs)
    while chunk := list(itertools.islice(specs, YIELD_EVERY)):
        for spec in chunk:
            cidr = spec[0]
            raw = (6 if ":" in cidr else 4, *spec[1:])
            bucket = buckets.get(raw)
            if bucket is None:
                bucket = buckets[raw] = []
            bucket.append(cidr)
        cooperate()
    return {MatchKey(*raw): members(raw[0], cidrs) for raw, cidrs in buckets.items()}


def canonical_members(members: set[str]) -> set[str]:
    """Kernel-spelt set members re-spelt as provfw spells them (``ipaddress``'s compressed IPv6).

    ``ipset save`` and ``nft -j list`` print IPv6 through the C library's
    ``inet_ntop``, which writes an address whose first 96 bits are zero with
    a dotted tail (``::1.2.3.4``); ``ipaddress`` writes ``::102:304``.  Left
    as is, the two spellings never compare equal: every full plan would add
    the one and delete the other (ipset applies adds first, so the drift
    check DELETED a blocked member).  Only members with both ``:`` and ``.``
    are parsed, so a 120k-member IPv4 set costs one scan.
    """
    dotted = [m for m in members if "." in m and ":" in m]
    if not dotted:
        return members
    fixed = set(members).difference(dotted)
    for text in dotted:
        address, slash, prefix = text.partition("/")
        try:
            fixed.add(str(ipaddress.IPv6Address(address)) + slash + prefix)
        except ValueError:
            fixed.add(text)            # not an address provfw wrote: left for the diff to remove
    return fixed


def diff_members(kernel: set[str], desired: set[str]) -> tuple[set[str], set[str]]:
    """(to_add, to_remove) turning ``kernel`` into ``desired``."""
    return desired - kernel, kernel - desired


def check_capacity(count: int, conf: cfg.ConfigOpts, driver: str) -> None:
    """Refuse, loudly, to hold more rules than the deployment is configured for.

    The API refuses rules past ``max_rules``; a driver asked to hold more
    anyway (a raised limit, a bug) raises ``DriverError`` while planning,
    before anything is written, and the previous state stays in force.
    """
    if count > conf.max_rules:
        raise exception.DriverError(
            f"{driver}: asked to hold {count} rules, more than max_rules={conf.max_rules}; nothing was changed")
