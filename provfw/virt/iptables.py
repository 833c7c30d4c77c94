"""Pure functions for the iptables dataplane: render desired chains, parse
``iptables-save``, and compute the one ``iptables-restore --noflush``
transaction that turns what the kernel holds into what is desired.

Nothing here runs a command; ``provfw.virt.firewall.IptablesFirewallDriver``
feeds these functions the kernel's state and writes their output.

Every rule provfw writes carries ``-m comment --comment provfw:<hash>``; the
diff compares those comments, never iptables-save's spelling of a rule, so a
different iptables version cannot cause a spurious rewrite.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from provfw import names, rules as rules_mod
from provfw.rules import ANY, RuleSpec


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


__all__ = ["ChainLayout", "TableState", "parse_save", "render_drop_rule", "desired_provider_rules",
           "build_restore", "build_removal", "rules_mod"]
