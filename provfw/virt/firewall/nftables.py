"""nftables: provider rules in provfw's own table, one ``nft -f`` transaction per apply.

Design
------
Kernel layout (table name from ``provfw.names.NFT_TABLE``)::

    table inet provfw {
        set pfw4_all_p32 { type ipv4_addr; }          # one hash set per (match key, prefix length)
        set pfw4_tcp_22_22_p24 { type ipv4_addr; }
        chain forward {
            type filter hook forward priority filter - 10; policy accept;
            ip saddr @pfw4_all_p32 drop comment "provfw:<hash>"
            ip saddr & 255.255.255.0 @pfw4_tcp_22_22_p24 tcp dport 22 drop comment "provfw:<hash>"
        }
    }

*Why a forward hook at ``filter - 10``.*  The seed puts provider rules first
in FORWARD, before security groups (nova-local).  Every nftables base chain
on a hook sees the packet in priority order, and a ``drop`` anywhere is
final while an ``accept`` only ends that one chain.  At priority -10 our
chain runs before the filter table's FORWARD (iptables-nft's ``ip filter``
table and legacy iptables both hook at priority 0), so a provider drop
wins over any security-group accept, and everything we do not drop
continues to FORWARD and its nova-local chain untouched - which is why the
nftables layout has no ``-j nova-local``: nothing needs to jump there.  The
forward hook (not prerouting/raw) keeps the seed's scope: traffic routed to
instances, not traffic to the hypervisor itself.

*Why hash sets per prefix length, not interval sets.*  Measured with nft
1.0.6 on this kernel: once any interval set holds 120k elements, EVERY
``nft`` command that adds an element (to any set, in any table) costs
0.45-1.0 s, because nft loads the elements of all interval sets into its
cache to check for overlaps; filling an interval set with 120k elements
takes 1.1 s.  Plain hash sets cost 4 ms per add at 120k and 0.2 s to fill.
A hash set matches exact keys, so each prefix length gets its own set and
the rule masks the source first (``ip saddr & mask @set``), as ipset's
hash:net does internally.  This also settles overlapping CIDRs without any
merging: 10.0.0.0/8 and 10.1.0.0/16 are two elements of two sets, each
added and deleted on its own, and a packet is dropped while either is
present.  (Interval sets would reject the overlap and force a merge whose
deltas must re-expand the merged range on delete.)

*Atomicity.*  Each apply is ONE ``nft -f`` transaction (the plan's chain
step): the kernel commits all of it or none.  A full rebuild refreshes the
PERSISTENT sets in place - ``flush set`` and ``add element`` in the same
transaction, or exact ``delete element``/``add element`` for a small
difference - and rewrites the chain with ``flush chain`` + ``add rule`` in
that same transaction.  The table is never deleted and recreated (that
leaked packets with interval sets on this kernel).  A set no longer wanted
is deleted after the rules that referenced it, inside the same transaction.

*Cost.*  A full plan lists the tables as data (``nft -j list tables``: is
ours there?), reads ours (``nft -j list table``) and writes nothing when it
matches.  A delta reads nothing: ``plan_delta`` writes the element changes
from ``NftState`` (members per set) - and, when a set appears or empties,
the short rule list, in the same transaction, since the state names every
set.  If the kernel disagrees (someone deleted an element we now delete) the
transaction fails as a whole, and the base class retries with a full plan,
which reads the kernel and repairs it.  nft sets declare no size, so no
delta is ever too big for its set.

*Checks.*  ``plan_check`` runs ``nft -c -f`` (check mode: the kernel
validates the batch and commits nothing) of the specs' sets, elements and
rules in a scratch table ``names.NFT_CHECK_TABLE`` with a plain (unhooked)
chain.

Thread-safety: pure functions; the driver keeps no state between calls and
serialises on ``PlannedFirewallDriver``'s locks.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
from typing import Collection, Iterable, Mapping, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import names, runner as runner_mod
from provfw.rules import ANY, RuleSpec
from provfw.virt.firewall import base
from provfw.virt.firewall import sets as sets_mod
from provfw.virt.firewall.sets import MatchKey

LOG = logging.getLogger(__name__)

FAMILY = "inet"
CHAIN = "forward"
# Before the filter table's FORWARD (priority 0): provider drops win over security groups.
PRIORITY = -10
CHAIN_SPEC = f"{{ type filter hook forward priority {PRIORITY}; policy accept; }}"
SET_PREFIX = "pfw"


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
        return f"{SET_PREFIX}{self.key.label()}_p{self.prefixlen}"

    @property
    def addr_type(self) -> str:
        return "ipv4_addr" if self.key.version == 4 else "ipv6_addr"

    @property
    def host_bits(self) -> int:
        return 32 if self.key.version == 4 else 128


@dataclasses.dataclass(frozen=True)
class NftState:
    """The driver's state between calls: members per set (read-only), as the kernel accepted them."""

    counts: Mapping[NftSetKey, int]


def prefix_mask(version: int, prefixlen: int) -> str:
    """The netmask nft applies before a lookup, e.g. ``255.255.255.0`` or ``ffff:ffff::``."""
    network = ipaddress.ip_network(("0.0.0.0" if version == 4 else "::", prefixlen))
    return str(network.netmask)


# --------------------------------------------------------------------------- reading the kernel

@dataclasses.dataclass
class KernelTable:
    """What ``nft -j list table inet provfw`` reports (``exists`` False: no such table)."""

    exists: bool = False
    chain: dict | None = None
    rule_comments: list[str] = dataclasses.field(default_factory=list)
    sets: dict[str, tuple[str, tuple[str, ...], set[str]]] = dataclasses.field(default_factory=dict)

    def chain_ok(self) -> bool:
        chain = self.chain or {}
        return (chain.get("type") == "filter" and chain.get("hook") == "forward"
                and chain.get("prio") == PRIORITY and chain.get("policy") == "accept")


def has_table(text: str, family: str = FAMILY, table: str = names.NFT_TABLE) -> bool:
    """Whether ``nft -j list tables`` output lists ``family table`` - decided on data, not on an error text."""
    return any(item.get("table", {}).get("family") == family and item["table"].get("name") == table
               for item in json.loads(text).get("nftables", []))


def parse_table(text: str, table: str = names.NFT_TABLE) -> KernelTable:
    """Parse nft's JSON listing of provfw's table."""
    state = KernelTable(exists=True)
    for item in json.loads(text).get("nftables", []):
        if "set" in item:
            entry = item["set"]
            if entry.get("table") != table:
                continue
            raw = entry.get("elem", [])
            flags = tuple(entry.get("flags", ()))
            try:
                elements = sets_mod.canonical_members(set(raw))   # plain addresses: the 120k fast path
            except TypeError:
                # Elements with options or ranges: not something provfw wrote.  Mark the
                # set so the plan replaces it (delete + add in the same transaction).
                elements, flags = set(), flags + ("foreign-elements",)
            state.sets[entry["name"]] = (entry.get("type", ""), flags, elements)
        elif "chain" in item and item["chain"].get("name") == CHAIN and item["chain"].get("table") == table:
            state.chain = item["chain"]
        elif "rule" in item and item["rule"].get("chain") == CHAIN and item["rule"].get("table") == table:
            state.rule_comments.append(item["rule"].get("comment", ""))
    return state


def read_table(runner: runner_mod.Runner) -> KernelTable:
    """provfw's table as the kernel holds it; ``exists`` False when there is none."""
    if not has_table(runner(["nft", "-j", "list", "tables"])):
        return KernelTable(exists=False)
    return parse_table(runner(["nft", "-j", "list", "table", FAMILY, names.NFT_TABLE]))


# --------------------------------------------------------------------------- rendering

def group_elements(specs: Iterable[RuleSpec]) -> dict[NftSetKey, set[str]]:
    """Elements (network addresses) of every set; one MatchKey/NftSetKey per group, not per rule.

    Yields (``sets.cooperate``) every ``sets.YIELD_EVERY`` specs, as the ipset driver's grouping does: a
    drift check of 120k rules plans with it while the worker's casts wait for the CPU.
    """
    buckets: dict[tuple, set[str]] = {}
    for count, spec in enumerate(specs, 1):
        address, _, prefix = spec.cidr.partition("/")
        raw = (6 if ":" in address else 4, spec.protocol, spec.from_port, spec.to_port, prefix)
        bucket = buckets.get(raw)
        if bucket is None:
            bucket = buckets[raw] = set()
        bucket.add(address)
        if not count % sets_mod.YIELD_EVERY:
            sets_mod.cooperate()
    return {NftSetKey(MatchKey(*raw[:4]), int(raw[4])): members for raw, members in buckets.items()}


def _l4_match(key: MatchKey) -> str:
    proto = key.protocol
    if proto in ("tcp", "udp"):
        ports = str(key.from_port) if key.from_port == key.to_port else f"{key.from_port}-{key.to_port}"
        return f"{proto} dport {ports}"
    if proto == "icmp":
        icmp = "icmp" if key.version == 4 else "icmpv6"
        if key.from_port == ANY:
            return f"meta l4proto {'icmp' if key.version == 4 else 'ipv6-icmp'}"
        match = f"{icmp} type {key.from_port}"
        if key.to_port != ANY:
            match += f" {icmp} code {key.to_port}"
        return match
    return ""


def rule_comment(set_key: NftSetKey) -> str:
    return names.rule_comment("nft-drop", set_key.name, *dataclasses.astuple(set_key.key), set_key.prefixlen)


def render_rule(set_key: NftSetKey, table: str = names.NFT_TABLE) -> str:
    """``add rule`` line dropping sources in ``set_key``'s set (masked to its prefix length)."""
    key = set_key.key
    saddr = "ip saddr" if key.version == 4 else "ip6 saddr"
    if set_key.prefixlen != set_key.host_bits:
        saddr += f" & {prefix_mask(key.version, set_key.prefixlen)}"
    parts = [saddr, f"@{set_key.name}", _l4_match(key), "drop", f'comment "{rule_comment(set_key)}"']
    return f"add rule {FAMILY} {table} {CHAIN} " + " ".join(p for p in parts if p)


def _elements(verb: str, name: str, members: Iterable[str], chunk: int = 20000,
              table: str = names.NFT_TABLE) -> list[str]:
    members = list(members)
    return [f"{verb} element {FAMILY} {table} {name} {{ {', '.join(members[i:i + chunk])} }}"
            for i in range(0, len(members), chunk)]


def _add_set(set_key: NftSetKey, table: str = names.NFT_TABLE) -> str:
    return f"add set {FAMILY} {table} {set_key.name} {{ type {set_key.addr_type}; }}"


def transaction_step(script: Sequence[str], check: bool = False) -> base.Command:
    """ONE ``nft -f -`` (with ``check``: ``nft -c -f -``, validated by the kernel, never committed)."""
    argv = ("nft", "-c", "-f", "-") if check else ("nft", "-f", "-")
    return base.Command(argv, "\n".join(script) + "\n",
                        what=f"nft {'-c ' if check else ''}-f ({len(script)} statements)")


# --------------------------------------------------------------------------- planning

def plan_transaction(desired: Mapping[NftSetKey, set[str]], kernel: KernelTable,
                     conf: cfg.ConfigOpts) -> list[str]:
    """Pure: the nft script (one transaction) turning ``kernel`` into ``desired``; [] when they match."""
    table = names.NFT_TABLE
    head = [f"add table {FAMILY} {table}"]
    body: list[str] = []
    rewrite_chain = False
    if kernel.chain is None:
        head.append(f"add chain {FAMILY} {table} {CHAIN} {CHAIN_SPEC}")
        rewrite_chain = True
    elif not kernel.chain_ok():
        # Hook and priority of a base chain cannot be changed in place; replace the
        # chain inside this transaction, so the old one works until the commit.
        head += [f"flush chain {FAMILY} {table} {CHAIN}", f"delete chain {FAMILY} {table} {CHAIN}",
                 f"add chain {FAMILY} {table} {CHAIN} {CHAIN_SPEC}"]
        rewrite_chain = True
    wanted = sorted(desired)
    by_name = {k.name: k for k in wanted}
    stale_sets = [name for name in sorted(kernel.sets) if name not in by_name]
    for set_key in wanted:
        members = desired[set_key]
        found = kernel.sets.get(set_key.name)
        if found is not None and (found[0] != set_key.addr_type or found[1]):
            stale_sets.append(set_key.name)        # wrong type or flags: recreate below, after the chain flush
            found = None
        if found is None:
            body.append(_add_set(set_key))
            body += _elements("add", set_key.name, sorted(members))
            continue
        to_add, to_remove = sets_mod.diff_members(found[2], members)
        if len(to_add) + len(to_remove) > conf.sets.full_rebuild_delta:
            body.append(f"flush set {FAMILY} {table} {set_key.name}")
            body += _elements("add", set_key.name, sorted(members))
        else:
            body += _elements("delete", set_key.name, sorted(to_remove))
            body += _elements("add", set_key.name, sorted(to_add))
    desired_comments = [rule_comment(k) for k in wanted]
    rewrite_chain = rewrite_chain or kernel.rule_comments != desired_comments or bool(stale_sets)
    if not rewrite_chain and not body and kernel.exists:
        return []
    script = list(head)
    if rewrite_chain and kernel.chain is not None and kernel.chain_ok():
        script.append(f"flush chain {FAMILY} {table} {CHAIN}")
    script += [f"delete set {FAMILY} {table} {name}" for name in stale_sets]
    script += body
    if rewrite_chain:
        script += [render_rule(k) for k in wanted]
    return script


def plan_delta_script(added: Iterable[RuleSpec], removed: Iterable[RuleSpec],
                      counts: Mapping[NftSetKey, int]) -> tuple[list[str], dict[NftSetKey, int]]:
    """Pure: the delta transaction from ``counts`` alone, and the counts after it.

    New sets are added before the rules that use them and emptied sets
    deleted after the rule list stopped naming them, all in the one
    transaction; the rule list is rewritten only when the set list changes.
    """
    adds = group_elements(added)
    dels = group_elements(removed)
    after = dict(counts)
    for set_key in adds.keys() | dels.keys():
        after[set_key] = after.get(set_key, 0) + len(adds.get(set_key, ())) - len(dels.get(set_key, ()))
    new_sets = [k for k in sorted(adds) if k not in counts]
    emptied = [k for k in sorted(dels) if after[k] <= 0]
    table = names.NFT_TABLE
    script = [_add_set(k) for k in new_sets]
    for set_key in sorted(adds):
        script += _elements("add", set_key.name, sorted(adds[set_key]))
    for set_key in sorted(dels):
        if set_key not in emptied:
            script += _elements("delete", set_key.name, sorted(dels[set_key]))
    if new_sets or emptied:
        remaining = sorted(k for k, n in after.items() if n > 0)
        script.append(f"flush chain {FAMILY} {table} {CHAIN}")
        script += [render_rule(k) for k in remaining]
        script += [f"delete set {FAMILY} {table} {k.name}" for k in emptied]
    return script, {k: n for k, n in after.items() if n > 0}


def check_script(specs: Iterable[RuleSpec]) -> list[str]:
    """The specs' sets, elements and rules in the scratch table, for ``nft -c`` (a plain, unhooked chain)."""
    table = names.NFT_CHECK_TABLE
    desired = group_elements(specs)
    script = [f"add table {FAMILY} {table}", f"add chain {FAMILY} {table} {CHAIN}"]
    for set_key in sorted(desired):
        script.append(_add_set(set_key, table))
        script += _elements("add", set_key.name, sorted(desired[set_key]), table=table)
        script.append(render_rule(set_key, table))
    return script


# --------------------------------------------------------------------------- the driver

class NftablesFirewallDriver(base.PlannedFirewallDriver):
    """Provider rules as nftables hash sets in table inet provfw (see the module docstring)."""

    name = "nftables"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None):
        super().__init__(conf, runner)

    def plan_full(self, desired: Collection[RuleSpec]) -> base.Plan:
        sets_mod.check_capacity(len(desired), self.conf, self.name)
        elements = group_elements(desired)
        script = plan_transaction(elements, read_table(self.runner), self.conf)
        state = NftState(base.frozen_mapping({k: len(v) for k, v in elements.items()}))
        return base.Plan(state, chains=(transaction_step(script),) if script else ())

    def plan_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec], state: NftState,
                   desired_count: int) -> base.Plan | None:
        script, counts = plan_delta_script(added, removed, state.counts)
        if not script:
            return None
        return base.Plan(NftState(base.frozen_mapping(counts)), chains=(transaction_step(script),), mode="delta")

    def plan_check(self, specs: Collection[RuleSpec]) -> base.Plan:
        sets_mod.check_capacity(len(specs), self.conf, self.name)
        if not specs:
            return base.Plan(None, mode="check")
        return base.Plan(None, chains=(transaction_step(check_script(specs), check=True),), mode="check")

    def teardown(self) -> None:
        """Delete table inet provfw (sets, chain and rules with it)."""
        with self.applying():
            steps = ()
            if has_table(self.runner(["nft", "-j", "list", "tables"])):
                steps = (base.Command(("nft", "delete", "table", FAMILY, names.NFT_TABLE),
                                      what=f"nft delete table {FAMILY} {names.NFT_TABLE}"),)
            base.execute(base.Plan(None, chains=steps), self.runner)
