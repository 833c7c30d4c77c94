"""Provider firewall rules as plain values: parsing, normalisation, validation.

Everything that decides whether a rule is well formed lives here, so the REST
API, the bulk importer, the database layer and every firewall driver agree on
one meaning of a rule.  Nothing in this module touches the database, the
network or the kernel.

Conventions (kept from Nova's security-group rules so operators recognise them):

* ``protocol`` is one of ``tcp``, ``udp``, ``icmp`` or ``all``.  For an IPv6
  CIDR, ``icmp`` means ICMPv6.
* For ``tcp``/``udp`` the ports are a destination port range ``from_port`` ..
  ``to_port`` (1-65535).  Omitting both means every port (1-65535).
* For ``icmp`` ``from_port`` is the ICMP type (0-254) and ``to_port`` the
  code (0-255); ``-1`` (``ANY``) means any type / any code.  A code without a
  type is refused, and so is type 255 (``MAX_ICMP_TYPE``).
* For ``all`` both ports are ``ANY``.
* A CIDR is a plain network (``CIDR_PATTERN``); a description is text without
  control characters (``TEXT_PATTERN``); an expiry is at most ``MAX_LIFETIME``
  ahead.  ``provfw.api.schemas`` publishes these same constants in the API's
  JSON Schema, so the contract and this module cannot drift.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import ipaddress
import re
import socket
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from provfw import exception

ANY = -1
PROTOCOLS = ("tcp", "udp", "icmp", "all")
MIN_PORT = 1
MAX_PORT = 65535
MAX_ICMP = 255         # the highest ICMP code
# The highest ICMP type a rule may name.  Type 255 is reserved in ICMP and ICMPv6, and iptables' icmp match
# (so the iptables, ipset, iptc and nwfilter drivers alike) reads type 255 as "any type": a rule for it would
# drop every ICMP packet from the network while nftables dropped none.  No driver can enforce it as asked.
MAX_ICMP_TYPE = 254
MAX_DESCRIPTION = 255
MAX_LIFETIME = 10 * 365 * 24 * 3600   # seconds: the furthest a rule may expire, by ttl or by expires_at

# A plain network as the kernel tools write it: hex digits, dots and colons, then at most one decimal prefix
# length without leading zeros.  Python's ipaddress accepts more (IPv6 scope ids such as fe80::1%eth0,
# netmask and hostmask forms, zero-padded prefixes) and a scope id would even survive normalisation into
# the stored CIDR, which every ip6tables-restore then refuses.  The grammar is checked before ipaddress
# parses, and the API's JSON Schema publishes the same pattern: the two cannot drift.  [0-9], never \d,
# which matches every Unicode digit in Python.
CIDR_PATTERN = r"^[0-9A-Fa-f.:]+(/(0|[1-9][0-9]{0,2}))?$"
CIDR_MAX_LENGTH = 49   # ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128
# Text that is stored and shown (descriptions): no C0 or C1 control character and no DEL.  PostgreSQL
# refuses NUL in text columns, terminals interpret the rest.  Lone surrogates never get this far: the API
# refuses them while decoding the request (they are not Unicode text).
TEXT_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"
# RFC 3339 date-time (the JSON Schema / OpenAPI "date-time" format): the offset is required.
TIMESTAMP_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
MAX_TIMESTAMP_LENGTH = 64


def python_pattern(pattern: str) -> re.Pattern:
    """Compile a JSON Schema (ECMA-262) pattern anchored with ``^...$`` so that it means what ECMA says.

    Python's ``$`` also matches before a final newline: ``"x\\n"`` would pass ``^[^\\u0000-\\u001f]*$``.
    ``\\Z`` does not; the patterns used here use nothing else that differs between the two dialects.
    """
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


_CIDR_RE = python_pattern(CIDR_PATTERN)
_TEXT_RE = python_pattern(TEXT_PATTERN)
_TIMESTAMP_RE = python_pattern(TIMESTAMP_PATTERN)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RuleSpec(NamedTuple):
    """The matching part of one provider firewall rule, already normalised.

    Two rules with equal ``RuleSpec`` match exactly the same packets; the
    database enforces that at most one live rule exists per spec.

    A NamedTuple rather than a dataclass: specs are dictionary keys and set
    members by the hundred thousand (a replace-sync of a 120k list, a host's
    applied rules), and a tuple hashes and compares in C - a frozen
    dataclass's generated ``__hash__`` made hashing the larger part of a
    replace-sync.  Ordering is the fields' order, as before.
    """

    cidr: str
    protocol: str
    from_port: int = ANY
    to_port: int = ANY

    @property
    def network(self) -> Network:
        return ipaddress.ip_network(self.cidr)

    @property
    def version(self) -> int:
        return 6 if ":" in self.cidr else 4

    @property
    def is_full_port_range(self) -> bool:
        return self.from_port == MIN_PORT and self.to_port == MAX_PORT

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


class Rule(NamedTuple):
    """A live rule as the hosts see it: its database id, what it matches, and its expiry.

    ``expires_at`` is POSIX seconds (UTC), or None for a permanent rule.
    The wire form (casts and conductor replies) is the list
    ``[id, cidr, protocol, from_port, to_port, expires_at]``.

    A NamedTuple, as ``RuleSpec`` is: a host decodes one per rule of a
    snapshot (120k), and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) made building them twice as slow
    (``rules_from_wire``).
    """

    id: int
    spec: RuleSpec
    expires_at: float | None = None

    def to_wire(self) -> list:
        spec = self.spec
        return [self.id, spec.cidr, spec.protocol, spec.from_port, spec.to_port, self.expires_at]

    @classmethod
    def from_wire(cls, item: Sequence[Any]) -> "Rule":
        """Parse one wire form; ValueError when it is not ``[int, str, str, int, int, number|None]``."""
        return rules_from_wire((item,))[0]


def rules_from_wire(items: Iterable[Any]) -> list[Rule]:
    """Every item's ``Rule`` (wire form ``[int, str, str, int, int, number|None]``); ValueError naming the first
    malformed one.

    The values are not re-validated as a rule (the conductor read them from
    the database the API validated); a host that cannot enforce one
    quarantines it.  Types are compared exactly (``type(x) is int``: a JSON
    ``true`` is not a port).  A host's hot path: 120k rules of a snapshot are
    built with ``tuple.__new__`` (RuleSpec's own ``__new__`` is Python) in
    about half the time of the per-item constructor calls it replaced.
    """
    new, rule_type, spec_type = tuple.__new__, Rule, RuleSpec
    out: list[Rule] = []
    append = out.append
    for item in items:
        if type(item) not in (list, tuple) or len(item) != 6:
            raise ValueError(f"a rule is [id, cidr, protocol, from_port, to_port, expires_at], not {item!r}")
        rule_id, cidr, protocol, from_port, to_port, expires = item
        if not (type(rule_id) is int and type(cidr) is str and type(protocol) is str
                and type(from_port) is int and type(to_port) is int
                and (expires is None or type(expires) is float or type(expires) is int)):
            raise ValueError(f"malformed rule {item!r}")
        append(new(rule_type, (rule_id, new(spec_type, (cidr, protocol, from_port, to_port)),
                               None if expires is None else float(expires))))
    return out


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every live, unexpired rule as of one generation (what a host needs to start from nothing)."""

    generation: int
    rules: list[Rule]


@dataclasses.dataclass(frozen=True)
class Changes:
    """What changed between generation ``since`` and ``generation``: rules added and removed.

    Every transaction (one mutation, or a group commit of several: ``merge_changes``) bumps the generation by
    exactly one, so the change it commits has ``since == generation - 1``.  ``added`` may name a
    spec a host already enforces under an older id (re-created, renewed):
    hosts match removals by rule id, not by spec.
    """

    since: int
    generation: int
    added: list[Rule]
    removed: list[Rule]

    @property
    def size(self) -> int:
        return len(self.added) + len(self.removed)


def merge_changes(changes: Sequence[Changes]) -> Changes:
    """The one change hosts get for several mutations committed in ONE transaction (a group commit).

    ``changes`` (at least one, in the order the mutations ran) all go from
    ``since`` to ``generation``.  Rule ids are never reused (a deleted row
    stays deleted), so a rule removed by any of them is removed, whatever an
    earlier one added for it; of several ``added`` entries for one id (created
    then renewed) the last wins.  Raises ValueError for an empty list or
    changes of different generations.
    """
    if not changes:
        raise ValueError("merge_changes needs at least one change")
    since, generation = changes[0].since, changes[0].generation
    if len(changes) == 1:
        return changes[0]
    for change in changes:
        if (change.since, change.generation) != (since, generation):
            raise ValueError(f"change {change.since}->{change.generation} is not {since}->{generation}")
    return _combined(changes, since, generation)


def compose_changes(changes: Sequence[Changes]) -> Changes:
    """One change for a chain of generations: ``changes[0].since`` -> ``changes[-1].generation``.

    Each change must start where the one before it ended (``since ==``
    the previous ``generation``).  What a worker applies once when several
    casts arrived while it was busy (``ComputeManager.apply_casts``; Felix
    batches its dataplane updates the same way).  Rule ids are never reused,
    so the rules of ``merge_changes`` hold across generations too: a rule
    removed by any change is removed (one created and removed within the
    chain is then a removal the host does not hold, which it ignores), and of
    several ``added`` entries for one id the last wins.  Raises ValueError for
    an empty list or a chain with a gap.
    """
    if not changes:
        raise ValueError("compose_changes needs at least one change")
    for before, after in zip(changes, changes[1:]):
        if after.since != before.generation:
            raise ValueError(f"change {after.since}->{after.generation} does not follow generation "
                             f"{before.generation}")
    if len(changes) == 1:
        return changes[0]
    return _combined(changes, changes[0].since, changes[-1].generation)


def _combined(changes: Sequence[Changes], since: int, generation: int) -> Changes:
    removed: dict[int, Rule] = {}
    for change in changes:
        for rule in change.removed:
            removed[rule.id] = rule
    added: dict[int, Rule] = {}
    for change in changes:
        for rule in change.added:
            if rule.id not in removed:
                added[rule.id] = rule
    return Changes(since, generation, list(added.values()), list(removed.values()))


def normalise_cidr(value: Any, field: str = "cidr") -> str:
    """Return ``value`` as a canonical network string (see ``parse_network``)."""
    return parse_network(value, field).with_prefixlen


def parse_network(value: Any, field: str = "cidr") -> Network:
    """Parse ``value`` as a network.

    ``value`` must be a plain address or CIDR (``CIDR_PATTERN``: no IPv6 scope id, no netmask form, no
    zero-padded prefix; surrounding whitespace is ignored, as in a line of a text import).  A bare address
    becomes a /32 (IPv4) or /128 (IPv6); host bits are cleared (``192.168.100.11/24`` -> ``192.168.100.0/24``);
    IPv6 is compressed and lower-cased so string equality means network equality.  ``/0`` is refused: a
    provider rule that blocks the whole internet is never what an admin meant.  Raises ``InvalidInput`` naming
    ``field``.
    """
    if not isinstance(value, str) or not value.strip():
        raise exception.InvalidInput(field, "must be a non-empty string such as 203.0.113.0/24")
    value = value.strip()
    shown = value if len(value) <= CIDR_MAX_LENGTH else value[:CIDR_MAX_LENGTH] + "..."
    if len(value) > CIDR_MAX_LENGTH or not _CIDR_RE.match(value):
        raise exception.InvalidInput(field, f"{shown!r} is not a valid IPv4/IPv6 address or CIDR: only digits, "
                                            "hex letters, '.' and ':' and one '/prefix' (no scope id, no netmask)")
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise exception.InvalidInput(field, f"{value!r} is not a valid IPv4/IPv6 address or CIDR ({exc})") from None
    return check_network(network, value, field)


def check_network(network: Network, text: str | None = None, field: str = "cidr") -> Network:
    """Return ``network`` if a rule may match it; raise ``InvalidInput`` otherwise.

    The policy half of ``parse_network``, for callers that built the network
    themselves (the feed parser, which splits ranges into networks):
    ``/0`` is refused, and so are an IPv4-mapped IPv6 network and an IPv6
    scope id (``fe80::1%eth0``: ``ipaddress`` keeps the zone in the network,
    and no kernel tool takes it).  ``text`` is the spelling the message
    quotes (default: the network itself).
    """
    if network.version == 6 and (network.network_address.scope_id is not None or "%" in (text or "")):
        raise exception.InvalidInput(
            field, f"{text or str(network)!r} has an IPv6 scope id (%zone): a zone names one host's interface; "
                   "give the address without it")
    if network.prefixlen == 0:
        raise exception.InvalidInput(
            field, f"{text or network.with_prefixlen!r} has prefix length 0; blocking every address is refused")
    if network.version == 6 and network.network_address.ipv4_mapped is not None:
        raise exception.InvalidInput(
            field, f"{text or network.with_prefixlen!r} is an IPv4-mapped IPv6 network; use the IPv4 form")
    return network


def _as_int(value: Any, field: str) -> int:
    """An int, a number with a zero fractional part (``22.0``, an integer as JSON Schema means it) or a
    string of ASCII digits (Python callers; the API's schema takes only JSON integers)."""
    # bool is an int subclass; True as a port is always a client bug.
    if isinstance(value, bool):
        raise exception.InvalidInput(field, "must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text.startswith("-") else text
        # ASCII only: int() also reads Arabic-Indic and other Unicode digits.
        if digits.isascii() and digits.isdigit() and len(digits) <= 20:
            return int(text)
    raise exception.InvalidInput(field, "must be an integer")


def _check_range(value: int, low: int, high: int, field: str, allow_any: bool = False) -> None:
    if allow_any and value == ANY:
        return
    if not low <= value <= high:
        extra = " or -1 for any" if allow_any else ""
        raise exception.InvalidInput(field, f"{value} is out of range {low}-{high}{extra}")


def make_spec(cidr: Any, protocol: Any = "all", from_port: Any = None, to_port: Any = None,
              protected: Iterable[Network] = ()) -> RuleSpec:
    """Validate and normalise one rule; raise ``InvalidInput`` naming the bad field.

    With ``protected`` networks, a CIDR overlapping one of them raises
    ``ProtectedNetwork`` (checked on the already parsed network: an import of
    120k entries parses each address once).
    """
    network = parse_network(cidr)
    hit = protected_overlap(network, protected) if protected else None
    if hit is not None:
        raise exception.ProtectedNetwork(network.with_prefixlen, str(hit))
    cidr_text = network.with_prefixlen
    if protocol is None:
        protocol = "all"
    if not isinstance(protocol, str) or protocol.strip().lower() not in PROTOCOLS:
        raise exception.InvalidInput("protocol", f"{str(protocol)[:20]!r} is not one of {', '.join(PROTOCOLS)}")
    proto = protocol.strip().lower()
    start = None if from_port is None else _as_int(from_port, "from_port")
    end = None if to_port is None else _as_int(to_port, "to_port")

    if proto in ("tcp", "udp"):
        if start is None and end is None:
            start, end = MIN_PORT, MAX_PORT
        elif start is None:
            raise exception.InvalidInput("from_port", "is required when to_port is given")
        elif end is None:
            end = start
        _check_range(start, MIN_PORT, MAX_PORT, "from_port")
        _check_range(end, MIN_PORT, MAX_PORT, "to_port")
        if start > end:
            raise exception.InvalidInput("from_port", f"{start} is greater than to_port {end}")
    elif proto == "icmp":
        start = ANY if start is None else start
        end = ANY if end is None else end
        if start == MAX_ICMP_TYPE + 1:
            raise exception.InvalidInput("from_port", f"ICMP type {start} is reserved, and iptables matches it as "
                                                      "any type; use -1 to block every ICMP type")
        _check_range(start, 0, MAX_ICMP_TYPE, "from_port", allow_any=True)
        _check_range(end, 0, MAX_ICMP, "to_port", allow_any=True)
        if start == ANY and end != ANY:
            raise exception.InvalidInput("to_port", "an ICMP code needs an ICMP type in from_port")
    else:
        for name, value in (("from_port", start), ("to_port", end)):
            if value not in (None, ANY):
                raise exception.InvalidInput(name, "must be omitted when protocol is 'all'")
        start = end = ANY
    return RuleSpec(cidr_text, proto, start, end)


def spec_from_body(body: Mapping[str, Any], protected: Iterable[Network] = ()) -> RuleSpec:
    """Build a ``RuleSpec`` from a decoded JSON request body."""
    if not isinstance(body, Mapping):
        raise exception.InvalidInput("body", "must be a JSON object")
    if "cidr" not in body:
        raise exception.InvalidInput("cidr", "is required")
    return make_spec(body.get("cidr"), body.get("protocol", "all"), body.get("from_port"), body.get("to_port"),
                     protected)


def validate_description(value: Any, field: str = "description") -> str | None:
    """A description: ``None`` or ``""`` (none), else at most ``MAX_DESCRIPTION`` characters of text
    without control characters (``TEXT_PATTERN``).  Raises ``InvalidInput`` naming ``field``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise exception.InvalidInput(field, "must be a string")
    if len(value) > MAX_DESCRIPTION:
        raise exception.InvalidInput(field, f"is longer than {MAX_DESCRIPTION} characters")
    if not _TEXT_RE.match(value):
        raise exception.InvalidInput(field, "must not contain control characters (U+0000-U+001F, U+007F-U+009F)")
    return value


def parse_timestamp(value: Any, field: str = "expires_at") -> datetime.datetime:
    """Parse an RFC 3339 date-time (``2026-12-01T00:00:00Z``, ``2026-12-01T01:00:00+01:00``) to naive UTC.

    The offset is required: a zone-less time means a different instant on every machine that reads it.
    Fractions beyond microseconds are truncated.  Raises ``InvalidInput`` naming ``field``.
    """
    if not isinstance(value, str) or len(value) > MAX_TIMESTAMP_LENGTH or not _TIMESTAMP_RE.match(value):
        shown = str(value)[:MAX_TIMESTAMP_LENGTH]
        raise exception.InvalidInput(field, f"{shown!r} is not an RFC 3339 date-time with a UTC offset, "
                                            "e.g. 2026-12-01T00:00:00Z")
    text = value.upper()
    if "." in text:   # fromisoformat takes at most 6 fraction digits
        head, rest = text.split(".", 1)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError) as exc:
        raise exception.InvalidInput(field, f"{value!r} is not a valid date-time ({exc})") from None


def expiry(ttl: Any = None, expires_at: Any = None, now: datetime.datetime | None = None) -> datetime.datetime | None:
    """When a rule given ``ttl`` (integer seconds) or ``expires_at`` (RFC 3339) expires, as naive UTC.

    Never both; never in the past; never more than ``MAX_LIFETIME`` seconds ahead, whichever way it is
    given.  ``None`` for a permanent rule.  Raises ``InvalidInput`` naming the field.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    if expires_at is not None and ttl is not None:
        raise exception.InvalidInput("ttl", "give either ttl or expires_at, not both")
    if ttl is not None:
        seconds = _as_int(ttl, "ttl")
        if not 0 < seconds <= MAX_LIFETIME:
            raise exception.InvalidInput("ttl", f"must be between 1 and {MAX_LIFETIME} seconds (ten years)")
        return now + datetime.timedelta(seconds=seconds)
    if expires_at is None:
        return None
    value = parse_timestamp(expires_at, "expires_at")
    if value <= now:
        raise exception.InvalidInput("expires_at", "is in the past")
    if value > now + datetime.timedelta(seconds=MAX_LIFETIME):
        raise exception.InvalidInput("expires_at", f"is more than ten years ({MAX_LIFETIME} seconds) ahead")
    return value


def external_block_specs(cidr: str) -> list[RuleSpec]:
    """The three rules the seed's ``block_external_addresses`` creates for one CIDR."""
    return [
        make_spec(cidr, "tcp", MIN_PORT, MAX_PORT),
        make_spec(cidr, "udp", MIN_PORT, MAX_PORT),
        make_spec(cidr, "icmp", ANY, ANY),
    ]


def parse_protected_networks(values: Iterable[str]) -> list[Network]:
    """Parse the configured protected (management) networks; bad config fails loudly."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise exception.ConfigError(f"protected_cidrs: {value!r} is not a CIDR ({exc})") from None
    return networks


def protected_overlap(cidr: str | Network, protected: Iterable[Network]) -> Network | None:
    """Return the first protected network that ``cidr`` overlaps, if any.

    Compares integer bounds (``ipaddress``' own ``overlaps`` builds each network's broadcast address and
    hostmask: three quarters of the policy check of a 120k-entry list).
    """
    network = ipaddress.ip_network(cidr) if isinstance(cidr, str) else cidr
    version = network.version
    start, end = _bounds(network)
    for candidate in protected:
        if candidate.version == version:
            low, high = _bounds(candidate)
            if low <= end and start <= high:
                return candidate
    return None


def check_not_protected(spec: RuleSpec, protected: Iterable[Network]) -> None:
    hit = protected_overlap(spec.cidr, protected)
    if hit is not None:
        raise exception.ProtectedNetwork(spec.cidr, str(hit))


# --------------------------------------------------------------------------- non-global sources

class NonGlobalRange(NamedTuple):
    """A range no provider rule should block by default, and why.

    ``name`` says what the range is and what breaks if it is blocked, for a
    human; a refusal reads ``f"{cidr} lies within {hit.network}, {hit.name}"`` (``exception.relation``).
    """

    network: Network
    name: str


#: Source ranges a provider firewall must not block unless the admin insists.  Each of them either never
#: comes from the internet (a rule there only hurts traffic inside the cloud) or is traffic the cloud itself
#: depends on.  Kept sorted and disjoint per family (checked below): ``non_global_overlap`` bisects it.
#: Deliberately absent: the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
#: 2001:db8::/32) and the benchmarking range 198.18.0.0/15, which tests and docs use as attackers.
NON_GLOBAL_RANGES: tuple[NonGlobalRange, ...] = tuple(
    NonGlobalRange(ipaddress.ip_network(cidr), name) for cidr, name in (
        ("0.0.0.0/8", "'this network' (RFC 1122): instances' DHCP requests come from 0.0.0.0"),
        ("10.0.0.0/8", "private network (RFC 1918): tenant and management traffic"),
        ("100.64.0.0/10", "shared address space (RFC 6598): carrier-grade NAT and provider-internal networks"),
        ("127.0.0.0/8", "loopback (RFC 1122)"),
        ("169.254.0.0/16", "link-local (RFC 3927): the metadata service 169.254.169.254"),
        ("172.16.0.0/12", "private network (RFC 1918): tenant and management traffic"),
        ("192.168.0.0/16", "private network (RFC 1918): tenant and management traffic"),
        ("224.0.0.0/4", "multicast (RFC 5771)"),
        ("::/128", "unspecified address (RFC 4291): IPv6 duplicate address detection sends from it"),
        ("::1/128", "loopback (RFC 4291)"),
        ("fc00::/7", "unique local addresses (RFC 4193): tenant and management traffic"),
        ("fe80::/10", "link-local (RFC 4291): neighbour discovery and the metadata service fe80::a9fe:a9fe"),
        ("ff00::/8", "multicast (RFC 4291)"),
    ))


def _bounds(network: Network) -> tuple[int, int]:
    # Integer arithmetic rather than broadcast_address: this runs once per entry of a 120k-line import.
    start = int(network.network_address)
    return start, start | ((1 << (network.max_prefixlen - network.prefixlen)) - 1)


def _non_global_index() -> dict[int, tuple[list[int], list[int], list[NonGlobalRange]]]:
    index: dict[int, tuple[list[int], list[int], list[NonGlobalRange]]] = {}
    for item in NON_GLOBAL_RANGES:
        starts, ends, items = index.setdefault(item.network.version, ([], [], []))
        start, end = _bounds(item.network)
        if ends and start <= ends[-1]:
            raise AssertionError(f"NON_GLOBAL_RANGES must be sorted and disjoint: {item.network}")
        starts.append(start)
        ends.append(end)
        items.append(item)
    return index


_NON_GLOBAL_INDEX = _non_global_index()


def non_global_overlap(network: Network | str) -> NonGlobalRange | None:
    """Return the non-global range ``network`` overlaps, or ``None`` if it is global.

    Overlap in either direction counts: ``10.1.2.3/32`` is inside 10.0.0.0/8 and
    ``8.0.0.0/6`` covers it; both return the 10.0.0.0/8 entry.  When a
    supernet covers several ranges the lowest one is returned (``0.0.0.0/1``
    -> 0.0.0.0/8).  A string is parsed with host bits cleared and may raise
    ``ValueError``.  O(log n) in ``NON_GLOBAL_RANGES``.
    """
    if isinstance(network, str):
        network = ipaddress.ip_network(network, strict=False)
    return non_global_between(network.version, *_bounds(network))


def non_global_between(version: int, start: int, end: int) -> NonGlobalRange | None:
    """``non_global_overlap`` of the addresses ``start``..``end`` (integers, inclusive) of IP ``version``."""
    starts, ends, items = _NON_GLOBAL_INDEX[version]
    # The first range ending at or after our start is the only candidate for the lowest overlap.
    i = bisect.bisect_left(ends, start)
    if i < len(items) and starts[i] <= end:
        return items[i]
    return None


_ntoa = socket.inet_ntoa


def cidr_text(network: Network) -> str:
    """``network.with_prefixlen``, a dozen times faster for IPv4 (``inet_ntoa`` in C instead of
    ``ipaddress``' Python formatting; the same text: dotted quad, no leading zeros)."""
    if network.version == 4:
        return f"{_ntoa(network.network_address.packed)}/{network.prefixlen}"
    return network.with_prefixlen
