"""NftablesFirewallDriver: provider rules in provfw's own nftables table, one ``nft -f`` per apply.

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

*Atomicity.*  Each apply is ONE ``nft -f`` transaction: the kernel commits
all of it or none.  A full rebuild refreshes the PERSISTENT sets in place -
``flush set`` and ``add element`` in the same transaction, or exact
``delete element``/``add element`` for a small difference - and rewrites the
chain with ``flush chain`` + ``add rule`` in that same transaction.  The
table is never deleted and recreated (that leaked packets with interval
sets on this kernel).  A set no longer wanted is deleted after the rules
that referenced it, inside the same transaction.

*Cost.*  ``apply_full`` reads the table (``nft -j list table``) and writes
nothing when it matches.  ``apply_delta`` reads nothing: it writes the
element changes (and, when a set appears or empties, the rule list) from
the bookkeeping; if the kernel disagrees (someone deleted an element) the
transaction fails as a whole and a full apply repairs it.

Thread-safety: ``ProviderFirewallBase`` serialises applies; ``_counts``
changes only after the kernel accepted a transaction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterable, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, names, runner as runner_mod
from provfw.rules import ANY, RuleSpec
from provfw.virt import sets
from provfw.virt.firewall import ProviderFirewallBase

LOG = logging.getLogger(__name__)

FAMILY = "inet"
CHAIN = "forward"
# Before the filter table's FORWARD (priority 0): provider drops win over security groups.
PRIORITY = -10
CHAIN_SPEC = f"{{ type filter hook forward priority {PRIORITY}; policy accept; }}"


@dataclasses.dataclass
class KernelTable:
    """What ``nft -j list table inet provfw`` reports."""

    exists: bool = False
    chain: dict | None = None
    rule_comments: list[str] = dataclasses.field(default_factory=list)
    sets: dict[str, tuple[str, tuple[str, ...], set[str]]] = dataclasses.field(default_factory=dict)

    def chain_ok(self) -> bool:
        chain = self.chain or {}
        return (chain.get("type") == "filter" and chain.get("hook") == "forward"
                and chain.get("prio") == PRIORITY and chain.get("policy") == "accept")


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
                elements = set(raw)                # plain addresses: the fast path at 120k elements
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


def group_elements(specs: Iterable[RuleSpec]) -> dict[sets.NftSetKey, set[str]]:
    """Elements (network addresses) of every set; one MatchKey/NftSetKey per group, not per rule."""
    buckets: dict[tuple, set[str]] = {}
    for spec in specs:
        address, _, prefix = spec.cidr.partition("/")
        raw = (6 if ":" in address else 4, spec.protocol, spec.from_port, spec.to_port, prefix)
        bucket = buckets.get(raw)
        if bucket is None:
            bucket = buckets[raw] = set()
        bucket.add(address)
    return {sets.NftSetKey(sets.MatchKey(*raw[:4]), int(raw[4])): members for raw, members in buckets.items()}


def _l4_match(key: sets.MatchKey) -> str:
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


def rule_comment(set_key: sets.NftSetKey) -> str:
    return names.rule_comment("nft-drop", set_key.name, *dataclasses.astuple(set_key.key), set_key.prefixlen)


def render_rule(set_key: sets.NftSetKey) -> str:
    """``add rule`` line dropping sources in ``set_key``'s set (masked to its prefix length)."""
    key = set_key.key
    saddr = "ip saddr" if key.version == 4 else "ip6 saddr"
    if set_key.prefixlen != set_key.host_bits:
        saddr += f" & {sets.prefix_mask(key.version, set_key.prefixlen)}"
    parts = [saddr, f"@{set_key.name}", _l4_match(key), "drop", f'comment "{rule_comment(set_key)}"']
    return f"add rule {FAMILY} {names.NFT_TABLE} {CHAIN} " + " ".join(p for p in parts if p)


def _elements(verb: str, name: str, members: Iterable[str], chunk: int = 20000) -> list[str]:
    members = list(members)
    return [f"{verb} element {FAMILY} {names.NFT_TABLE} {name} {{ {', '.join(members[i:i + chunk])} }}"
            for i in range(0, len(members), chunk)]


def _add_set(set_key: sets.NftSetKey) -> str:
    return f"add set {FAMILY} {names.NFT_TABLE} {set_key.name} {{ type {set_key.addr_type}; }}"


def plan_transaction(desired: dict[sets.NftSetKey, set[str]], kernel: KernelTable,
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
        to_add, to_remove = sets.diff_members(found[2], members)
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


class NftablesFirewallDriver(ProviderFirewallBase):
    """Provider rules as nftables hash sets in table inet provfw (see the module docstring)."""

    name = "nftables"
    supports_delta = True

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None):
        super().__init__(conf, runner)
        self._counts: dict[sets.NftSetKey, int] = {}

    def kernel_table(self) -> KernelTable:
        try:
            text = self.runner(["nft", "-j", "list", "table", FAMILY, names.NFT_TABLE])
        except exception.ProcessExecutionError as exc:
            if "No such file or directory" in (exc.stderr or ""):
                return KernelTable(exists=False)
            raise
        return parse_table(text)

    def _run(self, script: list[str]) -> None:
        self.runner(["nft", "-f", "-"], input="\n".join(script) + "\n")

    def apply_full(self, specs: Sequence[RuleSpec]) -> bool:
        sets.check_capacity(len(specs), self.conf, self.name)
        desired = group_elements(specs)
        script = plan_transaction(desired, self.kernel_table(), self.conf)
        if script:
            self._run(script)
        self._counts = {k: len(v) for k, v in desired.items()}
        return bool(script)

    def apply_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec]) -> bool:
        adds = group_elements(added)
        dels = group_elements(removed)
        counts = dict(self._counts)
        for set_key in adds.keys() | dels.keys():
            counts[set_key] = counts.get(set_key, 0) + len(adds.get(set_key, ())) - len(dels.get(set_key, ()))
        new_sets = [k for k in sorted(adds) if k not in self._counts]
        emptied = [k for k in sorted(dels) if counts[k] <= 0]
        table = names.NFT_TABLE
        script = [_add_set(k) for k in new_sets]
        for set_key in sorted(adds):
            script += _elements("add", set_key.name, sorted(adds[set_key]))
        for set_key in sorted(dels):
            if set_key not in emptied:
                script += _elements("delete", set_key.name, sorted(dels[set_key]))
        if new_sets or emptied:
            # The set list changed: rewrite the (short) rule list in the same transaction,
            # new sets before the rules that use them, emptied sets deleted after.
            remaining = sorted(k for k, n in counts.items() if n > 0)
            script.append(f"flush chain {FAMILY} {table} {CHAIN}")
            script += [render_rule(k) for k in remaining]
            script += [f"delete set {FAMILY} {table} {k.name}" for k in emptied]
        try:
            self._run(script)
        except exception.ProcessExecutionError as exc:
            # e.g. someone deleted an element we now delete: the transaction changed
            # nothing; a full apply reads the kernel and repairs everything.
            LOG.warning("nft delta failed (%s); falling back to a full apply", exc)
            gone = set(removed)
            return self.apply_full([s for s in self._rules if s not in gone] +
                                   [s for s in added if s not in self._rules])
        self._counts = {k: n for k, n in counts.items() if n > 0}
        return True

    def teardown(self) -> None:
        with self._lock:
            if self.kernel_table().exists:
                self.runner(["nft", "delete", "table", FAMILY, names.NFT_TABLE])
            self._commit(None, replace={})
            self._generation = None
            self._counts = {}

