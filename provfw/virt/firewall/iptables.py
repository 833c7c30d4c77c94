"""iptables: the pure functions every iptables-based driver shares, the tool
names, and ``IptablesFirewallDriver`` (the seed's linear chain).

Design
------
Pure functions render desired chains, parse ``iptables-save`` and compute
the one ``iptables-restore --noflush`` transaction per family that turns
what the kernel holds into what is desired (``build_restore``); nothing
here but the driver runs a command.  The set-based drivers
(``firewall.ipset``, ``firewall.iptc``) render their per-group rules with
``set_drop_rule`` and write their chains with the same ``build_restore``.

Every rule provfw writes carries ``-m comment --comment provfw:<hash>``; the
diff compares those comments, never iptables-save's spelling of a rule, so a
different iptables version cannot cause a spurious rewrite, and a second
apply with no change writes nothing.

Kernel layout (``ChainLayout``, names from ``[iptables]``)::

    filter FORWARD:  -m comment --comment provfw:jump -j nova-provider   (always the first rule)
    nova-provider:   -s CIDR [-p ...] -m comment --comment provfw:<hash> -j DROP ...  then  -j nova-local
    nova-local:      created empty when absent; never declared, flushed or edited when present

The provider chain is re-declared inside the restore transaction (which
empties it there) and refilled: the kernel swaps old for new contents at
COMMIT, so no packet ever sees a half-built chain (never fail open).  The
jump is FORWARD's first rule, so established connections from a newly
blocked source are cut too.

``IptablesFirewallDriver`` keeps no bookkeeping: every full plan reads both
families' tables and writes only the family that differs.  It has no delta
(``plan_delta`` is the base class's ``None``): one rule per blocked network
means every change rewrites the chain, which is what the set-based drivers
exist for.  ``plan_check`` runs ``ip[6]tables-restore --test`` of the specs
rendered into the scratch chain ``names.CHECK_CHAIN``: the tools parse every
rule and commit nothing.

Thread-safety: the pure functions are stateless; the driver serialises its
plans and writes on ``PlannedFirewallDriver``'s locks.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Collection, Iterable, Mapping, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import names, runner as runner_mod
from provfw.rules import ANY, RuleSpec
from provfw.virt.firewall import base
from provfw.virt.firewall.sets import MatchKey


@dataclasses.dataclass(frozen=True)
class ChainLayout:
    """Names of the chains provfw owns or touches."""

    provider: str = "nova-provider"
    local: str = "nova-local"
    forward: str = "FORWARD"

    def __post_init__(self):
        for name in (self.provider, self.local, self.forward):
            names.check_chain_name(name)


@dataclasses.dataclass
class TableState:
    """What ``iptables-save -t filter`` says about the chains provfw cares about."""

    chains: set[str] = dataclasses.field(default_factory=set)
    rules: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def comments(self, chain: str) -> list[str]:
        """The provfw comment of each rule in ``chain``, in order ('' for foreign rules)."""
        return [comment_of(rule) for rule in self.rules.get(chain, [])]


_COMMENT_RE = re.compile(r'--comment\s+(?:"(provfw:[^"]*)"|(provfw:\S+))')


def comment_of(rule: str) -> str:
    match = _COMMENT_RE.search(rule)
    if not match:
        return ""
    return match.group(1) or match.group(2)


def parse_save(text: str, table: str = "filter") -> TableState:
    """Parse the ``table`` section of iptables-save output."""
    state = TableState()
    in_table = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_table = line[1:].strip() == table
            continue
        if not in_table:
            continue
        if line.startswith(":"):
            chain = line[1:].split()[0]
            state.chains.add(chain)
            state.rules.setdefault(chain, [])
        elif line.startswith("-A "):
            chain = line.split()[1]
            state.rules.setdefault(chain, []).append(line)
        elif line.startswith("COMMIT"):
            in_table = False
    return state


def _port_match(spec: RuleSpec, version: int) -> list[str]:
    proto = spec.protocol
    if proto in ("tcp", "udp"):
        if spec.from_port == spec.to_port:
            return ["-p", proto, "-m", proto, "--dport", str(spec.from_port)]
        return ["-p", proto, "-m", "multiport", "--dports", f"{spec.from_port}:{spec.to_port}"]
    if proto == "icmp":
        if version == 6:
            match = ["-p", "ipv6-icmp"]
            if spec.from_port != ANY:
                code = f"/{spec.to_port}" if spec.to_port != ANY else ""
                match += ["-m", "icmp6", "--icmpv6-type", f"{spec.from_port}{code}"]
            return match
        match = ["-p", "icmp"]
        if spec.from_port != ANY:
            code = f"/{spec.to_port}" if spec.to_port != ANY else ""
            match += ["-m", "icmp", "--icmp-type", f"{spec.from_port}{code}"]
        return match
    return []


def rule_hash(spec: RuleSpec) -> str:
    return names.rule_comment("drop", spec.cidr, spec.protocol, spec.from_port, spec.to_port)


def render_drop_rule(chain: str, spec: RuleSpec) -> str:
    """One ``-A`` line that drops ``spec``'s traffic, tagged with its hash comment."""
    # Every token is a validated chain name, CIDR, number or hex comment, so
    # none needs shell-style quoting (quoting 100k rules cost a second).
    return " ".join(["-A", chain, "-s", spec.cidr, *_port_match(spec, spec.version),
                     "-m", "comment", "--comment", rule_hash(spec), "-j", "DROP"])


def tail_comment(layout: ChainLayout) -> str:
    return names.rule_comment("tail", layout.provider, layout.local)


def desired_provider_rules(specs: Iterable[RuleSpec], version: int, layout: ChainLayout) -> list[str]:
    """The full content of the provider chain for one address family, in a stable order."""
    lines = [render_drop_rule(layout.provider, spec) for spec in sorted(s for s in specs if s.version == version)]
    lines.append(f"-A {layout.provider} -m comment --comment {tail_comment(layout)} -j {layout.local}")
    return lines


def jump_rule(layout: ChainLayout) -> str:
    return f"-m comment --comment {names.JUMP_COMMENT} -j {layout.provider}"


def _is_our_jump(rule: str, layout: ChainLayout) -> bool:
    return comment_of(rule) == names.JUMP_COMMENT or rule.rstrip().endswith(f"-j {layout.provider}")


def build_restore(state: TableState, desired: Sequence[str], layout: ChainLayout) -> str | None:
    """The restore transaction that brings ``state`` to ``desired``; ``None`` when nothing differs.

    * The provider chain is re-declared (which empties it inside the
      transaction) and refilled: the kernel swaps old for new contents at
      COMMIT, so no packet ever sees a half-built chain.
    * The local chain is created empty only when absent; an existing one is
      never declared, because declaring a chain under --noflush flushes it.
    * The forward chain's first rule must be our jump and there must be no
      other; stray copies are deleted by number, highest first.
    """
    desired_comments = [comment_of(line) for line in desired]
    chain_ok = layout.provider in state.chains and state.comments(layout.provider) == desired_comments
    forward = state.rules.get(layout.forward, [])
    jump_positions = [i + 1 for i, rule in enumerate(forward) if _is_our_jump(rule, layout)]
    jump_ok = jump_positions == [1] and comment_of(forward[0]) == names.JUMP_COMMENT
    local_ok = layout.local in state.chains
    if chain_ok and jump_ok and local_ok:
        return None

    out = ["*filter"]
    if not chain_ok:
        out.append(f":{layout.provider} - [0:0]")
    if not local_ok:
        out.append(f":{layout.local} - [0:0]")
    if not chain_ok:
        out.extend(desired)
    if not jump_ok:
        for position in sorted(jump_positions, reverse=True):
            out.append(f"-D {layout.forward} {position}")
        out.append(f"-I {layout.forward} 1 {jump_rule(layout)}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def build_removal(state: TableState, layout: ChainLayout) -> str | None:
    """The transaction that removes provfw's jump and chain (``provfw-manage dataplane teardown``)."""
    forward = state.rules.get(layout.forward, [])
    positions = [i + 1 for i, rule in enumerate(forward) if _is_our_jump(rule, layout)]
    if not positions and layout.provider not in state.chains:
        return None
    out = ["*filter"]
    out.extend(f"-D {layout.forward} {p}" for p in sorted(positions, reverse=True))
    if layout.provider in state.chains:
        out.append(f":{layout.provider} - [0:0]")
        out.append(f"-X {layout.provider}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def count_drop_rules(state: TableState, layout: ChainLayout) -> int:
    return sum(1 for c in state.comments(layout.provider) if c and c != tail_comment(layout))


# --------------------------------------------------------------------------- set rules (ipset, iptc)

def set_rule_comment(key: MatchKey, set_name: str) -> str:
    """The hash comment of a group's set rule (the iptc helper writes the same, so switching rewrites nothing)."""
    return names.rule_comment("set-drop", set_name, *dataclasses.astuple(key))


def set_drop_rule(chain: str, key: MatchKey, set_name: str) -> str:
    """The one ``-A`` line that drops a group's sources: ``-m set --match-set NAME src`` plus the group's ports."""
    # _port_match renders the protocol/port part exactly as the linear chain does.
    probe = RuleSpec("0.0.0.0/0" if key.version == 4 else "::/0", key.protocol, key.from_port, key.to_port)
    return " ".join(["-A", chain, *_port_match(probe, key.version), "-m", "set", "--match-set", set_name, "src",
                     "-m", "comment", "--comment", set_rule_comment(key, set_name), "-j", "DROP"])


def desired_set_chain(keys: Iterable[MatchKey], version: int, layout: ChainLayout,
                      set_name: Callable[[MatchKey], str]) -> list[str]:
    """The provider chain of one family for set-based drivers: one set rule per group, then the tail."""
    lines = [set_drop_rule(layout.provider, key, set_name(key)) for key in sorted(keys) if key.version == version]
    lines.append(f"-A {layout.provider} -m comment --comment {tail_comment(layout)} -j {layout.local}")
    return lines


def check_transaction(rules: Sequence[str]) -> str:
    """A restore input that declares the scratch check chain and appends ``rules`` (``-A provfw-check ...``).

    Meant for ``restore --test`` only: the tool parses every line, loads
    every match, and commits nothing.
    """
    return "\n".join(["*filter", f":{names.CHECK_CHAIN} - [0:0]", *rules, "COMMIT"]) + "\n"


# --------------------------------------------------------------------------- the tools

@dataclasses.dataclass(frozen=True)
class Tools:
    """The iptables programs of one host: ``ip[6]tables[-legacy|-nft]-save`` / ``-restore``.

    ``backend`` is ``[iptables] backend``: ``auto`` uses the host's
    alternative (``iptables-restore``), ``nft``/``legacy`` name the flavour.
    ``wait_seconds`` is passed as ``--wait`` (the xtables lock).
    """

    backend: str = "auto"
    wait_seconds: int = 10

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> "Tools":
        return cls(conf.iptables.backend, conf.iptables.wait_seconds)

    def program(self, version: int, action: str) -> str:
        base_name = "iptables" if version == 4 else "ip6tables"
        flavour = "" if self.backend == "auto" else f"-{self.backend}"
        return f"{base_name}{flavour}-{action}"

    def save(self, version: int) -> tuple[str, ...]:
        return (self.program(version, "save"), "-t", "filter")

    def restore(self, version: int, test: bool = False) -> tuple[str, ...]:
        """``--noflush --wait N`` (and ``--test``: parse everything, commit nothing)."""
        return (self.program(version, "restore"), *(("--test",) if test else ()), "--noflush",
                "--wait", str(self.wait_seconds))


def read_tables(runner: runner_mod.Runner, tools: Tools) -> dict[int, TableState]:
    """Both families' filter tables as the kernel holds them now (two ``-save`` runs)."""
    return {version: parse_save(runner(list(tools.save(version)))) for version in (4, 6)}


def chain_steps(tables: Mapping[int, TableState], desired: Mapping[int, Sequence[str]], layout: ChainLayout,
                tools: Tools) -> tuple[base.Command, ...]:
    """One restore per family whose table differs from ``desired`` (version -> provider chain lines)."""
    steps = []
    for version in (4, 6):
        restore = build_restore(tables[version], desired[version], layout)
        if restore is not None:
            steps.append(base.Command(tools.restore(version), restore, what=f"{tools.program(version, 'restore')}"))
    return tuple(steps)


def removal_steps(tables: Mapping[int, TableState], layout: ChainLayout, tools: Tools) -> tuple[base.Command, ...]:
    """The transactions that remove provfw's jump and provider chain from both families."""
    steps = []
    for version in (4, 6):
        removal = build_removal(tables[version], layout)
        if removal is not None:
            steps.append(base.Command(tools.restore(version), removal, what=f"remove {layout.provider} (IPv{version})"))
    return tuple(steps)


def layout_from_conf(conf: cfg.ConfigOpts) -> ChainLayout:
    return ChainLayout(conf.iptables.provider_chain, conf.iptables.local_chain, conf.iptables.forward_chain)


# --------------------------------------------------------------------------- the linear driver

@dataclasses.dataclass(frozen=True)
class LinearState:
    """What the linear chain needs between calls: nothing but how many rules it holds."""

    rules: int


class IptablesFirewallDriver(base.PlannedFirewallDriver):
    """The seed's layout: FORWARD -> nova-provider (one DROP per rule ... -j nova-local), IPv4 and IPv6.

    Each full plan reads ``iptables-save -t filter`` of both families and
    writes only a family that differs, as ONE ``iptables-restore --noflush``
    transaction.  Every change is a full plan (no delta).
    """

    name = "iptables"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None):
        super().__init__(conf, runner)
        self.layout = layout_from_conf(conf)
        self.tools = Tools.from_conf(conf)

    def plan_full(self, desired: Collection[RuleSpec]) -> base.Plan:
        tables = read_tables(self.runner, self.tools)
        wanted = {version: desired_provider_rules(desired, version, self.layout) for version in (4, 6)}
        return base.Plan(LinearState(len(desired)), chains=chain_steps(tables, wanted, self.layout, self.tools))

    def plan_check(self, specs: Collection[RuleSpec]) -> base.Plan:
        steps = []
        for version in (4, 6):
            rules = [render_drop_rule(names.CHECK_CHAIN, s) for s in specs if s.version == version]
            if rules:
                steps.append(base.Command(self.tools.restore(version, test=True), check_transaction(rules),
                                          what=f"{self.tools.program(version, 'restore')} --test"))
        return base.Plan(None, chains=tuple(steps), mode="check")

    def teardown(self) -> None:
        """Remove the jump and the provider chain from both families (nova-local stays)."""
        with self.applying():
            tables = read_tables(self.runner, self.tools)
            base.execute(base.Plan(None, chains=removal_steps(tables, self.layout, self.tools)), self.runner)
