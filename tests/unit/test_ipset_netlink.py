"""ipset over netlink (provfw.virt.firewall.ipset_netlink): the messages, byte by byte, and the answers."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provfw.virt.firewall import ipset_netlink as nl


def test_an_add_of_an_ipv4_host_is_the_message_ipset_restore_sends():
    message = nl.member_message("add", "pfw4-all-any", "192.0.2.1", 7)
    # nlmsghdr: length, type (NFNL_SUBSYS_IPSET << 8 | IPSET_CMD_ADD), NLM_F_REQUEST | NLM_F_ACK, seq, port
    expected_body = (
        bytes([2, 0, 0, 0])                                                   # nfgenmsg: AF_INET, v0, res_id 0
        + struct.pack("=HH", 5, 1) + bytes([7]) + b"\0" * 3                   # PROTOCOL = 7, padded
        + struct.pack("=HH", 17, 2) + b"pfw4-all-any\0" + b"\0" * 3           # SETNAME, NUL-terminated, padded
        + struct.pack("=HH", 24, 7 | 0x8000)                                  # DATA, nested
        + struct.pack("=HH", 12, 1 | 0x8000)  # IP, nested
        + struct.pack("=HH", 8, 1 | 0x4000) + bytes([192, 0, 2, 1])  # IPADDR_IPV4, network order
        + struct.pack("=HH", 5, 3) + bytes([32]) + b"\0" * 3)  # CIDR = 32
    assert message == struct.pack("=IHHII", 16 + len(expected_body), (6 << 8) | 9, 0x1 | 0x4, 7, 0) + expected_body


def test_a_del_of_an_ipv6_network_carries_its_16_bytes_and_prefix():
    message = nl.member_message("del", "pfw6-tcp-22", "2001:db8::/32", 1)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags, sequence) == (len(message), (6 << 8) | 10, 0x5, 1)
    assert message[16] == 10                                                  # AF_INET6
    assert struct.pack("=HH", 20, 2 | 0x4000) + bytes.fromhex("20010db8" + "00" * 12) in message
    assert struct.pack("=HH", 5, 3) + bytes([32]) in message


@pytest.mark.parametrize("command, member", [("swap", "192.0.2.1"), ("add", "192.0.2.1/24"), ("add", "not-an-ip")])
def test_what_is_not_a_member_change_of_a_canonical_network_is_refused(command, member):
    with pytest.raises(ValueError):
        nl.member_message(command, "pfw4-all-any", member, 1)


def test_acknowledgements_and_errors_are_read_by_sequence():
    def error_message(sequence: int, error: int) -> bytes:
        return struct.pack("=IHHII", 36, nl.NLMSG_ERROR, 0, sequence, 0) + struct.pack("=i", error) + b"\0" * 16

    answers = nl.parse_acks(error_message(3, 0) + error_message(4, -4352))
    assert answers == [(3, 0), (4, 4352)]
    assert nl.error_text(4352) == "Hash is full, cannot add more elements"
    assert nl.error_text(2) == "The set with the given name does not exist"


def test_restore_lines_become_changes_and_anything_else_is_refused():
    assert nl.parse_lines(["add pfw4-all-any 192.0.2.1", "del pfw4-all-any 198.51.100.0/24"]) == [
        ("add", "pfw4-all-any", "192.0.2.1"), ("del", "pfw4-all-any", "198.51.100.0/24")]
    with pytest.raises(ValueError):
        nl.parse_lines(["flush pfw4-all-any x"])


def _reference_message(command: str, set_name: str, member: str, sequence: int) -> bytes:
    """member_message as first written: every member through ipaddress, the message built field by field."""
    network = ipaddress.ip_network(member, strict=True)
    kind = nl.IPSET_ATTR_IPADDR_IPV4 if network.version == 4 else nl.IPSET_ATTR_IPADDR_IPV6
    address = nl._attr(kind | nl.NLA_F_NET_BYTEORDER, network.network_address.packed)
    cidr = nl._attr(nl.IPSET_ATTR_CIDR, bytes([network.prefixlen]))
    data = nl._attr(nl.IPSET_ATTR_IP | nl.NLA_F_NESTED, address) + cidr
    body = (struct.pack("=BBH", 2 if network.version == 4 else 10, 0, 0)
            + nl._attr(nl.IPSET_ATTR_PROTOCOL, bytes([nl.IPSET_PROTOCOL]))
            + nl._attr(nl.IPSET_ATTR_SETNAME, set_name.encode("ascii") + b"\0")
            + nl._attr(nl.IPSET_ATTR_DATA | nl.NLA_F_NESTED, data))
    return struct.pack("=IHHII", 16 + len(body), (6 << 8) | nl.COMMANDS[command], 0x5, sequence, 0) + body


@settings(max_examples=500, deadline=None)
@given(member=st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: str(ipaddress.IPv4Network(t, strict=False)) if t[1] % 3 else str(ipaddress.IPv4Address(t[0]))),
    st.text(alphabet="0123456789./:af", max_size=20),
    st.sampled_from(["1.2.3.4/", "1.2.3.4/032", "1.2.3.0/255.255.255.0", "01.2.3.4", "1.2.3.4/33", "::/0",
                     "2001:db8::/32", "1.2.3.4/24", "0.0.0.0/0", "1.2.3.4 ", "::ffff:1.2.3.4"])))
def test_a_member_message_is_the_one_ipaddress_spells_or_both_refuse(member):
    # IPv4 members are read with inet_pton and integers, not ipaddress: the bytes, and what is refused, must
    # not change.
    try:
        expected = _reference_message("add", "pfw4-all-any", member, 9)
    except ValueError:
        with pytest.raises(ValueError):
            nl.member_message("add", "pfw4-all-any", member, 9)
        return
    assert nl.member_message("add", "pfw4-all-any", member, 9) == expected
    unacknowledged = nl.member_message("add", "pfw4-all-any", member, 9, ack=False)
    assert unacknowledged[:6] + unacknowledged[8:] == expected[:6] + expected[8:]
    assert struct.unpack_from("=H", unacknowledged, 6) == (0x1,)


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in ``data``."""
    found, offset = [], 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        found.append((kind, data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return found


def test_a_bulk_add_is_one_message_whose_adt_holds_each_members_data_as_a_single_add_would():
    members = ["192.0.2.1", "198.51.100.0/24", "203.0.113.7"]
    message = nl.bulk_message("add", "pfw4-all-any", members, 9, ack=False)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags, sequence) == (len(message), (6 << 8) | 9, 0x1, 9)
    attrs = _attrs(message[20:])
    assert [kind for kind, _ in attrs] == [1, 2, 9, 8 | 0x8000]               # PROTOCOL, SETNAME, LINENO, ADT
    assert attrs[2][1] == struct.pack("=I", 0)            # the kernel requires LINENO with ADT; 0: plain errors
    singles = [_attrs(nl.member_message("add", "pfw4-all-any", m, 1)[20:])[2] for m in members]
    assert _attrs(attrs[3][1]) == singles                                     # DATA entries, in order


def test_a_bulk_message_of_ipv6_members_is_ipv6_and_one_of_mixed_families_is_refused():
    message = nl.bulk_message("del", "pfw6-all-any", ["2001:db8::1", "2001:db8:1::/48"], 1)
    assert message[16] == 10 and struct.unpack_from("=HH", message, 4)[0] == (6 << 8) | 10
    with pytest.raises(ValueError):
        nl.bulk_message("add", "pfw4-all-any", ["192.0.2.1", "2001:db8::1"], 1)
    with pytest.raises(ValueError):
        nl.bulk_message("add", "pfw4-all-any", ["192.0.2.1", "192.0.2.1/24"], 1)   # host bits


def test_long_runs_to_one_set_go_in_bulk_messages_and_everything_else_one_change_a_message():
    v4 = [f"10.0.{i // 256}.{i % 256}" for i in range(3000)]
    changes = ([("add", "pfw4-all-any", "192.0.2.1")]
               + [("add", "pfw4-tcp-22", m) for m in v4]
               + [("add", "pfw6-all-any", f"2001:db8::{i:x}") for i in range(nl.BULK_MIN)]
               + [("del", "pfw4-tcp-22", m) for m in v4[:nl.BULK_MIN - 1]])
    units = list(nl._units(changes))
    assert units[0] == ("add", "pfw4-all-any", ["192.0.2.1"])
    bulk_v4 = [u for u in units if u[:2] == ("add", "pfw4-tcp-22")]
    assert [m for u in bulk_v4 for m in u[2]] == v4 and len(bulk_v4) == 3     # 1,365 members per message
    assert all(len(nl.bulk_message(*u, 1)) < nl.ADT_BYTES + 100 for u in bulk_v4)
    assert [len(u[2]) for u in units if u[1] == "pfw6-all-any"] == [nl.BULK_MIN]
    assert [u for u in units if u[0] == "del"] == [("del", "pfw4-tcp-22", [m]) for m in v4[:nl.BULK_MIN - 1]]
    # Members of another family in a run of one set are a message of their own, for the kernel to refuse.
    mixed = list(nl._units([("add", "pfw4-all-any", m) for m in v4[:40]] + [("add", "pfw4-all-any", "2001:db8::1")]))
    assert [len(u[2]) for u in mixed] == [40, 1]
