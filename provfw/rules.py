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
* For ``icmp`` ``from_port`` is the ICMP type and ``to_port`` the code;
  ``-1`` (``ANY``) means any type / any code.  A code without a type is
  refused.
* For ``all`` both ports are ``ANY``.
* A CIDR is a plain network (``CIDR_PATTERN``); a description is text without
  control characters (``TEXT_PATTERN``); an expiry is at most ``MAX_LIFETIME``
  ahead.  ``provfw.api.schemas`` publishes these same constants in the API's
  JSON Schema, so the contract and this module cannot drift.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
from typing import Any, Iterable, Mapping

from provfw import exception

ANY = -1
PROTOCOLS = ("tcp", "udp", "icmp", "all")
MIN_PORT = 1
MAX_PORT = 65535
MAX_ICMP = 255
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


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class RuleSpec:
    """The matching part of one provider firewall rule, already normalised.

    Two rules with equal ``RuleSpec`` match exactly the same packets; the
    database enforces that at most one live rule exists per spec.
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
        return dataclasses.asdict(self)


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
    if network.prefixlen == 0:
        raise exception.InvalidInput(field, f"{value!r} has prefix length 0; blocking every address is refused")
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
        raise exception.InvalidInput(field, f"{value!r} is an IPv4-mapped IPv6 network; use the IPv4 form")
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
        _check_range(start, 0, MAX_ICMP, "from_port", allow_any=True)
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
    """Return the first protected network that ``cidr`` overlaps, if any."""
    network = ipaddress.ip_network(cidr) if isinstance(cidr, str) else cidr
    for candidate in protected:
        if candidate.version == network.version and candidate.overlaps(network):
            return candidate
    return None


def check_not_protected(spec: RuleSpec, protected: Iterable[Network]) -> None:
    hit = protected_overlap(spec.cidr, protected)
    if hit is not None:
        raise exception.ProtectedNetwork(spec.cidr, str(hit))
