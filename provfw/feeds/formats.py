"""The block-list formats operators subscribe to, parsed into networks.

Operators re-import published lists daily (Spamhaus DROP/EDROP, FireHOL
netsets, IPsum, DShield) and their own SIEM exports.  ``parse`` turns any of
them into ``ipaddress`` networks with the line each came from, and reports
every line it refuses with its number, its text and a reason a human
understands; one bad line never costs the rest of the list.

Design
    Pure: bytes or text in, a ``Parsed`` value out.  No database, no network,
    no kernel, no configuration, so the import endpoint, the CLI and the feed
    fetcher share one meaning of every format.  Policy on *which* networks may
    be blocked (protected networks, ``rules.non_global_overlap``) is the
    caller's: this module only says what the list contains.  The one policy it
    applies is ``rules.check_network`` (no ``/0``, no IPv4-mapped IPv6), so a
    network it returns is always one a rule can be made of.

    Each format is a small function from one stripped line to networks; the
    shared loop owns line numbers, comments, the line-length bound,
    duplicates and refusals.  ``format="auto"`` looks at the first two data
    lines and the comment markers before them (``detect_format``): the same
    text always gives the same answer, and ``Parsed.format`` says which
    format was used.

    Bounded work: a line longer than ``MAX_LINE_CHARS`` (``MAX_CSV_ROW_CHARS``
    for a CSV row) is refused unread, and a range splits into at most 62
    (IPv4) or 254 (IPv6) networks.  The size of the whole input is the
    caller's bound (the API's ``max_import_body_size``).

Thread-safety
    No shared mutable state; call ``parse`` from any number of threads.  The
    one process-wide effect is that the cyclic garbage collector is paused
    while a list is parsed (``gcpause.paused``): overlapping calls leave it as the
    first found it, but code that disables it on purpose while a parse runs
    in another thread finds it enabled again afterwards.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import ipaddress
import itertools
import operator
import re
import socket
from typing import Callable, Iterator, NamedTuple, Sequence

from provfw import exception, gcpause, rules
from provfw.rules import Network

__all__ = [
    "AUTO", "FORMATS", "FORMAT_ALIASES", "MAX_LINE_CHARS", "MAX_CSV_ROW_CHARS", "MAX_VALUE_CHARS",
    "Entry", "Refused", "Parsed", "parse", "detect_format", "decode", "parse_value",
]

AUTO = "auto"
#: Canonical format names, as ``Parsed.format`` reports them and ``format=`` accepts them.
FORMATS = ("plain", "spamhaus", "ipsum", "dshield", "csv")
#: Other names operators know the same formats by.
FORMAT_ALIASES = {"netset": "plain", "firehol": "plain", "drop": "spamhaus", "edrop": "spamhaus"}

#: Longest line (characters) a line format reads.  The longest real entry is a range of two IPv6
#: addresses (79 characters) and Spamhaus' trailing reference adds a dozen; anything far beyond that is
#: not a block list.
MAX_LINE_CHARS = 512
#: Longest CSV row (characters): SIEM exports carry many wide columns beside the address.
MAX_CSV_ROW_CHARS = 8192
#: Refused lines quote at most this many characters of the offending text.
MAX_VALUE_CHARS = 100

#: ``detect_format`` reads at most this much of the text.
_DETECT_CHARS = 65536

# Magic numbers of archives an operator may upload by mistake: refusing the whole input says what
# happened, where parsing would refuse every "line" of binary noise.
_COMPRESSED = (
    (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)


class Entry(NamedTuple):
    """One network of the list: ``line`` is 1-based; ``network`` has its host bits cleared."""

    line: int
    network: Network


class Refused(NamedTuple):
    """One line that yields nothing: 1-based ``line``, its ``value`` (stripped, at most
    ``MAX_VALUE_CHARS`` characters) and the ``reason``, a sentence for a human."""

    line: int
    value: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Parsed:
    """What a list contains.

    ``format``: the canonical format used (one of ``FORMATS``); ``detected``:
    whether it was chosen by ``detect_format`` rather than given.
    ``entries``: distinct networks in the order of the list, as ``Entry``
    values; a range contributes several entries with the same line.
    ``duplicates``: how many networks were left out of ``entries`` because an
    earlier line already gave exactly that network (overlapping networks are
    all kept).  ``refused``: lines that yield nothing, in order.  ``lines``:
    the number of lines read.  ``header``: the column names of a CSV or
    DShield header, or ``None``.

    ``items`` holds the entries as parsed: ``(line, network)`` pairs where an
    IPv4 network read from a bare line is the integer ``address << 6 |
    prefixlen`` (``compact_v4``) instead of an ``IPv4Network``, or, when
    ``parse`` was given ``ready``, already the rule spec it becomes.  A
    120k-entry list is read into rules straight from them
    (``importer.parse_specs``); ``entries`` builds the ``ipaddress`` networks,
    on every access.
    """

    format: str
    detected: bool
    items: list[tuple[int, Network | int | rules.RuleSpec]]
    refused: list[Refused]
    duplicates: int
    lines: int
    header: tuple[str, ...] | None = None

    @property
    def entries(self) -> list[Entry]:
        return [Entry(line, _v4_network(network >> 6, network & 63) if type(network) is int
                      else network.network if type(network) is rules.RuleSpec else network)
                for line, network in self.items]

    @property
    def networks(self) -> list[Network]:
        return [entry.network for entry in self.entries]


class Ready(NamedTuple):
    """What lets ``parse`` hand over an IPv4 entry of a bare line as the rule it becomes, skipping the
    importer's per-entry work: the rule's protocol and ports (``like``), and for each first octet whether an
    entry of prefix length 8 or more there needs no policy check (``clear``: 256 booleans).  Built by
    ``importer.parse_specs``, which owns the policy."""

    like: rules.RuleSpec
    clear: Sequence[bool]


#: "/0" .. "/32", indexed by prefix length: an f-string per entry was a seventh of a 120k-entry loop.
PREFIX_SUFFIX = tuple(f"/{length}" for length in range(33))


def compact_v4(address: int, prefixlen: int) -> int:
    """The ``Parsed.items`` form of the IPv4 network ``address/prefixlen`` (no host bits set)."""
    return address << 6 | prefixlen


class _Bad(Exception):
    """A line (or value) is refused; ``reason`` says why.  Never leaves this module."""

    def __init__(self, reason: str):
        self.reason = reason


# --------------------------------------------------------------------------- one value


def parse_value(text: str) -> list[Network]:
    """Parse one address, CIDR (``/len`` or ``/netmask``) or range ``a-b`` into networks.

    A range becomes the minimal list of CIDRs covering exactly it, in order;
    anything else one network, host bits cleared.  Raises
    ``exception.InvalidInput`` (field ``cidr``) with the reason.
    """
    try:
        result = _value(text.strip())
    except _Bad as bad:
        raise exception.InvalidInput("cidr", bad.reason) from None
    return result if isinstance(result, list) else [result]


_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET
_IPv4Address = ipaddress.IPv4Address
_IPv4Network = ipaddress.IPv4Network
_IPv6Network = ipaddress.IPv6Network
_new = object.__new__
_V4_MASKS = tuple((_IPv4Address(((1 << 32) - 1) ^ ((1 << (32 - length)) - 1)), length) for length in range(33))


def _v4_network(address: int, prefixlen: int) -> ipaddress.IPv4Network:
    """``IPv4Network((address, prefixlen))`` for an ``address`` with no host bits set, three times faster.

    A 120k-entry list builds 120k networks, and ``IPv4Network.__init__``
    (string and mask parsing, strictness checks) was a third of parsing it.
    This fills in the same instance attributes the constructor sets (CPython
    3.11's ``ipaddress``); ``_check_v4_network`` compares the two at import
    and this function falls back to the constructor if they ever differ.
    """
    network = _new(_IPv4Network)
    ip = _new(_IPv4Address)
    ip._ip = address
    attrs = network.__dict__
    attrs["network_address"] = ip
    attrs["netmask"], attrs["_prefixlen"] = _V4_MASKS[prefixlen]
    if prefixlen == 32:
        attrs["hosts"] = [ip].copy          # the constructor's ``lambda: [IPv4Address(addr)]``
    elif prefixlen == 31:
        attrs["hosts"] = network.__iter__
    return network


def _check_v4_network() -> bool:
    """Whether ``_v4_network`` builds what ``IPv4Network`` builds (same attributes, equality, hash, text)."""
    for address, prefixlen in ((0xC0000201, 32), (0xC0000200, 31), (0xC0000200, 24), (0x0A000000, 8)):
        fast, real = _v4_network(address, prefixlen), _IPv4Network((address, prefixlen))
        fast_attrs, real_attrs = dict(vars(fast)), dict(vars(real))
        same_hosts = ("hosts" in fast_attrs) == ("hosts" in real_attrs) and \
            list(fast_attrs.pop("hosts", list)()) == list(real_attrs.pop("hosts", list)())
        if not (same_hosts and fast_attrs == real_attrs and fast == real and hash(fast) == hash(real)
                and str(fast) == str(real)):
            return False
    return True


if not _check_v4_network():     # pragma: no cover - another Python's ipaddress
    def _v4_network(address: int, prefixlen: int) -> ipaddress.IPv4Network:  # noqa: F811
        return _IPv4Network((address, prefixlen))


def _value(text: str) -> Network | list[Network]:
    if "-" in text:
        return _range(text)
    address, slash, mask = text.partition("/")
    if ":" not in address:
        # Fast path for the common case: the C parser reads a dotted quad three times faster than
        # ipaddress and refuses exactly what ipaddress refuses (leading zeros, short forms, octets > 255);
        # a network built from an integer skips ipaddress' string parsing.  Anything else takes the slow
        # path, whose error says precisely what is wrong.
        try:
            packed = _inet_pton(_AF_INET, address)
        except (OSError, ValueError):
            pass
        else:
            # Of rules.check_network's refusals only "/0" can apply to an IPv4 network.
            if not slash:
                return _v4_network(int.from_bytes(packed, "big"), 32)
            if mask.isascii() and mask.isdigit() and 0 < int(mask) <= 32:
                length = int(mask)
                return _v4_network(int.from_bytes(packed, "big") & int(_V4_MASKS[length][0]), length)
    try:
        network = (_IPv6Network if ":" in text else _IPv4Network)(text, strict=False)
    except ValueError as exc:
        raise _Bad(f"not an IPv4/IPv6 address, CIDR or range ({exc})") from None
    return _checked(network, text)


def _checked(network: Network, text: str) -> Network:
    try:
        return rules.check_network(network, text)
    except exception.InvalidInput as exc:
        raise _Bad(exc.reason) from None


def _address(text: str, which: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return (ipaddress.IPv6Address if ":" in text else ipaddress.IPv4Address)(text)
    except ValueError as exc:
        raise _Bad(f"the range {which} is not an address ({exc})") from None


def _range(text: str) -> list[Network]:
    parts = text.split("-")
    if len(parts) != 2:
        raise _Bad("not an IPv4/IPv6 address, CIDR or range (a range is two addresses joined by one '-', "
                   "such as 198.51.100.5-198.51.100.9)")
    first = _address(parts[0].strip(), "start")
    last = _address(parts[1].strip(), "end")
    if first.version != last.version:
        raise _Bad("a range cannot go from IPv4 to IPv6")
    if last < first:
        raise _Bad(f"the range ends ({last}) before it starts ({first})")
    # summarize_address_range yields the minimal CIDR cover: at most 2 * (bits - 1) networks.
    return [_checked(network, network.with_prefixlen)
            for network in ipaddress.summarize_address_range(first, last)]


def _one_field(text: str) -> str:
    """The value of a line that holds one address, CIDR or range (``a - b`` with spaces counts as one)."""
    if " " in text or "\t" in text:
        fields = text.split()
        if len(fields) == 3 and fields[1] == "-":
            return f"{fields[0]}-{fields[2]}"
        raise _Bad(f"expected one address, CIDR or range, found {len(fields)} fields")
    return text


def _is_value(text: str) -> bool:
    try:
        _value(_one_field(text))
    except _Bad:
        return False
    return True


# --------------------------------------------------------------------------- line formats
# Each takes one stripped line that is neither blank nor a comment line and returns its networks, or
# None for a column-header line; it raises _Bad with the reason the line is refused.


def _without_comment(line: str, marker: str) -> str:
    return line.partition(marker)[0].rstrip() if marker in line else line


def _plain(line: str) -> Network | list[Network]:
    return _value(_one_field(_without_comment(line, "#")))


def _spamhaus(line: str) -> Network | list[Network]:
    # "192.0.2.0/24 ; SBL000001": the reference after ';' is a comment to us.
    return _value(_one_field(_without_comment(_without_comment(line, ";"), "#")))


def _ipsum(line: str) -> Network | list[Network]:
    fields = _without_comment(line, "#").split()
    if len(fields) > 2:
        raise _Bad(f"expected an address and a count, found {len(fields)} fields")
    if len(fields) == 2 and not (fields[1].isascii() and fields[1].isdigit()):
        raise _Bad(f"the second field should be the number of lists naming the address, not {fields[1]!r}")
    return _value(fields[0])


def _dshield(line: str) -> list[Network] | None:
    fields = line.split("\t")
    if len(fields) < 3:
        fields = line.split()
    if len(fields) < 3:
        raise _Bad("expected tab-separated start, end and netblock (prefix length) fields")
    start, end, prefix = (field.strip() for field in fields[:3])
    if start.lower() == "start":
        return None
    networks = _range(f"{start}-{end}")
    if not (prefix.isascii() and prefix.isdigit()):
        raise _Bad(f"the netblock field should be a prefix length such as 24, not {prefix!r}")
    # A line that contradicts itself blocks nothing: which half would the publisher have meant?
    if len(networks) != 1 or networks[0].prefixlen != int(prefix):
        raise _Bad(f"{start} to {end} is not one /{prefix} netblock, as the line says it is")
    return networks


_LINE_FORMATS: dict[str, tuple[Callable[[str], Network | list[Network] | None], str]] = {
    # format: (line parser, characters that start a comment line)
    "plain": (_plain, "#"),
    "spamhaus": (_spamhaus, ";#"),
    "ipsum": (_ipsum, "#"),
    "dshield": (_dshield, "#"),
}


# --------------------------------------------------------------------------- the whole list


def decode(data: bytes) -> str:
    """Decode a downloaded or uploaded list.

    UTF-8 (a byte-order mark is dropped), or UTF-16 when it starts with a
    UTF-16 byte-order mark (what Windows PowerShell writes).  Bytes that are
    not UTF-8 are replaced, so a Latin-1 comment costs nothing and a damaged
    address is refused with its line.  Raises ``exception.FeedFormatError``
    (field ``data``) for compressed archives and NUL-laden binary data.
    """
    data = bytes(data)
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):].decode("utf-8", errors="replace")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace").lstrip("\ufeff")
    for magic, kind in _COMPRESSED:
        if data.startswith(magic):
            raise exception.FeedFormatError("data", f"is {kind}-compressed; decompress it first")
    if b"\x00" in data[:4096]:
        raise exception.FeedFormatError("data", "contains NUL bytes: binary data, or UTF-16 without a byte-order mark")
    return data.decode("utf-8", errors="replace")


def _lines(text: str) -> list[str]:
    # Split on "\n" only, so line numbers are the ones `sed -n Np` and editors show (str.splitlines would
    # also split on form feeds and Unicode separators); "\r" of CRLF goes with the line's whitespace.
    # A file with only "\r" line ends (classic Mac OS) is split on those.
    lines = text.split("\r" if "\n" not in text and "\r" in text else "\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _clip(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 3] + "..."


def detect_format(text: str) -> str:
    """Name the format of ``text`` (one of ``FORMATS``), deterministically.

    Reads the first two data lines (neither blank nor starting with ``#``,
    nor longer than ``MAX_LINE_CHARS``) within the first 64 KiB, and the
    comment lines before them; the first rule that matches wins:

    1. ``spamhaus``: a line starting with ``;`` comes before the first data
       line, or the first data line is one value followed by ``;``;
    2. ``dshield``: the first data line has three or more tab-separated fields
       that are the DShield header (``Start``, ``End``, ...) or two addresses
       and a prefix length;
    3. ``ipsum``: the first data line is a value, whitespace, and a count;

    4. ``plain``: the first data line is one value (address, CIDR, netmask
       CIDR or range);
    5. ``csv``: the first data line has a comma or a tab, or the second data
       line starts with a value and the first does not look like an address
       (it is a one-column header; a mistyped first entry such as
       ``10.0.0.300`` is refused as plain, not dropped as a header);
    6. ``plain`` otherwise (including an empty or comment-only text).

    In rules 1-3 "value" and "address" include a mistyped one (a digit and a
    ``.`` or ``:``, starting like an address: ``01.2.3.4``, ``10.0.0.300``),
    so that a bad first entry is refused on its line by the list's own
    format, not read as a CSV header or as a plain line with extra fields.
    """
    head = text[:_DETECT_CHARS].lstrip("\ufeff")
    data: list[str] = []
    for raw in _lines(head):
        line = raw.strip()
        if not line or line[0] == "#" or len(line) > MAX_LINE_CHARS:
            continue
        if line[0] == ";":
            if not data:
                return "spamhaus"
            continue
        data.append(line)
        if len(data) == 2:
            break
    if not data:
        return "plain"
    first = data[0]
    # The layouts are told by their shape, with "looks like an address" for the address fields: a mistyped
    # first entry (01.2.3.4, 10.0.0.300) must be refused on its line by the right format, not turn an IPsum
    # or DShield list into CSV (its first line dropped as a header) or a Spamhaus list into plain text (every
    # line refused for its "; SBL" field).
    if ";" in first and _address_like(first.partition(";")[0].strip()):
        return "spamhaus"
    tabbed = [field.strip() for field in first.split("\t")]
    if len(tabbed) >= 3 and (
            (tabbed[0].lower(), tabbed[1].lower()) == ("start", "end")
            or (_address_like(tabbed[0]) and _address_like(tabbed[1]) and tabbed[2].isascii()
                and tabbed[2].isdigit())):
        return "dshield"
    fields = first.split()
    if len(fields) == 2 and fields[1].isascii() and fields[1].isdigit() and _address_like(fields[0]):
        return "ipsum"
    if _is_value(first):
        return "plain"
    if "," in first or "\t" in first:
        return "csv"
    if len(data) == 2 and not _looks_like_value(first) and _is_value(_first_cell(data[1])):
        return "csv"
    return "plain"


def _address_like(text: str) -> bool:
    """A value, or an attempt at one (``_looks_like_value``)."""
    return _looks_like_value(text) or _is_value(text)


def _looks_like_value(text: str) -> bool:
    """An attempt at an address rather than a column name: it has a digit and a '.' or ':' and starts like an
    address (``fe80::1%eth0``, ``10.0.0.300``), so a bad first entry is refused, not read as a header."""
    return (text[:1] in "0123456789abcdefABCDEF:" and any(c.isdigit() for c in text)
            and ("." in text or ":" in text))


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _first_cell(line: str) -> str:
    for delimiter in (",", "\t", ";"):
        line = line.partition(delimiter)[0]
    return line.strip().strip('"')


def _resolve(format: str, column: str | None, text: str) -> tuple[str, bool]:
    if not isinstance(format, str):
        raise exception.FeedFormatError("format", f"must be a string: auto or one of {', '.join(FORMATS)}")
    name = format.strip().lower()
    name = FORMAT_ALIASES.get(name, name)
    if name == AUTO:
        if column is not None:
            return "csv", False        # only CSV has named columns
        return detect_format(text), True
    if name not in FORMATS:
        raise exception.FeedFormatError(
            "format", f"{format!r} is not a known format; use auto or one of {', '.join(FORMATS)}")
    if column is not None and name != "csv":
        raise exception.FeedFormatError("column", f"names a CSV column; it does not apply to format {name}")
    return name, False


def parse(data: bytes | str, format: str = AUTO, column: str | None = None, ready: Ready | None = None) -> Parsed:
    """Parse a block list.

    ``data``: the list as bytes (decoded by ``decode``) or text.  ``format``:
    ``auto`` (``detect_format``), one of ``FORMATS`` or an alias in
    ``FORMAT_ALIASES``.  ``column``: the CSV column holding the addresses,
    matched case-insensitively against the header line (implies ``csv``);
    without it, the first column, and the first row is a header when its
    first cell is not an address.

    Every format accepts, wherever an address goes: an address, a CIDR with a
    prefix length or a netmask (``192.0.2.0/255.255.255.0``), and a range
    ``a-b`` (split into the minimal CIDRs), IPv4 or IPv6; a byte-order mark,
    CRLF line ends, blank lines and surrounding whitespace.

    ``ready``: see ``Ready`` (only the line formats use it; CSV ignores it).

    Raises ``exception.FeedFormatError`` for what makes the whole list
    unreadable (unknown ``format``, ``column`` not in the header or given for
    another format, compressed or binary ``data``); each bad line is only
    reported in ``Parsed.refused``.  Runs in time linear in the input
    (0.4 s for the 120k lines of the IPsum levels file; docs/feeds.md).
    """
    text = decode(data) if isinstance(data, (bytes, bytearray, memoryview)) else data.lstrip("\ufeff")
    name, detected = _resolve(format, column, text)
    with gcpause.paused():
        if ready is not None and name in _UNIFORM_TAIL:
            uniform = _parse_uniform(text, name, detected, ready)
            if uniform is not None:
                return uniform
        lines = _lines(text)
        if name == "csv":
            return _parse_csv(lines, column, detected)
        return _parse_lines(lines, name, detected, ready)


# --------------------------------------------------------------------------- uniform lists

# A list a program wrote: every line one dotted quad, alone or as a /32 in a plain list, followed by a tab
# and a count in IPsum.  Such a list is read with whole-text operations in C instead of the per-line loop:
# the /32 or the count is cut from every line at once, and inet_pton then takes each line whole (exactly as
# the loop's fast path: no leading zero, no octet above 255, nothing around the address).  Any other line
# anywhere - a comment, a blank, another prefix length, a CRLF - sends the whole text to the loop, so the
# two paths never split one list.
_UNIFORM_TAIL = {"plain": re.compile(r"/32\n"), "ipsum": re.compile(r"\t[0-9]{1,20}\n")}
_FIRST_BYTE = operator.itemgetter(0)


def _parse_uniform(text: str, name: str, detected: bool, ready: Ready) -> Parsed | None:
    """``_parse_lines(_lines(text), name, detected, ready)`` for a text whose every line is uniform (see
    ``_UNIFORM_TAIL``), in less than half its time at 120k lines (docs/feeds.md); None for any other text.

    Equal results, item for item, are a unit test's property (tests/unit/test_feed_formats.py)."""
    body = text if text.endswith("\n") else text + "\n"
    bare_text = _UNIFORM_TAIL[name].sub("\n", body)
    addresses = bare_text.split("\n")
    addresses.pop()                                     # after the last "\n"
    try:
        packed = list(map(_inet_pton, itertools.repeat(_AF_INET), addresses))
    except (OSError, ValueError):
        return None                     # not uniform: the loop reads it (and refuses a bad line by number)
    count = len(addresses)
    cidrs = bare_text.replace("\n", PREFIX_SUFFIX[32] + "\n").split("\n")
    cidrs.pop()
    like = ready.like
    values: list = list(map(tuple.__new__, itertools.repeat(rules.RuleSpec),
                            zip(cidrs, itertools.repeat(like.protocol), itertools.repeat(like.from_port),
                                itertools.repeat(like.to_port))))
    # Entries in a /8 that needs the importer's policy check stay networks (compact_v4), as in the loop.
    checked = {octet for octet in range(256) if not ready.clear[octet]}
    if checked:
        for index in itertools.compress(range(count), map(checked.__contains__, map(_FIRST_BYTE, packed))):
            values[index] = compact_v4(int.from_bytes(packed[index], "big"), 32)
    distinct = set(cidrs)
    if len(distinct) == count:
        items = list(zip(range(1, count + 1), values))
    else:
        # The first line of each network stays, as in the loop.
        seen: set[str] = set()
        items = []
        for number, cidr, value in zip(range(1, count + 1), cidrs, values):
            if cidr not in seen:
                seen.add(cidr)
                items.append((number, value))
    return Parsed(name, detected, items, [], count - len(distinct), count, None)


def _seen_key(network: Network) -> object:
    """What makes two networks the same entry: for IPv4 an integer (address and prefix length; ``ipaddress``'
    own ``__hash__`` is Python code, a third of the cost of de-duplicating 120k entries), else the network."""
    if network.version == 4:
        return compact_v4(int(network.network_address), network.prefixlen)
    return network


def _collect(number: int, result: Network | list[Network], seen: set, entries: list[tuple]) -> int:
    """Append the networks of line ``number`` not ``seen`` before to ``entries``; return how many were."""
    duplicates = 0
    for network in (result if type(result) is list else (result,)):
        size = len(seen)
        seen.add(_seen_key(network))       # one hash per network: set.add says nothing, the size does
        if len(seen) == size:
            duplicates += 1
        else:
            entries.append(Entry(number, network))
    return duplicates


# Formats whose line parser reads a line that is only a dotted quad, or a dotted quad and a prefix length, as
# that network: the shared loop reads such lines itself, without the per-line function calls.  IPsum's
# "address<TAB>count" lines are read so too (the value is True for formats with that count).
_BARE_ADDRESS_FORMATS = {"plain": False, "spamhaus": False, "ipsum": True}


def _parse_lines(lines: list[str], name: str, detected: bool, ready: Ready | None = None) -> Parsed:
    parse_line, comment = _LINE_FORMATS[name]
    entries: list[tuple[int, Network | int]] = []
    refused: list[Refused] = []
    seen: set = set()
    duplicates = 0
    header = None
    bare = name in _BARE_ADDRESS_FORMATS
    counted = _BARE_ADDRESS_FORMATS.get(name, False)
    pton, inet, from_bytes = _inet_pton, _AF_INET, int.from_bytes
    masks = [int(mask) for mask, _ in _V4_MASKS]
    clear = ready.clear if ready is not None else None
    if ready is not None:
        spec, make, ntoa = rules.RuleSpec, tuple.__new__, socket.inet_ntoa
        fields = (ready.like.protocol, ready.like.from_port, ready.like.to_port)
        suffix = PREFIX_SUFFIX
    for number, raw in enumerate(lines, 1):
        if len(raw) > MAX_LINE_CHARS:
            refused.append(Refused(number, _clip(raw.strip()),
                                   f"the line is {len(raw)} characters long; at most {MAX_LINE_CHARS} are read"))
            continue
        line = raw.strip()
        if not line or line[0] in comment:
            continue
        if bare:
            # The common line of a large list: one IPv4 address or CIDR (and IPsum's count).  inet_pton
            # accepts exactly the dotted quads ipaddress accepts (see _value); anything else, and a prefix
            # length _value would not take on its fast path, goes to the format's parser.
            value, tab, count = line.partition("\t") if counted else (line, "", "")
            address, slash, length = value.partition("/")
            if (not tab or count.isascii() and count.isdigit()) and (
                    not slash or length.isascii() and length.isdigit() and 0 < int(length) <= 32):
                try:
                    packed = pton(inet, address)
                except (OSError, ValueError):
                    pass
                else:
                    prefixlen = int(length) if slash else 32
                    given = from_bytes(packed, "big")
                    start = given & masks[prefixlen]
                    key = start << 6 | prefixlen     # compact_v4
                    size = len(seen)
                    seen.add(key)
                    if len(seen) == size:
                        duplicates += 1
                    elif clear is not None and prefixlen >= 8 and clear[start >> 24]:
                        # The rule itself (Ready); the address as written is the canonical dotted quad
                        # (inet_pton took it) unless host bits were cleared.
                        cidr = (address if start == given else ntoa(start.to_bytes(4, "big"))) + suffix[prefixlen]
                        entries.append((number, make(spec, (cidr, *fields))))
                    else:
                        entries.append((number, key))
                    continue
        try:
            result = parse_line(line)
        except _Bad as bad:
            refused.append(Refused(number, _clip(line), bad.reason))
            continue
        if result is None:
            if header is None:
                header = tuple(field.strip() for field in line.split("\t"))
            continue
        duplicates += _collect(number, result, seen, entries)
    return Parsed(name, detected, entries, refused, duplicates, len(lines), header)


def _parse_csv(lines: list[str], column: str | None, detected: bool) -> Parsed:
    # Comment and blank lines are dropped before the csv module sees them (an unbalanced quote in a
    # comment must not swallow the rows after it); `numbers` maps the rows it reads back to line numbers.
    numbers: list[int] = []

    def data_lines() -> Iterator[str]:
        for number, raw in enumerate(lines, 1):
            stripped = raw.strip()
            if stripped and stripped[0] != "#":
                numbers.append(number)
                yield raw.rstrip("\r") + "\n"     # a quoted multi-line cell keeps its line breaks

    first = next((line for line in lines if line.strip() and line.strip()[0] != "#"), "")
    delimiter = next((d for d in (",", "\t", ";") if d in first), ",")
    reader = csv.reader(data_lines(), delimiter=delimiter)
    entries: list[tuple[int, Network | int]] = []
    refused: list[Refused] = []
    seen: set = set()
    duplicates = 0
    header: tuple[str, ...] | None = None
    index = 0
    label = "the first column"
    consumed = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # The reader has consumed the bad row's lines and carries on with the next one.
            refused.append(Refused(numbers[consumed] if consumed < len(numbers) else len(lines), "",
                                   f"not readable as CSV ({exc})"))
            consumed = reader.line_num
            continue
        number = numbers[consumed]
        consumed = reader.line_num
        text = delimiter.join(row)
        if len(text) > MAX_CSV_ROW_CHARS:
            refused.append(Refused(number, _clip(text),
                                   f"the row is {len(text)} characters long; at most {MAX_CSV_ROW_CHARS} are read"))
            continue
        if header is None and number == numbers[0]:
            if column is not None:
                header = tuple(cell.strip() for cell in row)
                wanted = column.strip().lower()
                names = [cell.lower() for cell in header]
                if wanted not in names:
                    raise exception.FeedFormatError(
                        "column", f"{column!r} is not in the header line ({_clip(', '.join(header))})")
                index = names.index(wanted)
                label = f"column {header[index]!r}"
                continue
            if row and not _is_value(row[0].strip()):
                header = tuple(cell.strip() for cell in row)
                label = f"column {header[0]!r}" if header[0] else label
                continue
        if index >= len(row):
            refused.append(Refused(number, _clip(text), f"the row has {len(row)} fields; {label} is field {index + 1}"))
            continue
        cell = row[index].strip()
        if not cell:
            refused.append(Refused(number, _clip(text), f"{label} is empty"))
            continue
        try:
            result = _value(_one_field(cell))
        except _Bad as bad:
            hint = "; name the address column with column=" if column is None and header is not None else ""
            refused.append(Refused(number, _clip(text), f"{label}: {bad.reason}{hint}"))
            continue
        duplicates += _collect(number, result, seen, entries)
    if column is not None and header is None:
        raise exception.FeedFormatError("column", "names a CSV column, but the data has no header line")
    return Parsed("csv", detected, entries, refused, duplicates, len(lines), header)
