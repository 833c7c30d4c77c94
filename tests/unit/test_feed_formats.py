"""Block-list formats (provfw.feeds.formats) and non-global sources (provfw.rules.non_global_overlap).

The samples under tests/data/feeds/ are written for these tests in the layout of the published lists, with
documentation-range addresses; none is a copy of a published list.
"""

from __future__ import annotations

import codecs
import gc
import gzip
import ipaddress
import pathlib
import pickle
import time

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from provfw import exception, rules
from provfw.feeds import formats
from provfw.feeds.formats import Entry, detect_format, parse

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "feeds"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def found(parsed: formats.Parsed) -> list[tuple[int, str]]:
    return [(entry.line, entry.network.with_prefixlen) for entry in parsed.entries]


def refusals(parsed: formats.Parsed) -> list[tuple[int, str]]:
    return [(item.line, item.value) for item in parsed.refused]


# --------------------------------------------------------------------------- the cases the issue reports


def test_a_spamhaus_drop_file_imports_every_entry_and_refuses_no_header_line():
    text = ("; Spamhaus DROP List 2026/08/22 - (c) 2026 The Spamhaus Project SLC\n"
            "; https://www.spamhaus.org/drop/drop.txt\n"
            "; Last-Modified: Sat, 22 Aug 2026 05:17:40 GMT\n"
            "; Expires: Sat, 22 Aug 2026 06:42:07 GMT\n"
            "192.0.2.0/24 ; SBL000001\n"
            "198.51.100.0/25 ; SBL000002\n"
            "198.51.100.128/26 ; SBL000003\n"
            "203.0.113.0/24\n")
    parsed = parse(text)
    assert parsed.format == "spamhaus"
    assert found(parsed) == [(5, "192.0.2.0/24"), (6, "198.51.100.0/25"), (7, "198.51.100.128/26"),
                             (8, "203.0.113.0/24")]
    assert parsed.refused == []
    assert parsed.lines == 8


@pytest.mark.parametrize("data", ["\ufeff192.0.2.10\r\n192.0.2.11\r\n", b"\xef\xbb\xbf192.0.2.10\r\n192.0.2.11\r\n"],
                         ids=["text", "bytes"])
def test_a_byte_order_mark_does_not_cost_the_first_entry(data):
    parsed = parse(data)
    assert found(parsed) == [(1, "192.0.2.10/32"), (2, "192.0.2.11/32")]
    assert parsed.refused == []


def test_a_range_becomes_the_minimal_cidrs_covering_it():
    parsed = parse("198.51.100.5-198.51.100.9\n")
    assert found(parsed) == [(1, "198.51.100.5/32"), (1, "198.51.100.6/31"), (1, "198.51.100.8/31")]
    assert parsed.refused == []


def test_firehol_level1_as_published_contains_the_networks_a_cloud_must_not_block():
    parsed = parse(sample("firehol-level1.netset"))
    assert parsed.format == "plain" and parsed.refused == []
    refused = {}
    for entry in parsed.entries:
        hit = rules.non_global_overlap(entry.network)
        if hit is not None:
            refused[entry.network.with_prefixlen] = hit.network.with_prefixlen
    # The five the issue names (DHCP from 0.0.0.0, the metadata service, tenant traffic) and the rest of
    # the bogons level1 carries.
    assert refused == {
        "0.0.0.0/8": "0.0.0.0/8", "169.254.0.0/16": "169.254.0.0/16", "10.0.0.0/8": "10.0.0.0/8",
        "172.16.0.0/12": "172.16.0.0/12", "192.168.0.0/16": "192.168.0.0/16",
        "100.64.0.0/10": "100.64.0.0/10", "127.0.0.0/8": "127.0.0.0/8", "224.0.0.0/3": "224.0.0.0/4",
    }
    kept = [e.network.with_prefixlen for e in parsed.entries if e.network.with_prefixlen not in refused]
    assert kept == ["192.0.2.0/24", "198.51.100.0/24", "198.18.0.0/15", "203.0.113.7/32"]


# --------------------------------------------------------------------------- each format, from its sample

SAMPLES = [
    # (file, column, format detected, [(line, network)])
    ("spamhaus-drop.txt", None, "spamhaus",
     [(5, "192.0.2.0/24"), (6, "198.51.100.0/25"), (7, "198.51.100.128/26"), (8, "203.0.113.0/24")]),
    ("spamhaus-edrop.txt", None, "spamhaus", [(6, "198.51.100.192/27"), (7, "203.0.113.128/25")]),
    ("spamhaus-dropv6.txt", None, "spamhaus", [(5, "2001:db8:1000::/36"), (6, "2001:db8:2000::/48")]),
    ("firehol-level1.netset", None, "plain",
     [(26, "0.0.0.0/8"), (27, "10.0.0.0/8"), (28, "100.64.0.0/10"), (29, "127.0.0.0/8"), (30, "169.254.0.0/16"),
      (31, "172.16.0.0/12"), (32, "192.0.2.0/24"), (33, "192.168.0.0/16"), (34, "198.51.100.0/24"),
      (35, "198.18.0.0/15"), (36, "203.0.113.7/32"), (37, "224.0.0.0/3")]),
    ("ipsum.txt", None, "ipsum",
     [(8, "203.0.113.77/32"), (9, "198.51.100.23/32"), (10, "192.0.2.200/32"), (11, "203.0.113.78/32"),
      (12, "198.51.100.24/32"), (13, "192.0.2.201/32")]),
    ("dshield-block.txt", None, "dshield", [(22, "203.0.113.0/24"), (23, "198.51.100.0/24"), (24, "192.0.2.0/24")]),
    ("siem-export.csv", "src_ip", "csv",
     [(2, "203.0.113.45/32"), (3, "198.51.100.17/32"), (4, "2001:db8:a::25/128"), (6, "192.0.2.130/32")]),
    ("plain-mixed.txt", None, "plain",
     [(3, "203.0.113.9/32"), (4, "198.51.100.5/32"), (4, "198.51.100.6/31"), (4, "198.51.100.8/31"),
      (5, "192.0.2.0/25"), (7, "192.0.2.200/29"), (8, "2001:db8:bad::/48"), (9, "2001:db8:f00::1/128"),
      (9, "2001:db8:f00::2/127"), (9, "2001:db8:f00::4/128")]),
]


@pytest.mark.parametrize("name, column, kind, expected", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_each_sample_parses_into_its_networks_with_their_line_numbers(name, column, kind, expected):
    parsed = parse(sample(name), column=column)
    assert parsed.format == kind
    assert found(parsed) == expected
    assert parsed.refused == []
    assert all(entry.network == ipaddress.ip_network(entry.network.with_prefixlen) for entry in parsed.entries)


@pytest.mark.parametrize("name, kind", [(s[0], s[2]) for s in SAMPLES], ids=[s[0] for s in SAMPLES])
def test_detection_names_the_format_of_each_sample(name, kind):
    text = formats.decode(sample(name))
    assert detect_format(text) == kind
    if name.endswith(".csv"):
        return      # parse(column=...) implies csv; detection from the content is checked above
    parsed = parse(sample(name))
    assert (parsed.format, parsed.detected) == (kind, True)


@pytest.mark.parametrize("name, kind", [(s[0], s[2]) for s in SAMPLES], ids=[s[0] for s in SAMPLES])
def test_the_explicit_format_gives_what_detection_gives(name, kind):
    column = "src_ip" if name.endswith(".csv") else None
    explicit = parse(sample(name), format=kind, column=column)
    assert explicit.detected is False
    assert explicit.entries == parse(sample(name), column=column).entries


def test_the_dshield_header_line_is_kept_as_the_header_not_refused():
    parsed = parse(sample("dshield-block.txt"))
    assert parsed.header == ("Start", "End", "Netblock", "Attacks", "Name", "Country", "email")


def test_a_dshield_line_that_contradicts_its_netblock_is_refused():
    text = ("Start\tEnd\tNetblock\tAttacks\tName\tCountry\temail\n"
            "203.0.113.0\t203.0.113.255\t25\t10\tEXAMPLE\tZZ\t\n"
            "198.51.100.0\t198.51.100.127\t25\t10\tEXAMPLE\tZZ\t\n")
    parsed = parse(text)
    assert parsed.format == "dshield"
    assert found(parsed) == [(3, "198.51.100.0/25")]
    assert [r.line for r in parsed.refused] == [2]
    assert "/25" in parsed.refused[0].reason


def test_ipsum_counts_must_be_numbers():
    parsed = parse("# IP\tnumber of (black)lists\n203.0.113.1\t4\n203.0.113.2\tmany\n203.0.113.3\n", format="ipsum")
    assert found(parsed) == [(2, "203.0.113.1/32"), (4, "203.0.113.3/32")]
    assert refusals(parsed) == [(3, "203.0.113.2\tmany")]
    assert "number of lists" in parsed.refused[0].reason


# --------------------------------------------------------------------------- CSV


def test_a_named_csv_column_is_found_whatever_its_case():
    parsed = parse(sample("siem-export.csv"), format="csv", column="SRC_IP")
    assert parsed.header == ("timestamp", "rule", "src_ip", "dst_port", "hits")
    assert [e.network.with_prefixlen for e in parsed.entries][0] == "203.0.113.45/32"


def test_a_repeated_csv_source_is_counted_as_a_duplicate_and_kept_once():
    parsed = parse(sample("siem-export.csv"), column="src_ip")
    assert parsed.duplicates == 1
    assert [e.line for e in parsed.entries if str(e.network) == "203.0.113.45/32"] == [2]


def test_without_a_column_the_first_one_is_read_and_the_refusal_says_to_name_the_column():
    parsed = parse(sample("siem-export.csv"))
    assert parsed.format == "csv" and parsed.entries == []
    assert [r.line for r in parsed.refused] == [2, 3, 4, 5, 6]
    assert all("column 'timestamp'" in r.reason and "column=" in r.reason for r in parsed.refused)


def test_a_csv_without_a_header_reads_its_first_column():
    parsed = parse("203.0.113.4,ssh\n2001:db8::4,smtp\n198.51.100.4-198.51.100.5,http\n")
    assert parsed.format == "csv" and parsed.header is None
    assert found(parsed) == [(1, "203.0.113.4/32"), (2, "2001:db8::4/128"), (3, "198.51.100.4/31")]


@pytest.mark.parametrize("first", ["10.0.0.300", "fe80::1%eth0", "2001:db8::1%eth0", "198.51.100.7/33"])
def test_a_mistyped_first_entry_is_refused_not_taken_for_a_header(first):
    parsed = parse(f"{first}\n203.0.113.4\n")
    assert parsed.format == "plain" and [r.line for r in parsed.refused] == [1]
    assert [e.network.with_prefixlen for e in parsed.entries] == ["203.0.113.4/32"]


@pytest.mark.parametrize("value", ["fe80::1%eth0", "2001:db8::1%eth0/64", "fe80::1%25eth0"])
def test_an_ipv6_scope_id_is_refused_because_no_kernel_tool_takes_it(value):
    (refused,) = parse(value + "\n", format="plain").refused
    assert "scope id" in refused.reason


def test_a_one_column_export_with_a_header_is_csv():
    parsed = parse("source address\n203.0.113.4\n203.0.113.5\n")
    assert (parsed.format, parsed.header) == ("csv", ("source address",))
    assert found(parsed) == [(2, "203.0.113.4/32"), (3, "203.0.113.5/32")]


def test_a_tab_separated_export_with_a_named_column():
    parsed = parse("when\tsrc\n2026-08-22\t203.0.113.4\n2026-08-22\t\n2026-08-22\n", column="src")
    assert found(parsed) == [(2, "203.0.113.4/32")]
    assert [(r.line, r.reason) for r in parsed.refused] == [
        (3, "column 'src' is empty"), (4, "the row has 1 fields; column 'src' is field 2")]


def test_a_quoted_multi_line_cell_keeps_the_next_rows_on_their_own_lines():
    parsed = parse('ip,note\n203.0.113.1,"first line\nsecond line"\n# a comment with a "quote\n\n203.0.113.2,x\n')
    assert found(parsed) == [(2, "203.0.113.1/32"), (6, "203.0.113.2/32")]


def test_a_csv_column_that_is_not_in_the_header_fails_the_whole_list():
    with pytest.raises(exception.FeedFormatError) as caught:
        parse(sample("siem-export.csv"), column="source")
    assert caught.value.field == "column"


def test_a_column_only_applies_to_csv():
    with pytest.raises(exception.FeedFormatError) as caught:
        parse(sample("spamhaus-drop.txt"), format="spamhaus", column="cidr")
    assert caught.value.field == "column"


def test_a_column_with_auto_reads_csv():
    parsed = parse("ip\n203.0.113.8\n", column="ip")
    assert (parsed.format, parsed.detected) == ("csv", False)


# --------------------------------------------------------------------------- refusals, bounds, input


def test_refused_lines_keep_their_number_text_and_a_reason():
    text = ("# header\n"
            "203.0.113.1\n"
            "10.0.0.0/33\n"
            "010.0.0.1\n"
            "203.0.113.9 198.51.100.1\n"
            "198.51.100.9-198.51.100.1\n"
            "203.0.113.1-2001:db8::1\n"
            "0.0.0.0-255.255.255.255\n"
            "::/0\n"
            "::ffff:203.0.113.1\n"
            "not-an-address\n"
            "2001:db8::g\n"
            "2001:db8::/64\n")
    parsed = parse(text, format="plain")
    assert found(parsed) == [(2, "203.0.113.1/32"), (13, "2001:db8::/64")]
    reasons = {r.line: (r.value, r.reason) for r in parsed.refused}
    assert sorted(reasons) == list(range(3, 13))
    expected_fragments = {
        3: "'33' is not a valid netmask",
        4: "Leading zeros",
        5: "found 2 fields",
        6: "ends (198.51.100.1) before it starts (198.51.100.9)",
        7: "cannot go from IPv4 to IPv6",
        8: "prefix length 0",
        9: "prefix length 0",
        10: "IPv4-mapped",
        11: "not an IPv4/IPv6 address, CIDR or range",
        12: "not an IPv4/IPv6 address, CIDR or range",
    }
    for line, fragment in expected_fragments.items():
        value, reason = reasons[line]
        assert value == text.splitlines()[line - 1]
        assert fragment in reason, (line, reason)


def test_an_absurdly_long_line_is_refused_unread_and_quoted_short():
    text = "203.0.113.1\n" + "203.0.113.2 " * 100 + "\n203.0.113.3\n"
    parsed = parse(text)
    assert found(parsed) == [(1, "203.0.113.1/32"), (3, "203.0.113.3/32")]
    [refused] = parsed.refused
    assert refused.line == 2
    assert len(refused.value) == formats.MAX_VALUE_CHARS and refused.value.endswith("...")
    assert "characters long" in refused.reason


def test_a_duplicate_network_is_counted_and_the_first_line_kept_while_overlaps_stay():
    parsed = parse("203.0.113.0/24\n203.0.113.7/24\n203.0.113.0/255.255.255.0\n203.0.113.7\n"
                   "198.51.100.0-198.51.100.3\n198.51.100.0/30\n198.51.100.2/31\n")
    assert found(parsed) == [(1, "203.0.113.0/24"), (4, "203.0.113.7/32"), (5, "198.51.100.0/30"),
                             (7, "198.51.100.2/31")]
    assert parsed.duplicates == 3
    assert parsed.refused == []


def test_netmasks_and_cisco_wildcard_masks_mean_the_same_network():
    parsed = parse("203.0.113.0/255.255.255.0\n198.51.100.0/0.0.0.255\n192.0.2.0/255.0.255.0\n")
    assert found(parsed) == [(1, "203.0.113.0/24"), (2, "198.51.100.0/24")]
    assert [r.line for r in parsed.refused] == [3]


def test_trailing_comments_whitespace_and_crlf_are_ignored_in_every_line_format():
    assert found(parse("203.0.113.1 \t# note\r\n\r\n  \r\n2001:db8::1\t\r\n", format="plain")) == [
        (1, "203.0.113.1/32"), (4, "2001:db8::1/128")]
    assert found(parse("203.0.113.0/24 ; SBL1 # x\r\n2001:db8::/32;SBL2\r\n", format="spamhaus")) == [
        (1, "203.0.113.0/24"), (2, "2001:db8::/32")]
    assert found(parse("203.0.113.1\t3 # x\r\n2001:db8::1 2\r\n", format="ipsum")) == [
        (1, "203.0.113.1/32"), (2, "2001:db8::1/128")]


def test_a_file_with_classic_mac_line_ends_is_read_line_by_line():
    assert found(parse("203.0.113.1\r203.0.113.2\r")) == [(1, "203.0.113.1/32"), (2, "203.0.113.2/32")]


def test_an_explicit_format_overrides_detection():
    parsed = parse(sample("spamhaus-drop.txt"), format="plain")
    assert (parsed.format, parsed.detected) == ("plain", False)
    assert [r.line for r in parsed.refused] == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("alias, canonical", sorted(formats.FORMAT_ALIASES.items()))
def test_format_aliases_name_their_canonical_format(alias, canonical):
    assert parse("203.0.113.1\n", format=alias.upper()).format == canonical


def test_an_unknown_format_fails_the_whole_list():
    with pytest.raises(exception.FeedFormatError) as caught:
        parse("203.0.113.1\n", format="xml")
    assert caught.value.field == "format"


@pytest.mark.parametrize("data, kind", [
    (gzip.compress(b"203.0.113.1\n"), "gzip"),
    (b"PK\x03\x04\x14\x00rest of a zip", "zip"),
    (b"\x00\x01\x02binary\n", "NUL"),
], ids=["gzip", "zip", "binary"])
def test_compressed_or_binary_data_fails_the_whole_list_saying_what_it_is(data, kind):
    with pytest.raises(exception.FeedFormatError) as caught:
        parse(data)
    assert caught.value.field == "data"
    assert kind in caught.value.reason


def test_utf16_with_a_byte_order_mark_is_decoded():
    data = codecs.BOM_UTF16_LE + "203.0.113.1\r\n2001:db8::1\r\n".encode("utf-16-le")
    assert found(parse(data)) == [(1, "203.0.113.1/32"), (2, "2001:db8::1/128")]


def test_bytes_that_are_not_utf8_cost_only_their_own_line():
    data = "# Liste gepflegt von J\u00fcrgen\n203.0.113.1\n".encode("latin-1") + b"203.0.113.\xff\n"
    parsed = parse(data)
    assert found(parsed) == [(2, "203.0.113.1/32")]
    assert [r.line for r in parsed.refused] == [3]


def test_empty_and_comment_only_lists_parse_to_nothing():
    for data in ("", b"", "# nothing today\n", "; nothing\n", "\n\n"):
        parsed = parse(data)
        assert (parsed.entries, parsed.refused, parsed.duplicates) == ([], [], 0)


def test_parse_value_gives_the_networks_of_one_value_or_invalid_input():
    assert formats.parse_value(" 198.51.100.5-198.51.100.6 ") == [ipaddress.ip_network("198.51.100.5/32"),
                                                                  ipaddress.ip_network("198.51.100.6/32")]
    assert formats.parse_value("2001:db8::1/64") == [ipaddress.ip_network("2001:db8::/64")]
    with pytest.raises(exception.InvalidInput) as caught:
        formats.parse_value("203.0.113.300")
    assert caught.value.field == "cidr"


def test_parsing_leaves_the_garbage_collector_as_it_found_it():
    assert gc.isenabled()
    parse("203.0.113.1\n")
    assert gc.isenabled()
    with pytest.raises(exception.FeedFormatError):
        parse("ip\n203.0.113.1\n", column="src")
    assert gc.isenabled()
    gc.disable()
    try:
        parse("203.0.113.1\n")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_parsing_120k_addresses_stays_linear():
    # A regression guard, not the benchmark (docs/feeds.md has the figure): the parse measures about
    # 0.4 s here; quadratic work (a list for duplicates, a rescan per line) would take minutes.
    text = "\n".join(str(ipaddress.IPv4Address(0x0B000000 + i * 7)) for i in range(120_000))
    started = time.perf_counter()
    parsed = parse(text)
    elapsed = time.perf_counter() - started
    assert len(parsed.entries) == 120_000
    assert elapsed < 10, elapsed


# --------------------------------------------------------------------------- detection rules

@pytest.mark.parametrize("text, kind", [
    ("; comment\n203.0.113.0/24\n", "spamhaus"),
    ("# a\n203.0.113.0/24 ; SBL1\n", "spamhaus"),
    ("203.0.113.1;22;ssh\n", "spamhaus"),                      # a ;-separated export reads the same way
    ("203.0.113.0\t203.0.113.255\t24\t9\n", "dshield"),
    ("203.0.113.1\t7\n", "ipsum"),
    ("2001:db8::1 7\n", "ipsum"),
    ("203.0.113.1\n", "plain"),
    ("198.51.100.1 - 198.51.100.9\n", "plain"),
    ("192.0.2.0/255.255.255.0\n", "plain"),
    ("ip,reason\n203.0.113.1,ssh\n", "csv"),
    ("ip\n203.0.113.1\n", "csv"),
    ("garbage\nmore garbage\n", "plain"),
    ("", "plain"),
    ("# only comments\n", "plain"),
    ("x" * 600 + "\n203.0.113.1\n", "plain"),                  # an absurd line is not a header
])
def test_detection_rules(text, kind):
    assert detect_format(text) == kind


@pytest.mark.parametrize("bad", ["01.2.3.4", "10.0.0.300", "1.2.3.4/33", "1.2.3.4/0", "fe80::1%eth0",
                                 "198.51.100.9-198.51.100.5", "1.2.3", "::ffff:192.0.2.1"])
@pytest.mark.parametrize("layout, kind", [
    ("{}\t3\n203.0.113.7\t2\n198.51.100.7\t1\n", "ipsum"),
    ("{} ; SBL1\n203.0.113.0/24 ; SBL2\n198.51.100.0/24 ; SBL3\n", "spamhaus"),
    ("{}\t203.0.113.255\t24\n198.51.100.0\t198.51.100.255\t24\n192.0.2.0\t192.0.2.255\t24\n", "dshield"),
    ("{}\n203.0.113.7\n", "plain"),
])
def test_a_mistyped_first_entry_is_refused_on_its_line_and_the_rest_of_the_list_is_read(bad, layout, kind):
    # Found by a newcomer: an IPsum list whose first address was mistyped was read as CSV (its first line
    # dropped as a header, nothing refused), and a header-less Spamhaus one as plain (every line refused).
    parsed = parse(layout.format(bad))
    assert parsed.format == kind
    assert [r.line for r in parsed.refused] == [1], parsed.refused
    assert len(parsed.entries) == (1 if kind == "plain" else 2)


def test_detection_looks_only_at_the_head_of_the_text():
    text = "203.0.113.1\n" * 10 + "; a late comment\n" + "203.0.113.2\n"
    assert detect_format(text) == "plain"


# --------------------------------------------------------------------------- ranges, as properties

IPV4_MAX = 2 ** 32 - 1
# IPv6 outside ::/8, so no range reaches the IPv4-mapped block that rules.check_network refuses.
IPV6_LOW, IPV6_HIGH = 2 ** 120, 2 ** 128 - 1


def ranges(low: int, high: int):
    edges = st.sampled_from([low, low + 1, high - 1, high])
    value = st.one_of(edges, st.integers(low, high))
    return st.tuples(value, value).map(sorted)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(ranges(0, IPV4_MAX).map(lambda r: (4, r)), ranges(IPV6_LOW, IPV6_HIGH).map(lambda r: (6, r))))
@example((4, [0, IPV4_MAX - 1]))
@example((4, [1, IPV4_MAX]))
@example((6, [IPV6_LOW + 1, IPV6_HIGH - 1]))
def test_the_cidrs_of_a_range_cover_exactly_that_range_and_are_minimal(case):
    version, (low, high) = case
    assume((low, high) != (0, IPV4_MAX))      # every address: refused like /0, tested below
    address = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    parsed = parse(f"{address(low)}-{address(high)}\n")
    assert parsed.refused == []
    networks = parsed.networks
    # Exactly the range: sorted, contiguous, from low to high.
    assert int(networks[0].network_address) == low
    assert int(networks[-1].broadcast_address) == high
    for before, after in zip(networks, networks[1:]):
        assert int(after.network_address) == int(before.broadcast_address) + 1
    # Minimal: a cover of an interval by aligned blocks is minimal exactly when no block's sibling (the
    # other half of its supernet) is also in it, since two siblings would merge into one block.
    present = set(networks)
    for network in networks:
        supernet = network.supernet()
        halves = list(supernet.subnets())
        sibling = halves[1] if halves[0] == network else halves[0]
        assert sibling not in present, (network, sibling)
    assert len(networks) <= 2 * (network.max_prefixlen - 1)


def test_a_range_of_every_address_is_refused_like_slash_zero():
    parsed = parse("0.0.0.0-255.255.255.255\n")
    assert parsed.entries == [] and "prefix length 0" in parsed.refused[0].reason


@pytest.mark.parametrize("fmt, suffix", [("plain", ""), ("spamhaus", ""), ("ipsum", ""), ("ipsum", "\t3"),
                                         ("spamhaus", " ; SBL000001")])
@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="0123456789./:abcdef", max_size=24))
@example(text="1.2.3.4")
@example(text="1.2.3.4/33")
@example(text="1.2.3.4/024")
@example(text="01.2.3.4")
@example(text="1.2.3.4/255.255.0.0")
@example(text="1.2.3.4/0")
def test_the_fast_address_path_accepts_exactly_what_ipaddress_accepts(text, fmt, suffix):
    # Every format whose lines may be a bare address: the shared loop reads those lines itself.
    try:
        expected = ipaddress.ip_network(text, strict=False)
    except ValueError:
        expected = None
    if expected is not None and (expected.prefixlen == 0 or (expected.version == 6 and
                                                             expected.network_address.ipv4_mapped)):
        expected = None     # rules.check_network's policy
    parsed = parse(text + suffix + "\n", format=fmt)
    assert parsed.networks == ([expected] if expected is not None else [])
    assert [network.with_prefixlen for network in parsed.networks] == \
        ([expected.with_prefixlen] if expected is not None else [])


@settings(max_examples=300, deadline=None)
@given(address=st.integers(0, 2**32 - 1), prefixlen=st.integers(0, 32))
@example(address=0xC0000201, prefixlen=32)
@example(address=0xC0000201, prefixlen=31)
def test_the_fast_ipv4_network_is_the_network_ipaddress_builds(address, prefixlen):
    start = address & ~((1 << (32 - prefixlen)) - 1)
    fast, real = formats._v4_network(start, prefixlen), ipaddress.IPv4Network((start, prefixlen))
    assert type(fast) is type(real) and fast == real and hash(fast) == hash(real)
    assert (str(fast), repr(fast), fast.num_addresses, fast.broadcast_address) == \
        (str(real), repr(real), real.num_addresses, real.broadcast_address)
    assert fast.overlaps(real) and fast.subnet_of(real) and real.supernet_of(fast)
    assert pickle.loads(pickle.dumps(fast)) == real
    if prefixlen >= 30:
        assert list(fast.hosts()) == list(real.hosts())


def test_the_fast_path_and_the_format_parser_de_duplicate_together():
    # "192.0.2.1" (fast path) and "192.0.2.1/255.255.255.255" (the parser) are one network; so are a CIDR
    # with host bits and its network; an IPv6 network never equals an IPv4 key.
    parsed = parse("192.0.2.1\n192.0.2.1/255.255.255.255\n192.0.2.1/32\n10.1.2.3/8\n10.0.0.0/8\n"
                   "10.0.0.0-10.255.255.255\n::/96\n2001:db8::/32\n2001:db8::1/32\n", format="plain")
    assert found(parsed) == [(1, "192.0.2.1/32"), (4, "10.0.0.0/8"), (7, "::/96"), (8, "2001:db8::/32")]
    assert parsed.duplicates == 5


# --------------------------------------------------------------------------- uniform lists

def _uniform_lines():
    """Lines a program writes (dotted quads, some repeated, some in /8s the policy checks), now and then one
    that is not uniform: a leading zero, an octet above 255, a comment, a blank, a CRLF, another length."""
    octet = st.sampled_from([0, 10, 45, 127, 192, 203, 255]) | st.integers(0, 255)
    address = st.tuples(octet, st.integers(0, 255), st.integers(0, 3), st.integers(0, 3)).map(
        lambda t: ".".join(map(str, t)))
    odd = st.sampled_from(["01.2.3.4", "1.2.3.256", "# comment", "", "1.2.3.4\r", "1.2.3.0/24", " 1.2.3.4",
                           "1.2.3.4/32/32", "::1", "1.2.3.4\t", "1.2.3.4\t3\t4", "1.2.3", "1.2.3.4\x00"])
    return st.lists(st.one_of(address, address, address, address, odd), max_size=30)


READY = formats.Ready(rules.RuleSpec("0.0.0.0/8", "udp", 53, 53),
                      [octet not in (0, 10, 127, 192) for octet in range(256)])


@settings(max_examples=400, deadline=None)
@given(lines=_uniform_lines(), fmt=st.sampled_from(["plain", "ipsum"]), suffix=st.sampled_from(["", "/32", "\t7"]),
       newline=st.booleans())
@example(lines=["45.1.2.3", "45.1.2.3", "10.0.0.1", "10.0.0.1"], fmt="plain", suffix="/32", newline=True)
@example(lines=["45.1.2.3", "10.0.0.1"], fmt="ipsum", suffix="\t7", newline=False)
@example(lines=[], fmt="plain", suffix="", newline=True)
def test_a_uniform_list_parses_item_for_item_as_the_line_loop_does(lines, fmt, suffix, newline):
    # parse reads a list whose every line is uniform with whole-text operations (_parse_uniform); the answer
    # must be the loop's: items (rules and the networks the policy checks), their line numbers, duplicates.
    text = "\n".join(line + suffix if line[:1].isdigit() else line for line in lines) + ("\n" if newline else "")
    loop = formats._parse_lines(formats._lines(text), fmt, False, READY)
    assert parse(text, fmt, ready=READY) == loop


def test_a_uniform_list_is_read_without_the_line_loop(monkeypatch):
    def loop(*args):
        raise AssertionError("the line loop read a uniform list")

    monkeypatch.setattr(formats, "_parse_lines", loop)
    parsed = parse("45.1.2.3\n10.0.0.1/32\n45.1.2.3\n", "plain", ready=READY)
    assert parsed.items == [(1, rules.RuleSpec("45.1.2.3/32", "udp", 53, 53)),
                            (2, formats.compact_v4(int(ipaddress.IPv4Address("10.0.0.1")), 32))]
    assert parsed.duplicates == 1 and parsed.lines == 3
    assert parse("45.1.2.3\t9\n", "ipsum", ready=READY).items == [(1, rules.RuleSpec("45.1.2.3/32", "udp", 53, 53))]


# --------------------------------------------------------------------------- non-global sources

@pytest.mark.parametrize("item", rules.NON_GLOBAL_RANGES, ids=lambda item: str(item.network))
def test_each_non_global_range_is_named_for_itself_an_address_inside_and_a_covering_supernet(item):
    network = item.network
    inside = ipaddress.ip_network(network.network_address + network.num_addresses // 2)
    assert rules.non_global_overlap(network) == item
    assert rules.non_global_overlap(inside) == item
    assert rules.non_global_overlap(network.supernet(new_prefix=max(network.prefixlen - 1, 1))) is not None
    assert rules.non_global_overlap(network.with_prefixlen) == item


@pytest.mark.parametrize("cidr, named", [
    ("10.1.2.3/32", "10.0.0.0/8"),
    ("169.254.169.254", "169.254.0.0/16"),
    ("0.0.0.0", "0.0.0.0/8"),
    ("10.0.0.0/7", "10.0.0.0/8"),           # a /7 covering 10/8
    ("8.0.0.0/6", "10.0.0.0/8"),
    ("0.0.0.0/1", "0.0.0.0/8"),             # the lowest range a supernet covers
    ("128.0.0.0/1", "169.254.0.0/16"),
    ("172.31.255.255", "172.16.0.0/12"),
    ("100.127.255.255", "100.64.0.0/10"),
    ("224.0.0.0/3", "224.0.0.0/4"),
    ("239.255.255.250", "224.0.0.0/4"),
    ("::", "::/128"),
    ("::1", "::1/128"),
    ("::/127", "::/128"),
    ("fe80::a9fe:a9fe", "fe80::/10"),
    ("fd12:3456::/48", "fc00::/7"),
    ("fc00::/6", "fc00::/7"),
    ("ff02::1", "ff00::/8"),
    ("8000::/1", "fc00::/7"),
])
def test_networks_overlapping_a_non_global_range_are_refused_naming_it(cidr, named):
    hit = rules.non_global_overlap(ipaddress.ip_network(cidr))
    assert hit is not None and hit.network.with_prefixlen == named
    assert hit.name


@pytest.mark.parametrize("cidr", [
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32",     # documentation
    "198.18.0.0/15",                                                          # benchmarking
    "8.8.8.8", "1.0.0.0/8", "9.255.255.255", "11.0.0.0/8", "100.63.255.255", "100.128.0.0",
    "169.253.255.255", "169.255.0.0", "172.15.255.255", "172.32.0.0", "192.167.255.255", "192.169.0.0",
    "223.255.255.255", "240.0.0.0/4", "128.0.0.0/3", "8.0.0.0/7",
    "::2", "2000::/3", "2001:4860::8888", "fbff:ffff::/32", "fec0::/10", "feff::/16",
])
def test_global_networks_and_the_documentation_ranges_pass(cidr):
    assert rules.non_global_overlap(ipaddress.ip_network(cidr)) is None


def test_the_non_global_table_is_sorted_and_disjoint_per_family():
    for version in (4, 6):
        networks = [item.network for item in rules.NON_GLOBAL_RANGES if item.network.version == version]
        assert networks == sorted(networks)
        assert not any(a.overlaps(b) for a, b in zip(networks, networks[1:]))


def test_a_parsed_entry_is_a_value_callers_can_unpack():
    [entry] = parse("203.0.113.1\n").entries
    line, network = entry
    assert (line, network) == (1, ipaddress.ip_network("203.0.113.1/32")) and isinstance(entry, Entry)


def test_the_fast_ipv4_constructor_is_in_use_on_this_python_and_its_check_is_cheap():
    # The import-time check must pass here (else lists parse at the constructor's speed) and must not
    # walk a large network's hosts (it runs in every daemon's start-up).
    started = time.perf_counter()
    assert formats._check_v4_network()
    assert time.perf_counter() - started < 0.1
    assert formats._v4_network.__doc__ and "three times faster" in formats._v4_network.__doc__
