"""Pure functions for libvirt nwfilter XML: render provider rules, parse filters back, compare.

Nothing here talks to libvirtd; ``provfw.virt.firewall.nwfilter`` feeds these
functions the XML libvirt holds and defines what they return.  Every document is built
with ``xml.etree.ElementTree`` (never by string concatenation), so it is well
formed by construction and attribute values are escaped.

Layout of the provider filter (see docs/nwfilter.md)::

    <filter name='nova-provider' chain='root'>
      <uuid>...</uuid>                                  kept on every redefinition
      <rule action='drop' direction='in' priority='-1000'>
        <tcp srcipaddr='203.0.113.0' srcipmask='24' dstportstart='1' dstportend='65535'/>
      </rule>
      ...
    </filter>

* ``action='drop'``: libvirt knows drop/reject/accept/return/continue; Nova's
  ``'block'`` does not exist and made libvirt refuse the filter.
* ``direction='in'`` is traffic travelling TO the instance (leaving the bridge
  through the instance's tap).  libvirt then also drops the instance's
  packets addressed back to the CIDR (the reverse match it generates for
  every iptables-level ``in`` rule).  Verified with real packets in
  tests/functional/test_nwfilter.py: ``out`` never matches the attacker.
* ``priority='-1000'``, the lowest libvirt allows: libvirt sorts every rule
  of the instance's filter tree by priority (default 500; the mac/ipv4/ipv6/
  arp sub-chains sit at -800 .. -400), so provider drops come before any
  security-group accept.
* Element per (family, protocol): ``ip``/``ipv6`` (no protocol: every
  protocol; ebtables level), ``tcp``/``udp``/``icmp`` and ``tcp-ipv6``/
  ``udp-ipv6``/``icmpv6`` (iptables level).  ICMP ``type``/``code`` appear
  only when given (Nova wrote ``code='None'``).

In ipset mode each protocol-``all`` group (one per family) becomes ONE rule
``<all ipset='pfn4-all-any' ipsetflags='src'/>`` (``all-ipv6`` for IPv6)
matching a host ``hash:net`` set; every other spec stays one rule per CIDR.

Why only protocol ``all``: libvirt (9.0, Debian 12) cannot match an ipset on
any other element.  Given ``ipset`` and ``ipsetflags`` on ``tcp``/``udp``/
``icmp``/``*-ipv6`` it silently DROPS both (``virNWFilterRuleDefFixupIPSet``
clears them), turning "drop this set's tcp/80" into "drop everyone's tcp/80";
given ``ipset`` alone it stores ``ipsetflags='src'`` but every port bound to
the filter then fails to instantiate ("Unexpected enum value 0 for
virNWFilterAttrDataType").  ``all``/``all-ipv6`` are not affected.  Both
failures were reproduced against the real libvirtd; the driver also reads
every definition back and refuses one that libvirt stored differently.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import xml.etree.ElementTree as ET
from typing import Callable, Iterable, Sequence

from provfw import exception
from provfw.rules import ANY, RuleSpec
from provfw.virt.firewall.sets import MatchKey, match_key

PROVIDER_RULE_PRIORITY = -1000      # libvirt's lowest: evaluated before every other rule of the instance
DEFAULT_RULE_PRIORITY = 500         # what libvirt assumes when a rule has no priority
ACTION = "drop"
DIRECTION = "in"                    # towards the instance

# (ip version, protocol) -> element name, when matching a CIDR per rule.
RULE_ELEMENTS = {
    (4, "all"): "ip", (4, "tcp"): "tcp", (4, "udp"): "udp", (4, "icmp"): "icmp",
    (6, "all"): "ipv6", (6, "tcp"): "tcp-ipv6", (6, "udp"): "udp-ipv6", (6, "icmp"): "icmpv6",
}
# (ip version, protocol) -> element name, when matching a host ipset: only the iptables-level "all"
# elements, the only ones on which libvirt 9.0 keeps and instantiates an ipset match (module docstring).
SET_ELEMENTS = {(4, "all"): "all", (6, "all"): "all-ipv6"}


@dataclasses.dataclass(frozen=True, order=True)
class FilterRule:
    """One ``<rule>`` with its single protocol element, in a canonical, comparable form."""

    element: str
    attrs: tuple[tuple[str, str], ...]
    action: str = ACTION
    direction: str = DIRECTION
    priority: int = PROVIDER_RULE_PRIORITY
    rule_attrs: tuple[tuple[str, str], ...] = ()     # anything else on <rule> (statematch, ...)


@dataclasses.dataclass(frozen=True)
class FilterDef:
    """A parsed ``<filter>``: what decides the packets it matches, plus its identity."""

    name: str
    uuid: str | None = None
    chain: str = "root"
    priority: str | None = None
    rules: tuple[FilterRule, ...] = ()
    filterrefs: tuple[str, ...] = ()

    def same_content(self, other: "FilterDef") -> bool:
        """Equal matching behaviour (name and UUID aside): no redefinition needed."""
        return (self.chain, self.priority, self.rules, self.filterrefs) == \
               (other.chain, other.priority, other.rules, other.filterrefs)


# Specs that differ only in their CIDR share one ipset and one nwfilter rule:
# the same grouping the set-based iptables/nft drivers use.
GroupKey = MatchKey
group_key = match_key


def _match_attrs(protocol: str, from_port: int, to_port: int) -> list[tuple[str, str]]:
    """Port range (tcp/udp) or ICMP type/code attributes, only those that are set."""
    if protocol in ("tcp", "udp"):
        attrs = [("dstportstart", str(from_port))]
        if to_port != from_port:
            attrs.append(("dstportend", str(to_port)))
        return attrs
    if protocol == "icmp":
        attrs = []
        if from_port != ANY:
            attrs.append(("type", str(from_port)))
            if to_port != ANY:
                attrs.append(("code", str(to_port)))
        return attrs
    return []


def spec_rule(spec: RuleSpec, priority: int = PROVIDER_RULE_PRIORITY) -> FilterRule:
    """The nwfilter rule that drops ``spec``'s traffic towards the instance (rules mode)."""
    network = spec.network
    attrs = [("srcipaddr", str(network.network_address)), ("srcipmask", str(network.prefixlen))]
    attrs += _match_attrs(spec.protocol, spec.from_port, spec.to_port)
    return FilterRule(RULE_ELEMENTS[(spec.version, spec.protocol)], tuple(sorted(attrs)), priority=priority)


def set_matchable(key: GroupKey) -> bool:
    """Whether libvirt can match this group through a host ipset (see SET_ELEMENTS)."""
    return (key.version, key.protocol) in SET_ELEMENTS


def group_rule(key: GroupKey, set_name: str, priority: int = PROVIDER_RULE_PRIORITY) -> FilterRule:
    """The nwfilter rule that drops a group's traffic whose source is in host ipset ``set_name``."""
    if not set_matchable(key):
        raise exception.ConfigError(f"libvirt cannot match an ipset for protocol {key.protocol}")
    attrs = (("ipset", set_name), ("ipsetflags", "src"))
    return FilterRule(SET_ELEMENTS[(key.version, key.protocol)], attrs, priority=priority)


def rules_for_specs(specs: Iterable[RuleSpec], priority: int = PROVIDER_RULE_PRIORITY) -> tuple[FilterRule, ...]:
    """Rules mode: one rule per spec, in a stable order (sorted specs)."""
    return tuple(spec_rule(spec, priority) for spec in sorted(set(specs)))


def provider_rules(specs: Iterable[RuleSpec], use_sets: bool, set_name: Callable[[GroupKey], str],
                   priority: int = PROVIDER_RULE_PRIORITY
                   ) -> tuple[tuple[FilterRule, ...], dict[GroupKey, list[str]]]:
    """The provider filter's rules and, with ``use_sets``, the groups matched through host sets.

    Set-matchable groups (protocol ``all``) become one rule each, naming the
    set ``set_name(key)``; every other spec stays one rule per CIDR.  Returns
    (rules, {group key: its CIDRs, sorted}) - the caller keeps the sets.
    """
    specs = sorted(set(specs))
    if not use_sets:
        return rules_for_specs(specs, priority), {}
    rules, groups = [], {}
    for key, cidrs in group_specs(specs).items():
        if set_matchable(key):
            groups[key] = cidrs
            rules.append(group_rule(key, set_name(key), priority))
    per_cidr = [spec for spec in specs if not set_matchable(group_key(spec))]
    return tuple(rules) + rules_for_specs(per_cidr, priority), groups


def group_specs(specs: Iterable[RuleSpec]) -> dict[GroupKey, list[str]]:
    """Group the specs' CIDRs by (family, protocol, ports); each list sorted."""
    groups: dict[GroupKey, set[str]] = {}
    for spec in specs:
        groups.setdefault(group_key(spec), set()).add(spec.cidr)
    return {key: sorted(cidrs) for key, cidrs in sorted(groups.items())}


# ---------------------------------------------------------------- rendering

def _rule_element(rule: FilterRule) -> ET.Element:
    element = ET.Element("rule", {"action": rule.action, "direction": rule.direction,
                                  "priority": str(rule.priority), **dict(rule.rule_attrs)})
    ET.SubElement(element, rule.element, dict(rule.attrs))
    return element


def render_filter(definition: FilterDef) -> str:
    """The ``<filter>`` document for ``nwfilterDefineXML``; filterrefs first, then rules."""
    attrs = {"name": definition.name, "chain": definition.chain}
    if definition.priority is not None:
        attrs["priority"] = definition.priority
    root = ET.Element("filter", attrs)
    if definition.uuid:
        ET.SubElement(root, "uuid").text = definition.uuid
    for ref in definition.filterrefs:
        ET.SubElement(root, "filterref", {"filter": ref})
    for rule in definition.rules:
        root.append(_rule_element(rule))
    return ET.tostring(root, encoding="unicode")


def provider_filter(name: str, rules: Sequence[FilterRule], uuid: str | None = None) -> FilterDef:
    return FilterDef(name=name, uuid=uuid, chain="root", rules=tuple(rules))


def render_binding(portdev: str, mac: str, filter_name: str, owner_name: str, owner_uuid: str,
                   parameters: dict[str, str] | None = None) -> str:
    """A ``<filterbinding>`` for ``nwfilterBindingCreateXML``: bind ``filter_name`` to a tap/port."""
    root = ET.Element("filterbinding")
    owner = ET.SubElement(root, "owner")
    ET.SubElement(owner, "name").text = owner_name
    ET.SubElement(owner, "uuid").text = owner_uuid
    ET.SubElement(root, "portdev", {"name": portdev})
    ET.SubElement(root, "mac", {"address": mac})
    ref = ET.SubElement(root, "filterref", {"filter": filter_name})
    for key, value in sorted((parameters or {}).items()):
        ET.SubElement(ref, "parameter", {"name": key, "value": value})
    return ET.tostring(root, encoding="unicode")


# ---------------------------------------------------------------- parsing

def _canonical_value(name: str, value: str) -> str:
    if name in ("srcipaddr", "dstipaddr"):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value            # a $VARIABLE or something foreign: compare verbatim
    return value


def _parse_rule(element: ET.Element) -> FilterRule:
    children = list(element)
    if len(children) != 1:
        raise exception.DriverError(f"nwfilter rule with {len(children)} protocol elements: "
                                    f"{ET.tostring(element, encoding='unicode')[:200]}")
    child = children[0]
    attrs = {k: _canonical_value(k, v) for k, v in child.attrib.items()}
    rule_attrs = {k: v for k, v in element.attrib.items() if k not in ("action", "direction", "priority")}
    return FilterRule(
        element=child.tag,
        attrs=tuple(sorted(attrs.items())),
        action=element.get("action", ""),
        direction=element.get("direction", ""),
        priority=int(element.get("priority", DEFAULT_RULE_PRIORITY)),
        rule_attrs=tuple(sorted(rule_attrs.items())),
    )


def parse_filter(xml: str) -> FilterDef:
    """Parse ``virNWFilter.XMLDesc()`` (or our own rendering) into a ``FilterDef``."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise exception.DriverError(f"malformed nwfilter XML: {exc}") from None
    if root.tag != "filter":
        raise exception.DriverError(f"expected <filter>, got <{root.tag}>")
    uuid = root.findtext("uuid")
    rules, refs = [], []
    for child in root:
        if child.tag == "rule":
            rules.append(_parse_rule(child))
        elif child.tag == "filterref":
            refs.append(child.get("filter", ""))
    return FilterDef(name=root.get("name", ""), uuid=uuid.strip() if uuid else None,
                     chain=root.get("chain", "root"), priority=root.get("priority"),
                     rules=tuple(rules), filterrefs=tuple(refs))


def add_filterref(xml: str, filter_name: str) -> str | None:
    """Return ``xml`` with ``<filterref filter=filter_name/>`` added, or None if it already has one.

    The reference goes first, right after ``<uuid>``, so provider rules come
    first even among rules of equal priority; everything else (UUID included)
    is kept as libvirt returned it.
    """
    root = ET.fromstring(xml)
    if any(ref.get("filter") == filter_name for ref in root.findall("filterref")):
        return None
    position = 0
    for index, child in enumerate(list(root)):
        if child.tag == "uuid":
            position = index + 1
    ref = ET.Element("filterref", {"filter": filter_name})
    ref.tail = root.text
    root.insert(position, ref)
    return ET.tostring(root, encoding="unicode")
