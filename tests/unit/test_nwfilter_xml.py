"""nwfilter XML rendering and parsing, as tables (the host sets of ipset mode: tests/unit/test_ipset.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from provfw import exception
from provfw.rules import make_spec
from provfw.virt.firewall import nwfilter_xml as nwx

# (cidr, protocol, from_port, to_port) -> (element, attributes) libvirt must receive
RULE_TABLE = [
    (("203.0.113.0/24", "all"), ("ip", {"srcipaddr": "203.0.113.0", "srcipmask": "24"})),
    (("203.0.113.7", "tcp"), ("tcp", {"srcipaddr": "203.0.113.7", "srcipmask": "32",
                                      "dstportstart": "1", "dstportend": "65535"})),
    (("203.0.113.0/24", "tcp", 80, 90), ("tcp", {"srcipaddr": "203.0.113.0", "srcipmask": "24",
                                                 "dstportstart": "80", "dstportend": "90"})),
    (("203.0.113.0/24", "udp", 53, 53), ("udp", {"srcipaddr": "203.0.113.0", "srcipmask": "24",
                                                 "dstportstart": "53"})),
    (("203.0.113.0/24", "icmp"), ("icmp", {"srcipaddr": "203.0.113.0", "srcipmask": "24"})),
    (("203.0.113.0/24", "icmp", 8), ("icmp", {"srcipaddr": "203.0.113.0", "srcipmask": "24", "type": "8"})),
    (("203.0.113.0/24", "icmp", 3, 1), ("icmp", {"srcipaddr": "203.0.113.0", "srcipmask": "24",
                                                 "type": "3", "code": "1"})),
    (("203.0.113.0/24", "icmp", 0, 0), ("icmp", {"srcipaddr": "203.0.113.0", "srcipmask": "24",
                                                 "type": "0", "code": "0"})),
    (("2001:DB8::/32", "all"), ("ipv6", {"srcipaddr": "2001:db8::", "srcipmask": "32"})),
    (("2001:db8::1", "tcp", 443), ("tcp-ipv6", {"srcipaddr": "2001:db8::1", "srcipmask": "128",
                                                "dstportstart": "443"})),
    (("2001:db8::/48", "udp", 1000, 2000), ("udp-ipv6", {"srcipaddr": "2001:db8::", "srcipmask": "48",
                                                         "dstportstart": "1000", "dstportend": "2000"})),
    (("2001:db8::/48", "icmp"), ("icmpv6", {"srcipaddr": "2001:db8::", "srcipmask": "48"})),
    (("2001:db8::/48", "icmp", 128), ("icmpv6", {"srcipaddr": "2001:db8::", "srcipmask": "48", "type": "128"})),
    (("2001:db8::/48", "icmp", 1, 4), ("icmpv6", {"srcipaddr": "2001:db8::", "srcipmask": "48",
                                                  "type": "1", "code": "4"})),
]

# group (version, protocol, from, to) -> (element, attributes): only protocol "all" can match a set
SET_TABLE = [
    ((4, "all", -1, -1), ("all", {"ipset": "S", "ipsetflags": "src"})),
    ((6, "all", -1, -1), ("all-ipv6", {"ipset": "S", "ipsetflags": "src"})),
]


def _rendered_rule(rule: nwx.FilterRule) -> ET.Element:
    root = ET.fromstring(nwx.render_filter(nwx.provider_filter("nova-provider", [rule])))
    (rule_element,) = root.findall("rule")
    return rule_element


def _assert_provider_rule(rule_element: ET.Element) -> ET.Element:
    assert rule_element.attrib == {"action": "drop", "direction": "in", "priority": "-1000"}
    (child,) = list(rule_element)
    return child


@pytest.mark.parametrize("args,expected", RULE_TABLE, ids=[" ".join(map(str, a)) for a, _ in RULE_TABLE])
def test_each_rule_kind_renders_the_element_and_only_the_attributes_it_needs(args, expected):
    child = _assert_provider_rule(_rendered_rule(nwx.spec_rule(make_spec(*args))))
    assert (child.tag, child.attrib) == expected


@pytest.mark.parametrize("key,expected", SET_TABLE, ids=[str(k) for k, _ in SET_TABLE])
def test_each_group_renders_a_set_match_libvirt_keeps(key, expected):
    child = _assert_provider_rule(_rendered_rule(nwx.group_rule(nwx.GroupKey(*key), "S")))
    assert (child.tag, child.attrib) == expected


def _every_kind_filter(uuid=None) -> nwx.FilterDef:
    rules = [nwx.spec_rule(make_spec(*args)) for args, _ in RULE_TABLE]
    rules += [nwx.group_rule(nwx.GroupKey(*key), "S") for key, _ in SET_TABLE]
    return nwx.provider_filter("nova-provider", rules, uuid)


def test_rendered_filter_parses_back_to_the_same_definition():
    definition = _every_kind_filter("7a3b1c52-9a47-4fd0-9d8c-6f1c7e58a0a1")
    parsed = nwx.parse_filter(nwx.render_filter(definition))
    assert parsed == definition
    assert parsed.same_content(definition)


def test_rendering_never_contains_novas_mistakes():
    text = nwx.render_filter(_every_kind_filter())
    ET.fromstring(text)            # well formed (Nova's version left elements unclosed)
    assert "block" not in text     # libvirt has no action 'block'
    assert "None" not in text      # nor ICMP code='None'
    assert "-1" not in text.replace("-1000", "")   # ANY never leaks out as a port or ICMP value


def test_libvirt_read_back_with_uuid_and_indentation_is_the_same_content():
    ours = nwx.provider_filter("nova-provider", [nwx.group_rule(nwx.GroupKey(4, "all", -1, -1), "pfn4-all-any"),
                                                 nwx.spec_rule(make_spec("2001:db8::/64", "all"))])
    libvirt_says = """<filter name='nova-provider' chain='root'>
  <uuid>2b5c6a4e-0a43-4e1f-9f3e-0d0c5b0a7e11</uuid>
  <rule action='drop' direction='in' priority='-1000'>
    <all ipset='pfn4-all-any' ipsetflags='src'/>
  </rule>
  <rule action='drop' direction='in' priority='-1000'>
    <ipv6 srcipaddr='2001:db8::' srcipmask='64'/>
  </rule>
</filter>
"""
    parsed = nwx.parse_filter(libvirt_says)
    assert parsed.uuid == "2b5c6a4e-0a43-4e1f-9f3e-0d0c5b0a7e11"
    assert parsed.same_content(ours)


LIBVIRT_TCP = ("<filter name='nova-provider' chain='root'><uuid>2b5c6a4e-0a43-4e1f-9f3e-0d0c5b0a7e11</uuid>"
               "<rule action='drop' direction='in' priority='-1000'>"
               "<tcp srcipaddr='192.0.2.0' srcipmask='24' dstportstart='80'/></rule></filter>")


@pytest.mark.parametrize("mutation", [
    lambda x: x.replace("action='drop'", "action='accept'"),
    lambda x: x.replace("direction='in'", "direction='out'"),
    lambda x: x.replace("priority='-1000'", "priority='500'"),
    lambda x: x.replace(" srcipaddr='192.0.2.0' srcipmask='24'", ""),      # what libvirt does to attrs it drops
    lambda x: x.replace("dstportstart='80'", "dstportstart='81'"),
    lambda x: x.replace("priority='-1000'>", "priority='-1000' statematch='false'>"),
    lambda x: x.replace("</filter>", "<filterref filter='allow-arp'/></filter>"),
], ids=["action", "direction", "priority", "dropped-source", "port", "statematch", "filterref"])
def test_any_change_that_alters_matching_is_a_difference(mutation):
    ours = nwx.provider_filter("nova-provider", [nwx.spec_rule(make_spec("192.0.2.0/24", "tcp", 80))])
    assert nwx.parse_filter(LIBVIRT_TCP).same_content(ours)
    assert not nwx.parse_filter(mutation(LIBVIRT_TCP)).same_content(ours)


def test_rules_are_rendered_in_a_stable_order_whatever_the_input_order():
    specs = [make_spec("198.51.100.0/24", "tcp"), make_spec("2001:db8::/32", "all"), make_spec("192.0.2.1", "icmp")]
    assert nwx.rules_for_specs(specs) == nwx.rules_for_specs(reversed(specs))


def test_only_protocol_all_groups_can_be_matched_by_a_set():
    assert nwx.set_matchable(nwx.GroupKey(4, "all", -1, -1)) and nwx.set_matchable(nwx.GroupKey(6, "all", -1, -1))
    for key in (nwx.GroupKey(4, "tcp", 1, 65535), nwx.GroupKey(6, "udp", 53, 53), nwx.GroupKey(4, "icmp", -1, -1)):
        assert not nwx.set_matchable(key)
        with pytest.raises(exception.ConfigError):
            nwx.group_rule(key, "S")


def test_ipset_mode_puts_protocol_all_cidrs_in_one_set_per_family_and_keeps_the_rest_per_cidr():
    specs = [make_spec("10.0.0.0/8"), make_spec("192.0.2.1"), make_spec("2001:db8::/32"),
             make_spec("198.51.100.0/24", "tcp", 22), make_spec("2001:db8:1::/48", "icmp", 128)]
    rules, sets = nwx.provider_rules(specs, True, lambda key: f"pfn{key.version}-{key.protocol}")
    assert sets == {nwx.GroupKey(4, "all", -1, -1): ["10.0.0.0/8", "192.0.2.1/32"],
                    nwx.GroupKey(6, "all", -1, -1): ["2001:db8::/32"]}
    assert rules == (nwx.group_rule(nwx.GroupKey(4, "all", -1, -1), "pfn4-all"),
                     nwx.group_rule(nwx.GroupKey(6, "all", -1, -1), "pfn6-all"),
                     nwx.spec_rule(specs[3]), nwx.spec_rule(specs[4]))
    # Without sets every spec is its own rule.
    assert nwx.provider_rules(specs, False, None) == (nwx.rules_for_specs(specs), {})


def test_groups_collect_cidrs_that_share_family_protocol_and_ports():
    specs = [make_spec("10.0.0.0/8", "tcp"), make_spec("192.0.2.0/24", "tcp"), make_spec("10.0.0.0/8", "udp"),
             make_spec("2001:db8::/32", "tcp"), make_spec("192.0.2.0/24", "tcp", 22)]
    groups = nwx.group_specs(specs)
    assert groups == {
        nwx.GroupKey(4, "tcp", 1, 65535): ["10.0.0.0/8", "192.0.2.0/24"],
        nwx.GroupKey(4, "tcp", 22, 22): ["192.0.2.0/24"],
        nwx.GroupKey(4, "udp", 1, 65535): ["10.0.0.0/8"],
        nwx.GroupKey(6, "tcp", 1, 65535): ["2001:db8::/32"],
    }


# ---------------------------------------------------------------- filterref and binding

INSTANCE_FILTER = """<filter name='nova-instance-42' chain='root'>
  <uuid>0d4b9d5e-5b9a-4c55-8d8a-4a6c3c1c5f10</uuid>
  <filterref filter='nova-base'/>
  <rule action='accept' direction='in' priority='500'><all/></rule>
</filter>"""


def test_add_filterref_puts_the_provider_first_and_keeps_uuid_and_everything_else():
    text = nwx.add_filterref(INSTANCE_FILTER, "nova-provider")
    root = ET.fromstring(text)
    assert [c.tag for c in root] == ["uuid", "filterref", "filterref", "rule"]
    assert root.findtext("uuid") == "0d4b9d5e-5b9a-4c55-8d8a-4a6c3c1c5f10"
    assert [r.get("filter") for r in root.findall("filterref")] == ["nova-provider", "nova-base"]
    assert nwx.parse_filter(text).rules == nwx.parse_filter(INSTANCE_FILTER).rules


def test_add_filterref_is_idempotent():
    once = nwx.add_filterref(INSTANCE_FILTER, "nova-provider")
    assert nwx.add_filterref(once, "nova-provider") is None


def test_binding_document_has_what_libvirt_requires():
    root = ET.fromstring(nwx.render_binding("tap0", "52:54:00:00:00:01", "nova-instance-42", "vm-42",
                                            "0d4b9d5e-5b9a-4c55-8d8a-4a6c3c1c5f10", {"IP": "192.0.2.5"}))
    assert root.tag == "filterbinding"
    assert root.findtext("owner/name") == "vm-42"
    assert root.findtext("owner/uuid") == "0d4b9d5e-5b9a-4c55-8d8a-4a6c3c1c5f10"
    assert root.find("portdev").get("name") == "tap0"
    assert root.find("mac").get("address") == "52:54:00:00:00:01"
    assert root.find("filterref").get("filter") == "nova-instance-42"
    assert root.find("filterref/parameter").attrib == {"name": "IP", "value": "192.0.2.5"}
