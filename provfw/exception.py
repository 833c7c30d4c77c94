"""One exception hierarchy for provfw, each class carrying its HTTP status.

The REST layer turns any ``ProvfwError`` into ``{"error": {"code", "message"}}``
with ``code`` as the HTTP status; anything else becomes a 500 with a request
id and no traceback in the body.
"""

from __future__ import annotations

import ipaddress


class ProvfwError(Exception):
    """Base class; ``code`` is the HTTP status the API answers with."""

    code = 500
    message = "An unknown error occurred"

    def __init__(self, message: str | None = None):
        self.message = message or self.message
        super().__init__(self.message)


class ConfigError(ProvfwError):
    code = 500


class InvalidInput(ProvfwError):
    """A request field is malformed; the message always names the field."""

    code = 400

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class FeedFormatError(InvalidInput):
    """A block list cannot be parsed as a whole (``provfw.feeds.formats``).

    An unknown format, a CSV column missing from the header, compressed or
    binary data.  ``field`` names the argument at fault (``format``,
    ``column``, ``data``).  A single bad line is never raised: it is reported
    as refused and the rest of the list still counts.
    """


class BodyTooLarge(ProvfwError):
    code = 413


class UnsupportedMediaType(ProvfwError):
    """The request's Content-Type is not one the operation takes."""

    code = 415


class MethodNotAllowed(ProvfwError):
    """The path exists but not with this method; ``allowed`` goes out in the Allow header."""

    code = 405

    def __init__(self, message: str, allowed: list[str]):
        self.allowed = list(allowed)
        super().__init__(message)


class NotAuthenticated(ProvfwError):
    code = 401
    message = "X-Auth-Token: missing or invalid token"


class Forbidden(ProvfwError):
    code = 403
    message = "this token's role may not perform this action"


class NotFound(ProvfwError):
    code = 404


class RuleNotFound(NotFound):
    def __init__(self, rule_id):
        super().__init__(f"provider firewall rule {rule_id} not found")


class Conflict(ProvfwError):
    code = 409


class DuplicateRule(Conflict):
    def __init__(self, spec=None):
        what = f" for {spec.cidr} {spec.protocol} {spec.from_port}:{spec.to_port}" if spec else ""
        super().__init__(f"a live rule{what} already exists")


def relation_of_bounds(start: int, end: int, low: int, high: int) -> str:
    """How a network meets a range it overlaps, as a refusal says it: "is", "lies within", "contains" or
    "overlaps".  ``start``/``end`` and ``low``/``high``: their first and last addresses, as integers of one
    IP version (what the importer holds for every entry of a list, without parsing it again)."""
    if start == low and end == high:
        return "is"
    if low <= start and end <= high:
        return "lies within"
    if start <= low and high <= end:
        return "contains"
    return "overlaps"


def relation(cidr: str, other: str) -> str:
    """``relation_of_bounds`` for two CIDR strings (host bits cleared)."""
    network, against = ipaddress.ip_network(cidr, strict=False), ipaddress.ip_network(other, strict=False)
    if network.version != against.version:
        return "overlaps"
    return relation_of_bounds(int(network.network_address), int(network.broadcast_address),
                              int(against.network_address), int(against.broadcast_address))


class ProtectedNetwork(Conflict):
    """``relation``: how ``cidr`` meets ``protected`` when the caller knows it already (``relation``'s)."""

    def __init__(self, cidr: str, protected: str, relation_: str | None = None):
        self.protected = protected
        said = relation_ or relation(cidr, protected)
        super().__init__(f"cidr: {cidr} {said} protected network {protected}")


#: The end of a refusal of a non-global range: the API's field and the CLI's flag that opt in.
NON_GLOBAL_HINT = "blocking it needs allow_non_global (provfw CLI: --allow-non-global)"


class NonGlobalNetwork(Conflict):
    """A CIDR overlaps a range that is not globally routed (``rules.NON_GLOBAL_RANGES``) and the caller did
    not opt in (``allow_non_global``).  ``range`` and ``name`` say which range and what breaks."""

    def __init__(self, cidr: str, range_: str, name: str):
        self.range = range_
        self.name = name
        super().__init__(f"cidr: {cidr} {relation(cidr, range_)} {range_}, {name}; {NON_GLOBAL_HINT}")


class ReplaceGuardTripped(Conflict):
    """A replace-sync would stop more of a source's rules in force than the guard allows.

    A truncated download must not unblock the world: the sync changes
    nothing unless the caller passes ``force``.
    """

    def __init__(self, source: str, in_force: int, removing: int, max_fraction: float):
        self.source = source
        self.in_force = in_force
        self.removing = removing
        self.max_fraction = max_fraction
        share = removing / in_force if in_force else 1.0
        super().__init__(f"replace would remove {removing:,} of the {in_force:,} rules of {source} in force "
                         f"({share:.0%}), more than the guard's {max_fraction:.0%} ([feeds] replace_guard_fraction); "
                         "nothing was changed; pass force=true (the CLI's --force) if the list really shrank")


class RuleLimitExceeded(Conflict):
    message = "the configured maximum number of provider firewall rules is reached"


class DriverError(ProvfwError):
    """The dataplane refused or failed an apply; the previous state stays in force."""


class ProcessExecutionError(DriverError):
    def __init__(self, cmd, exit_code: int, stdout: str = "", stderr: str = "", detail: str = ""):
        self.cmd = list(cmd)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        text = f"command {' '.join(self.cmd)!r} exited {exit_code}: {stderr.strip()[:2000]}"
        if detail:
            text += f"\n{detail}"
        super().__init__(text)


class ToolMissing(ProcessExecutionError):
    """A kernel tool (ipset, nft, iptables-restore) is not installed: exit status 127."""


class KernelObjectMissing(DriverError):
    """A table, chain, set or filter the driver expected is not in the kernel (or libvirt)."""


class ConductorUnavailable(ProvfwError):
    """No provfw-conductor answered a request over the bus in time."""

    code = 503


class RpcClientClosed(ConductorUnavailable):
    """The caller's own RPC client was closed (the process is stopping): nothing is wrong with the bus."""


class FeedError(ProvfwError):
    """A feed could not be synced; the rules of its last good list stay in force.

    ``status`` is the short name the feed's ``last_status`` records.
    """

    code = 502
    status = "error"


class FeedFetchError(FeedError):
    """The list could not be downloaded (connection, TLS, HTTP status, timeout, size limit)."""

    status = "fetch_error"


class FeedTooLarge(FeedFetchError):
    """The list is larger than ``[feeds] max_bytes``."""


class FeedTimeout(FeedFetchError):
    """The download took longer than ``[feeds] fetch_timeout`` seconds, or the server stalled."""


class FeedSuspicious(FeedError):
    """The list downloaded but is not trusted: it cannot be parsed, it is empty while the feed holds rules,
    or the replace guard refused it.  Nothing is changed; ``provfw feed sync NAME --force`` applies it."""

    status = "refused"


class FeedClaimLost(Conflict):
    """Another conductor took over the feed while this one was syncing it (its lease ran out)."""


class DatabaseUnavailable(ProvfwError):
    """The database could not be reached (connection refused, reset, timed out)."""

    code = 503


class SchemaNotReady(ProvfwError):
    """The database answers, but without provfw's schema or with one older than this release; waiting will not
    change that: ``provfw-manage db sync`` does."""

    code = 503


class DBDeadlock(ProvfwError):
    """A transaction kept losing lock races (deadlock, serialisation failure) after every retry."""

    code = 503
