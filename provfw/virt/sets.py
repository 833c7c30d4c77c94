"""Pure grouping and sizing logic shared by the set-based firewall drivers.

Design
------
A set-based driver does not write one kernel rule per provider rule.  It
groups the rules by what a packet must match besides its source address -
the *match key* (address family, protocol, port range / ICMP type and code) -
and keeps the source networks of each group in a kernel set.  One firewall
rule per group (ipset, iptc) or per group and prefix length (nftables) then
drops every packet whose source is in the set: the cost per packet no longer
grows with the number of blocked networks, and adding a network is adding a
set element.

Everything here is a pure function of ``RuleSpec`` values and configuration:
no command is run, nothing is cached.  The drivers compute their desired
state with these functions, compare it with what the kernel reports and
write only the difference.

Thread-safety: stateless; safe from any thread.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from typing import Callable, Iterable

from oslo_config import cfg

from provfw import exception, names
from provfw.rules import ANY, RuleSpec

# Prefix of every kernel set provfw owns.  A set whose name starts with
# IPSET_PREFIX followed by the family digit and '-' is provfw's to create,
# resize, swap and destroy; nothing else is ever touched.
IPSET_PREFIX = "pfw"
TEMP_SUFFIX = "-t"


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class MatchKey:
    """What a packet must match besides its source: one kernel set per key."""

    version: int
    protocol: str
    from_port: int
    to_port: int

    @property
    def family(self) -> str:
        """ipset's family name."""
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


def group_members(specs: Iterable[RuleSpec], member: Callable[[str], str]) -> dict[MatchKey, set[str]]:
    """``member(cidr)`` of every spec, grouped by match key.

    The hot path of a 120k-rule full apply: keys are looked up by a plain
    tuple so that only one ``MatchKey`` is built per group, not per rule.
    """
    buckets: dict[tuple, set[str]] = {}
    for spec in specs:
        cidr = spec.cidr
        raw = (6 if ":" in cidr else 4, spec.protocol, spec.from_port, spec.to_port)
        bucket = buckets.get(raw)
        if bucket is None:
            bucket = buckets[raw] = set()
        bucket.add(member(cidr))
    return {MatchKey(*raw): members for raw, members in buckets.items()}


# ---------------------------------------------------------------- ipset

def ipset_name(key: MatchKey, temporary: bool = False) -> str:
    """Kernel set name of a group (<= 31 characters, see names.set_name)."""
    return names.set_name(IPSET_PREFIX, key.version, key.protocol, key.from_port, key.to_port,
                          TEMP_SUFFIX if temporary else "")


def is_owned_ipset(name: str) -> bool:
    """True for sets (and temporary sets) this module names."""
    return name.startswith((f"{IPSET_PREFIX}4-", f"{IPSET_PREFIX}6-"))


def ipset_member(cidr: str) -> str:
    """The spelling ``ipset save`` uses for a member: host networks lose their /32 or /128."""
    if cidr.endswith("/32"):
        return cidr[:-3] if ":" not in cidr else cidr
    if cidr.endswith("/128"):
        return cidr[:-4]
    return cidr


def set_capacity(entries: int, conf: cfg.ConfigOpts) -> int:
    """``maxelem`` for a set that must hold ``entries``: headroom so deltas rarely force a resize."""
    return max(conf.sets.min_set_size, math.ceil(entries * conf.sets.headroom))


def hash_size(capacity: int) -> int:
    """Initial bucket count: about two slots of capacity per bucket.

    Pre-sizing spares the kernel repeated rehashing while a restore fills the
    set (measured, 120k entries: 0.44 s with ipset's default 1024 buckets,
    0.31 s with 131072).  Buckets are pointers allocated on demand, so a
    generous size costs about 1 MB per 131072.
    """
    wanted = max(1024, capacity // 2)
    return 1 << (wanted - 1).bit_length()


def check_capacity(count: int, conf: cfg.ConfigOpts, driver: str) -> None:
    """Refuse, loudly, to hold more rules than the deployment is configured for.

    The API refuses rules past ``max_rules``; a driver asked to hold more
    anyway (a raised limit, a bug) fails the whole apply instead of writing a
    partial set, and the previous state stays in force.
    """
    if count > conf.max_rules:
        raise exception.DriverError(
            f"{driver}: asked to hold {count} rules, more than max_rules={conf.max_rules}; nothing was changed")


# ---------------------------------------------------------------- nftables

@dataclasses.dataclass(frozen=True, order=True, slots=True)
class NftSetKey:
    """One nftables set: a match key and ONE prefix length.

    nftables hash sets match exact keys; a rule masks the source address to
    ``prefixlen`` bits before the lookup (``ip saddr & 255.255.255.0 @set``),
    so every prefix length in a group gets its own set and rule.  This keeps
    all sets plain hash sets: see docs/scale.md for why interval sets were
    rejected (their elements make every later ``nft`` command slow).
    """

    key: MatchKey
    prefixlen: int

    @property
    def name(self) -> str:
        return f"{IPSET_PREFIX}{self.key.label()}_p{self.prefixlen}"

    @property
    def addr_type(self) -> str:
        return "ipv4_addr" if self.key.version == 4 else "ipv6_addr"

    @property
    def host_bits(self) -> int:
        return 32 if self.key.version == 4 else 128


def nft_set_key(spec: RuleSpec) -> tuple[NftSetKey, str]:
    """(set, element) holding ``spec`` in the nftables driver: the element is the network address."""
    address, _, prefix = spec.cidr.partition("/")
    return NftSetKey(match_key(spec), int(prefix)), address


def prefix_mask(version: int, prefixlen: int) -> str:
    """The netmask nft applies before a lookup, e.g. ``255.255.255.0`` or ``ffff:ffff::``."""
    network = ipaddress.ip_network(("0.0.0.0" if version == 4 else "::", prefixlen))
    return str(network.netmask)


def diff_members(kernel: set[str], desired: set[str]) -> tuple[set[str], set[str]]:
    """(to_add, to_remove) turning ``kernel`` into ``desired``."""
    return desired - kernel, kernel - desired

