"""ipset's kernel interface over netlink, for a delta's member changes without a process.

A delta of a few members (one CIDR blocked: one ``add`` line) cost a host
4-6 ms as ``ipset restore -exist``: a fork and exec of ``ipset`` (and of
``nsenter`` inside a namespace), for about 20 us of kernel work.  The same
change as netlink messages on a socket kept open costs tens of microseconds.

What is sent is what ``ipset restore -exist`` sends for ``add``/``del``
lines (the ipset tool's ``lib/session.c``; the layout is the kernel's
``include/uapi/linux/netfilter/ipset/ip_set.h``): per member one
``NFNL_SUBSYS_IPSET`` message ``IPSET_CMD_ADD`` / ``IPSET_CMD_DEL`` carrying
``IPSET_ATTR_PROTOCOL`` (7), ``IPSET_ATTR_SETNAME`` and a nested
``IPSET_ATTR_DATA`` {nested ``IPSET_ATTR_IP`` {``IPSET_ATTR_IPADDR_IPV4``
or ``_IPV6`` in network byte order}, ``IPSET_ATTR_CIDR``}.  Without
``NLM_F_EXCL`` the kernel ignores an add already present and a del already
gone, which is what ``-exist`` means.  They go MAX_BATCH to a ``send``; only
the last of a batch asks for an acknowledgement (``NLM_F_ACK``).  The kernel
answers every refused message whatever its flags and handles a send's
messages in order (``netlink_rcv_skb``), so once the last one is answered
every refusal of the batch has been read: one ``recv`` per batch instead of
one per change (2,408 changes: 57-63 -> 12-13 ms, docs/scale.md).

A run of changes to one set longer than BULK_MIN goes as ``IPSET_CMD_ADD`` /
``IPSET_CMD_DEL`` messages that each carry up to ADT_BYTES of members: a
nested ``IPSET_ATTR_ADT`` of ``IPSET_ATTR_DATA`` entries, with the top-level
``IPSET_ATTR_LINENO`` the kernel requires beside it - how ``ipset restore``
itself batches (``ip_set_ad`` in the kernel's ``ip_set_core.c``).  The
kernel applies a message's entries in order and stops at the first it
refuses; the error then names the run, not the member.  120,430 members: one
``ipset restore`` took 0.40-0.49 s (0.27-0.36 s of it the tool's parsing in
user space); the same as bulk messages mostly the kernel's own inserts.

Only ``hash:net`` members (an address or a network) are spoken here, the
only set type provfw creates.  Whole-set work (create, swap, destroy) stays
with ``ipset restore``; ``ipset.fill_step`` sends a full plan's fills here.

Thread-safety: ``IpsetNetlink`` serialises on its own lock; the drivers call
it under their apply lock anyway.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
from typing import Collection, Iterable, Sequence

from provfw import exception

LOG = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 7
IPSET_CMD_ADD, IPSET_CMD_DEL = 9, 10
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_DATA, IPSET_ATTR_ADT, IPSET_ATTR_LINENO = 1, 2, 7, 8, 9
IPSET_ATTR_IP, IPSET_ATTR_CIDR = 1, 3
IPSET_ATTR_IPADDR_IPV4, IPSET_ATTR_IPADDR_IPV6 = 1, 2
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
CLONE_NEWNET = 0x40000000

# The kernel's ipset error numbers (ip_set.h, enum ipset_errno; hash types: ip_set_hash.h) and ipset's words.
IPSET_ERRORS = {
    errno.ENOENT: "The set with the given name does not exist",
    4097: "kernel error received: ipset protocol error",
    4102: "the set type does not take this element",
    4104: "the value of the CIDR parameter of the IP address is invalid",
    4106: "the address family of the element does not match the set's",
    4352: "Hash is full, cannot add more elements",
    4353: "Null-valued element, cannot be stored in a hash type of set",
}
IPSET_ERR_HASH_FULL = 4352

COMMANDS = {"add": IPSET_CMD_ADD, "del": IPSET_CMD_DEL}
# Messages per send.  Each is acknowledged in a datagram of its own, queued on the socket until read: 64 of
# them (about 1 kB of buffer each, with the kernel's overhead) stay well inside the default 208 kB receive
# buffer, where more could overflow it (ENOBUFS) and lose an acknowledgement.
MAX_BATCH = 64
TIMEOUT = 5.0            # seconds to wait for the kernel's answers before the socket is given up
BULK_MIN = 32            # a run of changes to one set at least this long goes as bulk (ADT) messages
ADT_BYTES = 32 * 1024    # members per bulk message, in bytes (an attribute's length is 16 bits)
DATAGRAM_BYTES = 128 * 1024   # one send stays under the socket's default send buffer (208 kB)
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10     # answers of refused messages without a copy of the message


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute: 4-byte header (length, type), payload, padding to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def member_message(command: str, set_name: str, member: str, sequence: int, ack: bool = True) -> bytes:
    """The netlink message of ``ipset -exist <command> <set_name> <member>`` (``add`` or ``del``), asking for
    an acknowledgement unless ``ack`` is false (a refusal is answered either way).

    ``member``: an address or ``address/prefix`` in ipset's spelling.  Raises ValueError for another
    command or a member that is not an address or network.
    """
    if command not in COMMANDS:
        raise ValueError(f"{command!r} is not a member change (add, del)")
    family, data = _member_data(member)
    body = _head(family, set_name) + _attr(IPSET_ATTR_DATA | NLA_F_NESTED, data)
    kind = (NFNL_SUBSYS_IPSET << 8) | COMMANDS[command]
    flags = NLM_F_REQUEST | NLM_F_ACK if ack else NLM_F_REQUEST
    return struct.pack("=IHHII", 16 + len(body), kind, flags, sequence, 0) + body


def bulk_message(command: str, set_name: str, members: Sequence[str], sequence: int, ack: bool = True) -> bytes:
    """One netlink message of ``ipset -exist <command> <set_name> <member>`` for every member of ``members``
    (one set, one family): a nested ``IPSET_ATTR_ADT`` of their ``IPSET_ATTR_DATA`` entries and the top-level
    ``IPSET_ATTR_LINENO`` the kernel requires with it (0: a refusal is answered as a plain error).

    Raises ValueError as ``member_message`` does.
    """
    if command not in COMMANDS:
        raise ValueError(f"{command!r} is not a member change (add, del)")
    family, entries = _entries(members)
    body = (_head(family, set_name) + _LINENO_ZERO
            + struct.pack("=HH", 4 + len(entries), IPSET_ATTR_ADT | NLA_F_NESTED) + entries)
    kind = (NFNL_SUBSYS_IPSET << 8) | COMMANDS[command]
    flags = NLM_F_REQUEST | NLM_F_ACK if ack else NLM_F_REQUEST
    return struct.pack("=IHHII", 16 + len(body), kind, flags, sequence, 0) + body


def _entries(members: Sequence[str]) -> tuple[int, bytes]:
    """(family, the ``IPSET_ATTR_DATA`` entries of ``members``).  Members that are all bare IPv4 addresses (a
    blocklist's hosts) are packed in C: ``inet_pton`` mapped over them, joined by the constant tail and head of
    an entry; any other member sends the whole run through ``_member_data`` one by one."""
    try:
        packed = list(map(_PTON_V4, members))
    except (OSError, TypeError):
        packed = None
    if packed:
        return socket.AF_INET, _V4_ENTRY_HEAD + _V4_ENTRY_SEPARATOR.join(packed) + _V4_CIDR[32]
    parts = []
    families = set()
    pton, inet, entry_head, host = socket.inet_pton, socket.AF_INET, _V4_ENTRY_HEAD, _V4_CIDR[32]
    for member in members:
        if "/" not in member and ":" not in member:
            try:
                parts.append(entry_head + pton(inet, member) + host)
                families.add(inet)
                continue
            except OSError:
                pass                       # _member_data says what is wrong with it
        family, data = _member_data(member)
        families.add(family)
        parts.append(_attr(IPSET_ATTR_DATA | NLA_F_NESTED, data))
    if len(families) != 1:
        raise ValueError(f"members of one bulk message must be of one family: {sorted(families)}")
    return families.pop(), b"".join(parts)


@functools.lru_cache(maxsize=64)
def _head(family: int, set_name: str) -> bytes:
    """What every message to one set starts with: nfgenmsg (NFNETLINK_V0), the protocol and the set's name."""
    return (struct.pack("=BBH", family, 0, 0) + _attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
            + _attr(IPSET_ATTR_SETNAME, set_name.encode("ascii") + b"\0"))


_V4_ADDRESS_HEADER = struct.pack("=HH", 8, IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER)
_V4_IP_HEADER = struct.pack("=HH", 12, IPSET_ATTR_IP | NLA_F_NESTED)
_V4_CIDR = tuple(_attr(IPSET_ATTR_CIDR, bytes([length])) for length in range(33))
_V4_ENTRY_HEAD = struct.pack("=HH", 24, IPSET_ATTR_DATA | NLA_F_NESTED) + _V4_IP_HEADER + _V4_ADDRESS_HEADER
_LINENO_ZERO = _attr(IPSET_ATTR_LINENO, struct.pack("=I", 0))
_V4_ENTRY_SEPARATOR = _V4_CIDR[32] + _V4_ENTRY_HEAD
_PTON_V4 = functools.partial(socket.inet_pton, socket.AF_INET)


def _member_data(member: str) -> tuple[int, bytes]:
    """(address family, the IPSET_ATTR_DATA payload) of ``member``; ValueError unless it is an address or a
    network without host bits.  IPv4 from inet_pton and integers (a delta of 2,400 members built 2,400
    ``ipaddress`` networks), anything else through ``ipaddress``."""
    address, slash, length = member.partition("/")
    if ":" not in address and (not slash or length.isascii() and length.isdigit() and int(length) <= 32):
        try:
            packed = socket.inet_pton(socket.AF_INET, address)
        except OSError:
            packed = None                       # ipaddress below says what is wrong with it
        if packed is not None:
            prefixlen = int(length) if slash else 32
            if int.from_bytes(packed, "big") & ((1 << (32 - prefixlen)) - 1):
                raise ValueError(f"{member!r} has host bits set")
            return socket.AF_INET, _V4_IP_HEADER + _V4_ADDRESS_HEADER + packed + _V4_CIDR[prefixlen]
    network = ipaddress.ip_network(member, strict=True)
    kind = IPSET_ATTR_IPADDR_IPV4 if network.version == 4 else IPSET_ATTR_IPADDR_IPV6
    address_attr = _attr(kind | NLA_F_NET_BYTEORDER, network.network_address.packed)
    return (socket.AF_INET if network.version == 4 else socket.AF_INET6,
            _attr(IPSET_ATTR_IP | NLA_F_NESTED, address_attr) + _attr(IPSET_ATTR_CIDR, bytes([network.prefixlen])))


def parse_acks(data: bytes) -> list[tuple[int, int]]:
    """(sequence, error) of each NLMSG_ERROR message in ``data``; error 0 is an acknowledgement."""
    answers = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, sequence, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, offset + 16)
            answers.append((sequence, -error))
        offset += (length + 3) & ~3
    return answers


def error_text(code: int) -> str:
    if code in IPSET_ERRORS:
        return IPSET_ERRORS[code]
    return os.strerror(code) if code < 4096 else f"ipset error {code}"


def parse_lines(lines: Iterable[str]) -> list[tuple[str, str, str]]:
    """``add NAME MEMBER`` / ``del NAME MEMBER`` lines (``ipset.plan_members``) as (command, set, member)."""
    parsed = []
    for line in lines:
        command, name, member = line.split()
        if command not in COMMANDS:
            raise ValueError(f"not a member change: {line!r}")
        parsed.append((command, name, member))
    return parsed


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)
    if setns is not None:                                   # Python >= 3.12
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def open_socket(netns: str = "") -> socket.socket:
    """A NETLINK_NETFILTER socket, created inside ``/run/netns/<netns>`` when named (the socket keeps that
    namespace; this thread returns to its own at once).  Raises OSError (no such namespace, not permitted)."""
    if not netns:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            finally:
                _setns(own)
        finally:
            os.close(own)
    finally:
        os.close(target)


class IpsetNetlink:
    """Member changes of existing ``hash:net`` sets, sent to the kernel of ``netns`` (empty: this process's).

    The socket is opened on first use and kept; a socket error closes it, so the next call opens a new one.
    """

    def __init__(self, netns: str = ""):
        self.netns = netns
        self._socket: socket.socket | None = None
        self._sequence = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def fill(self, set_name: str, members: Collection[str]) -> None:
        """``ipset -exist add`` of every member of ``members`` to ``set_name``, in bulk messages: a full plan's
        fill (``ipset.fill_step``).  Raises as ``change`` does; a refusal names the message's run."""
        members = list(members)
        if not members:
            return
        self._write(_bulk("add", set_name, members))

    def change(self, changes: Sequence[tuple[str, str, str]]) -> None:
        """Apply (command, set name, member) changes in order, as ``ipset restore -exist`` would.

        Raises ``OSError`` when no netlink socket can be opened or used (the caller falls back to the
        ``ipset`` tool), ``KernelObjectMissing`` for a set that does not exist, ``DriverError`` for any
        other refusal (a full hash, a member of the wrong family), naming the first refused change.  The
        changes before and after a refused one are applied, as the kernel answers each on its own; the
        reconciler then plans in full, which reads the kernel and repairs it.
        """
        self._write(_units(changes))

    def _write(self, units: Iterable[tuple[str, str, Sequence[str]]]) -> None:
        with self._lock:
            if self._socket is None:
                self._socket = open_socket(self.netns)
                self._socket.settimeout(TIMEOUT)
                try:
                    self._socket.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
                except OSError:
                    pass                    # an older kernel copies refused messages into its answers
                self._socket.bind((0, 0))
            try:
                batch: list[tuple[str, str, Sequence[str]]] = []
                size = 0
                for unit in units:
                    cost = len(unit[2]) * 40 if len(unit[2]) > 1 else 64
                    if batch and (len(batch) == MAX_BATCH or size + cost > DATAGRAM_BYTES):
                        self._send(batch)
                        batch, size = [], 0
                    batch.append(unit)
                    size += cost
                if batch:
                    self._send(batch)
            except OSError:
                self._close()
                raise

    def _send(self, units: Sequence[tuple[str, str, Sequence[str]]]) -> None:
        first = self._sequence + 1
        last = first + len(units) - 1
        messages = []
        for offset, (command, name, members) in enumerate(units):
            build = member_message if len(members) == 1 else bulk_message
            messages.append(build(command, name, members[0] if len(members) == 1 else members, first + offset,
                                  ack=first + offset == last))
        self._sequence = last
        self._socket.sendall(b"".join(messages))
        refused: list[tuple[int, int]] = []
        answered = False
        while not answered:
            for sequence, code in parse_acks(self._socket.recv(1 << 16)):
                if first <= sequence <= last:
                    if code:
                        refused.append((sequence, code))
                    answered = answered or sequence == last
        if refused:
            sequence, code = min(refused)
            command, name, members = units[sequence - first]
            what = members[0] if len(members) == 1 else \
                f"({len(members)} members, {members[0]} to {members[-1]}; the kernel stopped at the one refused)"
            text = f"ipset {command} {name} {what}: {error_text(code)}"
            if len(refused) > 1:
                text += f" (and {len(refused) - 1} more refused)"
            if code == errno.ENOENT:
                raise exception.KernelObjectMissing(text)
            raise exception.DriverError(text)


def _units(changes: Sequence[tuple[str, str, str]]) -> Iterable[tuple[str, str, Sequence[str]]]:
    """``changes`` as (command, set, members) messages, in order: a run of at least BULK_MIN changes to one set
    (a fill, an import's adds) in bulk messages of up to ADT_BYTES, any other change in a message of its own.
    A bulk message holds members of one family (a set has one)."""
    for (command, name, _v6), run in itertools.groupby(changes, key=lambda change: (*change[:2], ":" in change[2])):
        members = [member for _, _, member in run]
        if len(members) < BULK_MIN:
            yield from ((command, name, [member]) for member in members)
            continue
        yield from _bulk(command, name, members)


def _bulk(command: str, name: str, members: list[str]) -> Iterable[tuple[str, str, list[str]]]:
    """``members`` (one set, one family) as bulk messages' (command, set, members) of up to ADT_BYTES each."""
    per_message = ADT_BYTES // (40 if ":" in members[0] else 24)      # an IPv6 entry is 36 bytes, IPv4 24
    for start in range(0, len(members), per_message):
        yield command, name, members[start:start + per_message]
