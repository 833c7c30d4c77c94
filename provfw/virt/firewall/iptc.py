"""IptcFirewallDriver: the ipset driver's sets, with the chains written through python-iptables.

Design
------
For hosts that run LEGACY iptables (x_tables, ``iptables-legacy``) and want
the chains written through libiptc rather than by ``iptables-restore``.  The
sets are exactly the ``IpsetFirewallDriver``'s (``firewall.ipset``: hash:net
per match key, temp set + swap for rebuilds, one ``ipset restore -exist``
per delta, ``SetsState`` between calls); only the chain step differs: the
``nova-provider`` chain (one ``-m set`` rule per group and the jump to
nova-local) and FORWARD's first-rule jump are computed as data, compared
with ``iptables-legacy-save`` by hash comment, and - when they differ -
written as ONE table commit (``table.autocommit = False`` ...
``table.commit()``): libiptc builds the whole filter table and replaces it
with one ``IPT_SO_SET_REPLACE``, atomically, never rule by rule.

*Namespaces.*  python-iptables has no network-namespace support and keeps
process-global state (libiptc handles, loaded xtables extensions).  The
chain step is therefore a plan ``Command`` that runs a short-lived helper,
this module run as ``python -m provfw.virt.firewall.iptc``, through the
driver's ``Runner``: with ``[compute] dataplane_netns`` set that is ``nsenter
--net=/run/netns/NS -- python -m ...``, so the helper lives in the namespace from its
first instruction and the worker process itself never changes namespace.
The helper reads a JSON request on stdin and prints a JSON answer; a failed
commit exits non-zero, which the runner turns into ``DriverError``.  A
helper costs ~0.1-1 s of start-up per chain write; chain writes happen only
when the set of groups changes or the chain drifted, never for a CIDR added
to an existing group.

*Checks.*  ``plan_check`` fills the ipset driver's scratch sets and asks the
helper to build the group rules into a scratch chain WITHOUT committing
(``action: check``): libiptc and the xtables extensions parse every rule,
the table is never replaced, and the scratch sets are destroyed after.

*Legacy only.*  libiptc speaks the x_tables socket API, so the rules land in
the legacy tables (``iptables-legacy-save`` shows them); on a host whose
``iptables`` is the nf_tables flavour they would be invisible to
``iptables-save`` and to whoever manages FORWARD there - use the ipset or
nftables driver on such hosts.

Thread-safety: as ``IpsetFirewallDriver``; the helper process is per step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Iterable, Mapping

from provfw import names
from provfw.rules import ANY
from provfw.virt.firewall import base, iptables
from provfw.virt.firewall.ipset import IpsetFirewallDriver
from provfw.virt.firewall.sets import MatchKey

LEGACY = iptables.Tools("legacy")


def desired_rules(keys: Iterable[MatchKey], version: int, layout: iptables.ChainLayout, set_name,
                  tail: bool = True) -> list[dict]:
    """The provider chain of one family as plain data the helper turns into libiptc rules.

    ``set_name(key)`` names each group's set.  Comments are the ipset
    driver's (``iptables.set_rule_comment``), so switching between the two
    drivers on one host rewrites nothing.
    """
    rules = []
    for key in sorted(k for k in keys if k.version == version):
        name = set_name(key)
        rule = {"set": name, "target": "DROP", "comment": iptables.set_rule_comment(key, name)}
        if key.protocol in ("tcp", "udp"):
            rule["protocol"] = key.protocol
            rule["dport"] = (str(key.from_port) if key.from_port == key.to_port
                             else f"{key.from_port}:{key.to_port}")
        elif key.protocol == "icmp":
            # python-iptables knows IPv6 ICMP as "icmpv6" (iptables-save prints ipv6-icmp).
            rule["protocol"] = "icmp" if version == 4 else "icmpv6"
            if key.from_port != ANY:
                rule["icmp_type"] = str(key.from_port) + (f"/{key.to_port}" if key.to_port != ANY else "")
        rules.append(rule)
    if tail:
        rules.append({"target": layout.local, "comment": iptables.tail_comment(layout)})
    return rules


def helper_command() -> tuple[str, ...]:
    return (sys.executable, "-m", "provfw.virt.firewall.iptc")


class IptcFirewallDriver(IpsetFirewallDriver):
    """ipset sets + python-iptables chain commits on legacy iptables (see the module docstring)."""

    name = "iptc"

    def _helper_step(self, request: dict, what: str, cleanup: tuple = ()) -> base.Command:
        return base.Command(helper_command(), json.dumps(request), cleanup=cleanup, what=what)

    def _layout_dict(self) -> dict:
        return dataclasses.asdict(self.layout)

    def chain_steps(self, keys: Iterable[MatchKey]) -> tuple[base.Step, ...]:
        keys = list(keys)
        # Reading is cheap with iptables-legacy-save; the helper (python start-up,
        # libiptc) runs only when something must be written.
        tables = iptables.read_tables(self.runner, LEGACY)
        if all(iptables.build_restore(tables[v], iptables.desired_set_chain(keys, v, self.layout, self.naming.name),
                                      self.layout) is None for v in (4, 6)):
            return ()
        request = {"action": "apply", "layout": self._layout_dict(),
                   "families": {str(v): desired_rules(keys, v, self.layout, self.naming.name) for v in (4, 6)}}
        return (self._helper_step(request, "iptc helper: commit nova-provider"),)

    def check_chain_steps(self, keys: Iterable[MatchKey], scratch: Mapping[int, str],
                          cleanup: tuple[tuple[str, ...], ...]) -> tuple[base.Step, ...]:
        if not scratch:
            return ()
        keys = list(keys)
        families = {str(v): desired_rules(keys, v, self.layout, lambda key: scratch[key.version], tail=False)
                    for v in scratch}
        request = {"action": "check", "layout": self._layout_dict(), "families": families}
        return (self._helper_step(request, "iptc helper: check rules (no commit)", cleanup),)

    def removal_steps(self) -> tuple[base.Step, ...]:
        request = {"action": "teardown", "layout": self._layout_dict(), "families": {"4": [], "6": []}}
        return (self._helper_step(request, "iptc helper: remove nova-provider"),)


# --------------------------------------------------------------------------- helper process

def _comment(rule) -> str:
    for match in rule.matches:
        if match.name == "comment":
            value = match.get_all_parameters().get("comment", [""])
            return value[0].strip('"') if value else ""
    return ""


def _build_rule(iptc, version: int, spec: dict):
    rule = iptc.Rule() if version == 4 else iptc.Rule6()
    if spec.get("protocol"):
        rule.protocol = spec["protocol"]
    if spec.get("set"):
        match = rule.create_match("set")
        match.match_set = [spec["set"], "src"]
    if spec.get("dport"):
        if ":" in spec["dport"]:
            match = rule.create_match("multiport")
            match.dports = spec["dport"]
        else:
            match = rule.create_match(spec["protocol"])
            match.dport = spec["dport"]
    if spec.get("icmp_type"):
        if version == 4:
            rule.create_match("icmp").icmp_type = spec["icmp_type"]
        else:
            rule.create_match("icmp6").icmpv6_type = spec["icmp_type"]
    rule.create_match("comment").comment = spec["comment"]
    rule.target = iptc.Target(rule, spec["target"])
    return rule


def _check_family(iptc, version: int, desired: list[dict]) -> None:
    """Build ``desired`` into a scratch chain of a private handle and never commit it."""
    table_cls = iptc.Table if version == 4 else iptc.Table6
    table = table_cls(table_cls.FILTER)
    table.autocommit = False
    table.refresh()
    chains = {chain.name: chain for chain in table.chains}
    chain = chains.get(names.CHECK_CHAIN) or table.create_chain(names.CHECK_CHAIN)
    for spec in desired:
        chain.append_rule(_build_rule(iptc, version, spec))
    # No commit: refresh() drops the handle's changes; the kernel's table was never replaced.
    table.refresh()


def _apply_family(iptc, version: int, layout: dict, desired: list[dict], teardown: bool) -> bool:
    table_cls = iptc.Table if version == 4 else iptc.Table6
    table = table_cls(table_cls.FILTER)
    table.autocommit = False
    table.refresh()
    chains = {chain.name: chain for chain in table.chains}
    provider, local, forward = layout["provider"], layout["local"], layout["forward"]
    forward_rules = chains[forward].rules
    jumps = [i for i, rule in enumerate(forward_rules)
             if _comment(rule) == names.JUMP_COMMENT or rule.target.name == provider]
    if teardown:
        if not jumps and provider not in chains:
            return False
        for index in reversed(jumps):
            chains[forward].delete_rule(forward_rules[index])
        if provider in chains:
            chains[provider].flush()
            table.delete_chain(provider)
        table.commit()
        return True
    chain_ok = provider in chains and [_comment(r) for r in chains[provider].rules] == [r["comment"] for r in desired]
    jump_ok = jumps == [0] and _comment(forward_rules[0]) == names.JUMP_COMMENT
    local_ok = local in chains
    if chain_ok and jump_ok and local_ok:
        return False
    if not local_ok:
        table.create_chain(local)            # never flushed: it belongs to the security groups
    if provider not in chains:
        chain = table.create_chain(provider)
    else:
        chain = chains[provider]
    if not chain_ok:
        chain.flush()
        for spec in desired:
            chain.append_rule(_build_rule(iptc, version, spec))
    if not jump_ok:
        for index in reversed(jumps):
            chains[forward].delete_rule(forward_rules[index])
        jump = iptc.Rule() if version == 4 else iptc.Rule6()
        jump.create_match("comment").comment = names.JUMP_COMMENT
        jump.target = iptc.Target(jump, provider)
        chains[forward].insert_rule(jump, 0)
    table.commit()                           # ONE atomic table replace
    return True


def helper_main() -> int:
    """Entry point of the helper process: JSON request on stdin, JSON answer on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        import iptc
    except Exception as exc:                   # ImportError, or libiptc failing to load
        print(f"python-iptables unavailable: {exc}", file=sys.stderr)
        return 2
    action = request["action"]
    changed = False
    try:
        for version in (4, 6):
            desired = request["families"].get(str(version), [])
            if action == "check":
                if desired:
                    _check_family(iptc, version, desired)
                continue
            changed = _apply_family(iptc, version, request["layout"], desired, action == "teardown") or changed
    except Exception as exc:                   # iptc.IPTCError and friends: the commit did not happen
        print(f"iptc helper failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(helper_main())
