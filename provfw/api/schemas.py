"""The API contract: JSON Schema (Draft 2020-12) for every request body, parameter and response, the table
of operations, request validation, and the OpenAPI 3.1 document built from them.

Design: every schema is written once, here, as a component of the OpenAPI document; ``validate()`` checks a
request against that same object and ``openapi_document()`` publishes it, so what the API accepts and what it
documents cannot drift.  Field domains (ports, protocols, the CIDR grammar, text, lifetimes) come from
``provfw.rules``, the single meaning of a rule; what JSON Schema cannot say (a CIDR parses, from_port <=
to_port, an expiry lies in the future, protected networks) stays in ``provfw.rules`` and is checked after the
schema, answering 400 (or 409) naming the field.

Adding a route: add an ``Operation`` to ``OPERATIONS`` under its controller action, any new schema to
``SCHEMAS``, and connect the route in ``provfw/api/router.py``.  ``wsgi.Router`` refuses to start with a route
that has no operation, and tests/unit/test_api_schemas.py keeps the mapper and the document in step.

Thread-safety: everything here is built at import and never changed; validators are thread-safe.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Iterable

import jsonschema
import referencing
import referencing.jsonschema

from provfw import exception, rules, sources
from provfw.feeds import formats

DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_URI = "urn:provfw:api"          # the document's id when resolving "#/components/..." references
MAX_PAGE = 10000
DEFAULT_PAGE = 1000
MAX_AUDIT_PAGE = 1000
MAX_ID = 2**63 - 1                   # ids are BIGINT on PostgreSQL and MariaDB, INTEGER (64 bits) on SQLite
JSON = "application/json"
TEXT = "text/plain"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (null means the same as leaving the field out)."""
    result = dict(schema)
    kind = result.get("type")
    if isinstance(kind, str):
        result["type"] = [kind, "null"]
    if "enum" in result:
        result["enum"] = [*result["enum"], None]
    return result


# --------------------------------------------------------------------------- field domains (from provfw.rules)

CIDR = {
    "type": "string", "minLength": 1, "maxLength": rules.CIDR_MAX_LENGTH, "pattern": rules.CIDR_PATTERN,
    "description": "An IPv4 or IPv6 address or network (203.0.113.0/24, 2001:db8::/48). A bare address means "
                   "/32 or /128; host bits are cleared. No whitespace, IPv6 scope id (%eth0) or netmask form; "
                   "prefix length 0 and IPv4-mapped IPv6 are refused (400); a network overlapping a protected "
                   "network is refused (409).",
    "examples": ["203.0.113.0/24"],
}
PROTOCOL = {"type": "string", "enum": list(rules.PROTOCOLS),
            "description": "tcp, udp, icmp (ICMPv6 for an IPv6 cidr) or all (default)."}
PORT = {"type": "integer", "minimum": rules.ANY, "maximum": rules.MAX_PORT,
        "description": "tcp/udp: a destination port 1-65535 (from_port..to_port; both omitted = every port). "
                       "icmp: from_port is the type (0-254), to_port the code (0-255), -1 for any. all: omit."}
DESCRIPTION = {"type": "string", "maxLength": rules.MAX_DESCRIPTION, "pattern": rules.TEXT_PATTERN,
               "description": "Free text for people, at most 255 characters, no control characters."}
TTL = {"type": "integer", "minimum": 1, "maximum": rules.MAX_LIFETIME,
       "description": "Seconds until the rule expires (at most ten years). Not with expires_at."}
TIMESTAMP = {"type": "string", "format": "date-time", "maxLength": rules.MAX_TIMESTAMP_LENGTH,
             "pattern": rules.TIMESTAMP_PATTERN, "examples": ["2026-12-01T00:00:00Z"],
             "description": "RFC 3339 date-time WITH an offset (Z or +01:00); in the future and at most ten "
                            "years ahead. Not with ttl."}
RULE_ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
GENERATION = {"type": "integer", "minimum": 0,
              "description": "The rule-set generation: every transaction that changes the rules increments it "
                             "by one. Changes made at the same moment may share one (the API commits them "
                             "together), so two answers can name the same generation."}
OUT_TIMESTAMP = {"type": "string", "format": "date-time"}

SOURCE = {"type": "string", "maxLength": sources.MAX_SOURCE_LENGTH, "pattern": sources.SOURCE_PATTERN,
          "description": "Who wants the rule: manual (or manual:LABEL), import:NAME, or feed:NAME (written only "
                         "by feeds). A bare NAME gets the call's kind: manual for rules and blocks, import for "
                         "imports. A rule lives until its last source lets go of it."}
FEED_NAME = {"type": "string", "maxLength": 64, "pattern": f"^{sources.NAME_PATTERN}$",
             "description": "1-64 letters, digits, '.', '_' or '-'; the feed's rules have source feed:NAME."}
FORMAT = {"type": "string", "enum": [formats.AUTO, *formats.FORMATS, *formats.FORMAT_ALIASES],
          "description": "The list's format (docs/feeds.md); auto (the default) detects it from the first data "
                         "lines and the answer says which was used."}
COLUMN = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": rules.TEXT_PATTERN,
          "description": "CSV: the header name of the address column (implies format csv)."}
FLAG = {"type": "boolean"}
ALLOW_NON_GLOBAL = {**FLAG, "description": "Block non-global source ranges too (loopback, link-local, "
                                           "0.0.0.0/8, RFC 1918, CGNAT, unique-local, multicast), which are "
                                           "refused by default ([DEFAULT] allow_non_global). Audited. Protected "
                                           "networks are refused either way."}
MODE = {"type": "string", "enum": ["add", "replace"],
        "description": "add (default): add the entries to the source. replace: make the source's rules exactly "
                       "the entries (adds and removes, one transaction, one generation); needs an explicit "
                       "source, and is refused (409) when it would remove more than [feeds] "
                       "replace_guard_fraction of the source's rules, unless force."}
_IMPORT_OPTIONS = {"source": SOURCE, "mode": MODE,
                   "dry_run": {**FLAG, "description": "Say what would be added, renewed, removed and refused; "
                                                      "change nothing."},
                   "force": {**FLAG, "description": "Pass the replace guard (the list really shrank)."},
                   "allow_non_global": ALLOW_NON_GLOBAL}

_EXPIRY_EXCLUSIVE = {"ttl": {"not": {"required": ["expires_at"]}}}
# null means "left out" for the fields that have a default; ttl and expires_at are left out or given.
_RULE_OPTIONS = {"protocol": _nullable(PROTOCOL), "from_port": _nullable(PORT), "to_port": _nullable(PORT),
                 "description": _nullable(DESCRIPTION), "ttl": TTL, "expires_at": TIMESTAMP}


def _object(properties: dict[str, Any], required: Iterable[str] = (), closed: bool = True, **extra) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    schema.update(extra)
    return schema


# A feed is fetched over HTTP(S) only (docs/feeds.md).
FEED_URL_PATTERN = r"^https?://[^\s]+$"


# --------------------------------------------------------------------------- schemas (components)

SCHEMAS: dict[str, dict[str, Any]] = {
    # requests
    "RuleCreate": _object({"cidr": CIDR, **_RULE_OPTIONS, "source": SOURCE, "allow_non_global": ALLOW_NON_GLOBAL},
                          required=["cidr"], dependentSchemas=_EXPIRY_EXCLUSIVE,
                          description="One rule. Unknown fields are refused (400). The same rule again with a "
                                      "later expiry (or none) renews it; an earlier one never shortens it."),
    "RuleImport": _object(
        {"cidrs": {"type": "array", "items": {"type": "string"},
                   "description": "One address, CIDR, netmask network or range per item; an item that is not "
                                  "a valid rule is counted in refused with its reason, the others are added."},
         **_RULE_OPTIONS, **_IMPORT_OPTIONS},
        required=["cidrs"], dependentSchemas=_EXPIRY_EXCLUSIVE,
        description="The options apply to every CIDR; they override the same options given in the query."),
    "RuleImportList": {"type": "array", "items": {"type": "string"},
                       "description": "Just the CIDRs; the options come from the query."},
    "RuleImportText": {"type": "string",
                       "description": "A block list in any format of docs/feeds.md (plain, FireHOL, Spamhaus, "
                                      "IPsum, DShield, CSV): see format and column."},
    "ExternalBlock": _object({"cidr": CIDR, "description": _nullable(DESCRIPTION), "ttl": TTL,
                              "expires_at": TIMESTAMP, "source": SOURCE, "allow_non_global": ALLOW_NON_GLOBAL},
                             required=["cidr"], dependentSchemas=_EXPIRY_EXCLUSIVE),
    "ExternalUnblock": _object({"cidr": CIDR, "description": _nullable(DESCRIPTION),
                                "source": {**SOURCE, "description": "Only this source lets go; rules other "
                                                                    "sources want stay (kept)."}},
                               required=["cidr"]),
    "FeedCreate": _object({
        "name": FEED_NAME,
        "url": {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": FEED_URL_PATTERN,
                "description": "http:// or https://; fetched by the conductor with ETag / Last-Modified."},
        "format": FORMAT, "column": _nullable(COLUMN),
        "interval": {"type": "integer", "minimum": 1, "maximum": 7 * 86400,
                     "description": "Seconds between syncs; at least [feeds] min_interval."},
        "protocol": _nullable(PROTOCOL), "from_port": _nullable(PORT), "to_port": _nullable(PORT),
        "ttl": {**_nullable(TTL), "description": "Listed rules expire this many seconds after the last sync that "
                                                 "saw them (at least twice the interval); null: never, the "
                                                 "rules go when the list drops them."},
        "enabled": FLAG, "allow_non_global": ALLOW_NON_GLOBAL, "description": _nullable(DESCRIPTION),
    }, required=["name", "url", "interval"], description="A feed the conductor replace-syncs on schedule."),
    "FeedUpdate": _object({
        "url": {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": FEED_URL_PATTERN},
        "format": FORMAT, "column": _nullable(COLUMN), "interval": {"type": "integer", "minimum": 1,
                                                                    "maximum": 7 * 86400},
        "protocol": _nullable(PROTOCOL), "from_port": _nullable(PORT), "to_port": _nullable(PORT),
        "ttl": _nullable(TTL), "enabled": FLAG, "allow_non_global": ALLOW_NON_GLOBAL,
        "description": _nullable(DESCRIPTION),
    }, description="The settings to change; a change other than description makes the feed due at once."),
    # responses
    "Error": _object({"error": _object({"code": {"type": "integer", "minimum": 400, "maximum": 599},
                                        "message": {"type": "string"}}, required=["code", "message"])},
                     required=["error"],
                     description="Every error. code is the HTTP status; message names the field or "
                                 "parameter at fault first ('cidr: ...')."),
    "Rule": _object({
        "id": RULE_ID, "cidr": {"type": "string"}, "protocol": PROTOCOL,
        "from_port": {"type": "integer"}, "to_port": {"type": "integer"},
        "description": {"type": ["string", "null"]}, "created_by": {"type": ["string", "null"]},
        "created_at": OUT_TIMESTAMP, "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "generation": {**GENERATION, "description": "The generation that created the rule."},
        "updated_generation": {"type": ["integer", "null"], "minimum": 0,
                               "description": "The generation that last changed its expiry, or null."},
        "sources": {"type": "array", "items": _object({"source": {"type": "string"}, "expires_at": {
            "type": ["string", "null"], "format": "date-time"}}, required=["source", "expires_at"]),
            "description": "Who wants the rule and until when; expires_at is the latest of these."},
    }, required=["id", "cidr", "protocol", "from_port", "to_port", "description", "created_by", "created_at",
                 "expires_at", "generation", "updated_generation", "sources"]),
    "RuleCreated": _object({"rule": ref("Rule"), "generation": GENERATION,
                            "renewed": {"type": "boolean",
                                        "description": "true: the rule was live and this request moved its "
                                                       "expiry later."},
                            "notified": {"type": "boolean",
                                         "description": "false: the cast to the workers failed; they pick "
                                                        "the change up on their next periodic check."}},
                           required=["rule", "generation", "renewed", "notified"]),
    "RuleShown": _object({"rule": ref("Rule")}, required=["rule"]),
    "RuleList": _object({"rules": {"type": "array", "items": ref("Rule")}, "generation": GENERATION,
                         "next_marker": {"type": ["integer", "null"],
                                         "description": "Pass as marker for the next page; null on the last."}},
                        required=["rules", "generation", "next_marker"]),
    "ImportResult": _object({
        "added": {"type": "integer", "minimum": 0}, "duplicate": {"type": "integer", "minimum": 0},
        "refused": {"type": "integer", "minimum": 0},
        "refused_lines": {"type": "array", "maxItems": 1000, "items": _object(
            {"line": {"type": "integer", "minimum": 1}, "value": {"type": "string"}, "reason": {"type": "string"}},
            required=["line", "value", "reason"])},
        "generation": GENERATION,
        "renewed": {"type": "integer", "minimum": 0, "description": "Live rules whose expiry moved later."},
        "removed": {"type": "integer", "minimum": 0, "description": "replace: rules the source let go."},
        "deleted": {"type": "integer", "minimum": 0,
                    "description": "Rules that went (no other source wants them), expired copies included."},
        "source": {"type": "string"}, "mode": MODE,
        "format": {"type": "string", "description": "The format used (json for a JSON body)."},
        "dry_run": {"type": "boolean"},
        "non_global_allowed": {"type": "integer", "minimum": 0,
                               "description": "Non-global entries blocked because allow_non_global was set."},
        "guard": {"type": ["object", "null"], "description": "replace: the guard's arithmetic.",
                  "properties": {"in_force": {"type": "integer"}, "removing": {"type": "integer"},
                                 "max_fraction": {"type": "number"}, "min_rules": {"type": "integer"},
                                 "tripped": {"type": "boolean"}}},
        "preview": {"type": ["object", "null"], "description": "dry_run: the CIDRs behind added, renewed and "
                                                               "removed (at most 1000 each).",
                    "properties": {k: {"type": "array", "items": {"type": "string"}}
                                   for k in ("added", "renewed", "removed")}},
        "notified": {"type": ["boolean", "null"], "description": "null when nothing changed."},
    }, required=["added", "duplicate", "refused", "refused_lines", "generation", "renewed", "removed", "deleted",
                 "source", "mode", "format", "dry_run", "non_global_allowed", "guard", "preview", "notified"]),
    "BlockAdded": _object({"status": {"const": "OK"}, "message": {"type": "string"},
                           "rules": {"type": "array", "items": ref("Rule")}, "generation": GENERATION,
                           "renewed": {"type": "integer", "minimum": 0,
                                       "description": "Live rules whose expiry moved later."},
                           "unchanged": {"type": "integer", "minimum": 0,
                                         "description": "Live rules this source already wanted at least as long."},
                           "kept": {"type": "integer", "minimum": 0,
                                    "description": "Live rules other sources wanted, now wanted by this one too."}},
                          required=["status", "message", "rules", "generation", "renewed", "unchanged", "kept"]),
    "BlockDuplicate": _object({"status": {"const": "Failed"}, "message": {"const": "Duplicate rule. 0 rules added"}},
                              required=["status", "message"]),
    "BlockConflict": {"anyOf": [ref("BlockDuplicate"), ref("Error")]},
    "BlockRemoved": _object({"status": {"const": "OK"}, "message": {"type": "string"},
                             "cidr": {"type": "string", "description": "The normalised CIDR unblocked."},
                             "deleted": {"type": "integer", "minimum": 0, "description": "Rules deleted."},
                             "kept": {"type": "integer", "minimum": 0,
                                      "description": "With source: rules that stay because other sources want "
                                                     "them."},
                             "generation": GENERATION},
                            required=["status", "message", "cidr", "deleted", "kept", "generation"]),
    "BlockList": _object({"blocks": {"type": "array", "items": _object(
        {"cidr": {"type": "string"}, "rules": {"type": "integer", "minimum": 1}}, required=["cidr", "rules"])},
        "generation": GENERATION}, required=["blocks", "generation"]),
    "ServiceList": _object({"services": {"type": "array", "items": _object({
        "host": {"type": "string"}, "binary": {"type": "string"}, "state": {"enum": ["up", "down"]},
        "heartbeat_at": {"type": ["string", "null"], "format": "date-time"},
        "applied_generation": {"type": "integer", "minimum": -1}, "in_sync": {"type": "boolean"},
        "applied_at": {"type": ["string", "null"], "format": "date-time"},
        "rule_count": {"type": "integer"}, "driver": {"type": ["string", "null"]},
        "last_error": {"type": ["string", "null"]},
        "quarantine": {"type": "array", "description": "Rules this host's kernel refused; every other rule is "
                       "applied at applied_generation (in_sync ignores them).", "items": _object({
                           "id": {"type": "integer"}, "cidr": {"type": "string"}, "reason": {"type": "string"}},
                           required=["id", "cidr", "reason"])},
        "bus_user": {"type": ["string", "null"],
                     "description": "The broker-validated AMQP user of the host's latest state report."},
    }, required=["host", "binary", "state", "heartbeat_at", "applied_generation", "in_sync", "applied_at",
                 "rule_count", "driver", "last_error", "quarantine", "bus_user"])}, "generation": GENERATION},
        required=["services", "generation"]),
    "AuditLog": _object({"audit": {"type": "array", "items": _object({
        "id": {"type": "integer"}, "at": OUT_TIMESTAMP, "actor": {"type": "string"},
        "request_id": {"type": ["string", "null"]}, "action": {"type": "string"},
        "generation": {"type": ["integer", "null"]}, "detail": {"type": ["object", "null"]},
    }, required=["id", "at", "actor", "request_id", "action", "generation", "detail"])}}, required=["audit"]),
    "SourceList": _object({"sources": {"type": "array", "items": _object(
        {"source": {"type": "string"}, "rules": {"type": "integer", "minimum": 1}}, required=["source", "rules"])},
        "generation": GENERATION}, required=["sources", "generation"]),
    "Feed": _object({
        "name": {"type": "string"}, "source": {"type": "string"},
        "url": {"type": "string", "description": "With any password in it replaced by ***."},
        "format": {"type": "string"}, "column": {"type": ["string", "null"]}, "interval": {"type": "integer"},
        "protocol": PROTOCOL, "from_port": {"type": ["integer", "null"]}, "to_port": {"type": ["integer", "null"]},
        "ttl": {"type": ["integer", "null"]}, "enabled": {"type": "boolean"}, "allow_non_global": {"type": "boolean"},
        "description": {"type": ["string", "null"]}, "created_at": OUT_TIMESTAMP,
        "created_by": {"type": ["string", "null"]}, "rules": {"type": "integer", "minimum": 0},
        "next_sync": {"type": ["string", "null"], "format": "date-time"},
        "syncing": {"type": "boolean", "description": "A conductor holds it right now."},
        "force_next": {"type": "boolean"},
        "last_sync": {"type": ["string", "null"], "format": "date-time", "description": "The last attempt."},
        "last_success": {"type": ["string", "null"], "format": "date-time",
                         "description": "The last time the list was downloaded or confirmed unchanged."},
        "last_applied": {"type": ["string", "null"], "format": "date-time"},
        "last_status": {"type": ["string", "null"],
                        "enum": ["ok", "not_modified", "unchanged", "fetch_error", "refused", "error", None],
                        "description": "ok, not_modified (304), unchanged (same bytes); fetch_error, refused "
                                       "(unreadable, empty or past the guard), error: the last good list stays."},
        "last_error": {"type": ["string", "null"]}, "last_generation": {"type": ["integer", "null"]},
        "counts": {"type": ["object", "null"], "description": "The last applied list: bytes, lines, format, "
                                                              "entries, refused, refused_lines, added, renewed, "
                                                              "duplicate, removed, deleted."},
    }, required=["name", "source", "url", "format", "column", "interval", "protocol", "from_port", "to_port", "ttl",
                 "enabled", "allow_non_global", "description", "created_at", "created_by", "rules", "next_sync",
                 "syncing", "force_next", "last_sync", "last_success", "last_applied", "last_status", "last_error",
                 "last_generation", "counts"]),
    "FeedShown": _object({"feed": ref("Feed")}, required=["feed"]),
    "FeedList": _object({"feeds": {"type": "array", "items": ref("Feed")}}, required=["feeds"]),
    "FeedDeleted": _object({"feed": {"type": "string"}, "removed": {"type": "integer", "minimum": 0},
                            "deleted": {"type": "integer", "minimum": 0}, "generation": GENERATION,
                            "notified": {"type": ["boolean", "null"]}},
                           required=["feed", "removed", "deleted", "generation", "notified"]),
    "Versions": _object({"versions": {"type": "array", "items": _object(
        {"id": {"type": "string"}, "status": {"type": "string"}}, required=["id", "status"])}},
        required=["versions"]),
    "Health": _object({"status": {"const": "ok"}, "generation": GENERATION}, required=["status", "generation"]),
    "Unavailable": _object({"status": {"const": "unavailable"},
                            "reason": {"type": "string", "description": "What failed, e.g. 'database unreachable "
                                                                        "(OperationalError)'."}},
                           required=["status", "reason"]),
    "OpenAPI": {"type": "object", "required": ["openapi", "info", "paths"],
                "description": "This document (OpenAPI 3.1)."},
}

# Messages for patterns, so a refusal says what is wrong in words rather than as a regular expression.
_PATTERN_MESSAGES = {
    FEED_URL_PATTERN: "is not an http:// or https:// URL without whitespace (the conductor fetches feeds over "
                      "HTTP only: no file://, ftp:// or other schemes)",
    rules.CIDR_PATTERN: "is not a plain IPv4/IPv6 address or CIDR: only digits, hex letters, '.' and ':' and "
                        "one '/prefix' (no whitespace, scope id or netmask)",
    rules.TEXT_PATTERN: "must not contain control characters (U+0000-U+001F, U+007F-U+009F)",
    rules.TIMESTAMP_PATTERN: "is not an RFC 3339 date-time with a UTC offset, e.g. 2026-12-01T00:00:00Z",
}


# --------------------------------------------------------------------------- operations

@dataclasses.dataclass(frozen=True)
class Operation:
    """One route of the API: what it takes and what it answers.

    ``query`` and ``path`` map parameter names to schemas (every query parameter is optional; unknown ones
    are refused); ``body`` maps each accepted media type to a schema (``None``: no body); ``responses`` maps
    status codes to (description, schema component name or None).  ``body_limit`` names the ``[api]`` option
    that bounds the body in bytes.
    """

    action: str
    method: str
    path: str
    summary: str
    tag: str
    responses: dict[int, tuple[str, str | None]]
    public: bool = False
    admin_only: bool = False
    query: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    path_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    body: dict[str, str] | None = None
    body_limit: str = "max_request_body_size"
    description: str = ""

    @property
    def mutates(self) -> bool:
        return self.method not in ("GET", "HEAD")


_ID_PATH = {"id": {**RULE_ID, "description": "A rule id. One that names no live rule (or is no id at all) "
                                             "is 404."}}
_FEED_PATH = {"name": {**FEED_NAME, "description": "A feed's name. One that names no feed is 404."}}
_BAD = (400, ("A field or parameter is invalid; the message names it.", "Error"))
_CONFLICT = (409, ("The rule overlaps a protected network, or max_rules would be exceeded.", "Error"))
_TOO_LARGE = (413, ("The body is larger than [api] max_request_body_size.", "Error"))
_MEDIA = (415, ("The Content-Type is not one this operation takes.", "Error"))
_NOT_FOUND = (404, ("No such live rule.", "Error"))

OPERATIONS: dict[str, Operation] = {op.action: op for op in [
    Operation("versions", "GET", "/", "API versions", "meta", {200: ("The versions.", "Versions")}, public=True),
    Operation("health", "GET", "/healthz", "Liveness and the current generation", "meta",
              {200: ("Up; the database answered.", "Health"),
               503: ("The database cannot be reached or has no provfw schema; the reason says which.",
                     "Unavailable")}, public=True),
    Operation("openapi", "GET", "/v1/openapi.json", "This OpenAPI 3.1 document", "meta",
              {200: ("The document.", "OpenAPI")}, public=True),
    Operation("index", "GET", "/v1/provider-fw-rules", "List live rules, oldest first, a page at a time", "rules",
              {200: ("A page of rules.", "RuleList"), 400: _BAD[1]},
              query={"cidr": {**CIDR, "description": "Only rules of this network (normalised first)."},
                     "protocol": PROTOCOL,
                     "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
                     "marker": {"type": "integer", "minimum": 0, "maximum": MAX_ID,
                                "description": "The next_marker of the previous page."},
                     "source": {**SOURCE, "description": "Only rules this source wants (a bare name: "
                                                         "manual:NAME)."},
                     "contains": {**CIDR, "description": "Why is this address blocked: every rule whose "
                                                         "network contains this address (or network), most "
                                                         "specific first, on one page (limit and marker do not "
                                                         "apply)."},
                     "within": {**CIDR, "description": "Only rules whose network lies inside this network "
                                                       "(itself included): what blocks parts of it."}},
              description="Expired rules are not listed from the moment they expire."),
    Operation("create", "POST", "/v1/provider-fw-rules", "Create one rule", "rules",
              {201: ("Created; every worker was told.", "RuleCreated"),
               200: ("The rule was live: this request renewed it (a later expiry, or none) or added its source.",
                     "RuleCreated"), 400: _BAD[1],
               409: ("The same rule is live and its source wants it at least as long already, it overlaps a "
                     "protected network or a non-global range, or max_rules is reached.", "Error"),
               413: _TOO_LARGE[1], 415: _MEDIA[1]},
              body={JSON: "RuleCreate"}),
    Operation("import_rules", "POST", "/v1/provider-fw-rules/import", "Bulk import CIDRs in one transaction",
              "rules",
              {201: ("At least one rule was added (one generation, one cast).", "ImportResult"),
               200: ("No rule was added: renewed, removed, duplicate or refused only, or a dry run.",
                     "ImportResult"),
               400: _BAD[1], 409: ("max_rules would be exceeded, or the replace guard refused the list; nothing "
                                   "was changed.", "Error"),
               413: ("The body is larger than [api] max_import_body_size.", "Error"), 415: _MEDIA[1]},
              query={"protocol": PROTOCOL, "from_port": PORT, "to_port": PORT, "description": DESCRIPTION,
                     "ttl": TTL, "expires_at": TIMESTAMP, **_IMPORT_OPTIONS, "format": FORMAT, "column": COLUMN},
              body={TEXT: "RuleImportText", JSON: "RuleImport"}, body_limit="max_import_body_size",
              description="Text (a block list in any format of docs/feeds.md) or JSON ({\"cidrs\": [...], "
                          "options} or a bare list). Entries that are not valid rules, overlap a protected "
                          "network or a non-global range are counted in refused with line and reason; the rest "
                          "are added to the source (default import:default), or with mode=replace become its "
                          "exact list. One transaction, one generation, one cast."),
    Operation("show", "GET", "/v1/provider-fw-rules/{id}", "Show one live rule", "rules",
              {200: ("The rule.", "RuleShown"), 404: _NOT_FOUND[1]}, path_params=_ID_PATH,
              description="An expired rule is 404 from the moment it expires."),
    Operation("delete", "DELETE", "/v1/provider-fw-rules/{id}", "Delete one rule", "rules",
              {204: ("Deleted (or, with source, that source let go); X-Provfw-Generation is the new generation.",
                     None), 404: ("No such live rule, or it does not have that source.", "Error")},
              path_params=_ID_PATH,
              query={"source": {**SOURCE, "description": "Only this source lets go: the rule stays while "
                                                         "another source wants it."}},
              description="Without source the rule goes whoever wants it; a feed that still lists it adds it "
                          "again at its next sync."),
    Operation("sources", "GET", "/v1/provider-fw-sources", "Every source and how many live rules it wants",
              "rules", {200: ("The sources.", "SourceList")}),
    Operation("block_external_addresses", "POST", "/v1/block-external-addresses",
              "The seed's call: block every tcp and udp port and all ICMP from a CIDR", "external-address-blocks",
              {200: ("The missing ones of the three rules were added.", "BlockAdded"), 400: _BAD[1],
               409: ("All three rules are live already (the seed's answer), or the CIDR overlaps a protected "
                     "network or max_rules is reached (an error).", "BlockConflict"),
               413: _TOO_LARGE[1], 415: _MEDIA[1]},
              body={JSON: "ExternalBlock"}),
    Operation("list_blocks", "GET", "/v1/external-address-blocks", "Blocked CIDRs and their live rule counts",
              "external-address-blocks", {200: ("The CIDRs.", "BlockList")}),
    Operation("remove_block", "POST", "/v1/remove-external-address-block", "Delete every live rule of a CIDR",
              "external-address-blocks",
              {200: ("Deleted.", "BlockRemoved"), 400: _BAD[1], 404: ("No live rule has this CIDR.", "Error"),
               413: _TOO_LARGE[1], 415: _MEDIA[1]},
              body={JSON: "ExternalUnblock"}),
    Operation("feed_index", "GET", "/v1/feeds", "List the feeds and their last sync", "feeds",
              {200: ("The feeds.", "FeedList")}),
    Operation("feed_create", "POST", "/v1/feeds", "Subscribe to a block list", "feeds",
              {201: ("Created; due at once when enabled.", "FeedShown"), 400: _BAD[1],
               409: ("A feed of this name exists.", "Error"), 413: _TOO_LARGE[1], 415: _MEDIA[1]},
              body={JSON: "FeedCreate"}),
    Operation("feed_show", "GET", "/v1/feeds/{name}", "One feed and its last sync", "feeds",
              {200: ("The feed.", "FeedShown"), 404: ("No such feed.", "Error")}, path_params=_FEED_PATH),
    Operation("feed_update", "PATCH", "/v1/feeds/{name}", "Change a feed's settings", "feeds",
              {200: ("Changed.", "FeedShown"), 400: _BAD[1], 404: ("No such feed.", "Error"),
               413: _TOO_LARGE[1], 415: _MEDIA[1]}, path_params=_FEED_PATH, body={JSON: "FeedUpdate"}),
    Operation("feed_delete", "DELETE", "/v1/feeds/{name}", "Unsubscribe: delete the feed and release its rules",
              "feeds", {200: ("Deleted; rules no other source wants are gone (one generation).", "FeedDeleted"),
                        404: ("No such feed.", "Error")}, path_params=_FEED_PATH),
    Operation("feed_sync", "POST", "/v1/feeds/{name}/sync", "Sync a feed now", "feeds",
              {202: ("Due now: the next conductor poll downloads it unconditionally; follow last_sync.",
                     "FeedShown"), 404: ("No such feed.", "Error"), 409: ("The feed is disabled.", "Error")},
              path_params=_FEED_PATH,
              query={"force": {**FLAG, "description": "Let this sync pass the replace guard (a list that really "
                                                      "shrank) and apply a list with no entries."}}),
    Operation("services", "GET", "/v1/services", "Compute workers: up/down, applied generation, last error",
              "operations", {200: ("The workers.", "ServiceList")}),
    Operation("audit_log", "GET", "/v1/audit-log", "Who changed what, newest first (admin tokens only)",
              "operations", {200: ("The records.", "AuditLog"), 400: _BAD[1]}, admin_only=True,
              query={"limit": {"type": "integer", "minimum": 1, "maximum": MAX_AUDIT_PAGE, "default": 100}}),
]}


# --------------------------------------------------------------------------- the document

def _version() -> str:
    try:
        from importlib import metadata
        return metadata.version("provfw")
    except Exception:  # noqa: BLE001 - a source checkout without metadata still serves its document
        return "0"


def _responses(op: Operation) -> dict[str, Any]:
    responses = dict(op.responses)
    if not op.public:
        responses.setdefault(401, ("X-Auth-Token is missing or unknown.", "Error"))
        if op.mutates or op.admin_only:
            responses.setdefault(403, ("The token's role is not admin.", "Error"))
    if op.path_params:
        responses.setdefault(404, _NOT_FOUND[1])
    # Every operation refuses query parameters it does not define, as bodies refuse unknown fields.
    responses.setdefault(400, ("A field or parameter is invalid, or unknown; the message names it.", "Error"))
    responses.setdefault(500, ("Internal error; the message names the request id to look up in the log.",
                               "Error"))
    if not op.public:               # every operation behind a token reads the database, for the token at least
        responses.setdefault(503, ("The database cannot be reached or has no provfw schema; the message says "
                                   "which. Try again later (a change whose connection was lost after it was "
                                   "sent may have been made: blocks and unblocks are safe to repeat).", "Error"))
    out: dict[str, Any] = {}
    for status in sorted(responses):
        description, schema = responses[status]
        headers: dict[str, Any] = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
        if status == 204 and op.action == "delete":
            headers["X-Provfw-Generation"] = {"required": True, "description": "The new generation.",
                                              "schema": {"type": "integer", "minimum": 0}}
        entry: dict[str, Any] = {"description": description, "headers": headers}
        if schema is not None:
            entry["content"] = {JSON: {"schema": ref(schema)}}
        out[str(status)] = entry
    return out


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [{"$ref": "#/components/parameters/X-Request-Id"}]
    for name, schema in op.path_params.items():
        params.append({"name": name, "in": "path", "required": True, "schema": schema,
                       "description": schema.get("description", "")})
    for name, schema in op.query.items():
        params.append({"name": name, "in": "query", "required": False, "schema": schema,
                       "description": schema.get("description", "")})
    return params


@functools.cache
def _document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS.values():
        entry: dict[str, Any] = {"operationId": op.action, "summary": op.summary, "tags": [op.tag],
                                 "parameters": _parameters(op), "responses": _responses(op)}
        if op.description:
            entry["description"] = op.description
        if op.public:
            entry["security"] = []
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {
                media: {"schema": ref(name)} for media, name in op.body.items()}}
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": DIALECT,
        "info": {"title": "provfw admin API", "version": _version(),
                 "description": "Provider firewall rules: block a CIDR on every hypervisor. See docs/api.md."},
        "security": [{"token": []}],
        "tags": [{"name": name} for name in dict.fromkeys(op.tag for op in OPERATIONS.values())],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token",
                                          "description": "Created with 'provfw-manage token create'. reader "
                                                         "tokens may only GET."}},
            "parameters": {"X-Request-Id": {
                "name": "X-Request-Id", "in": "header", "required": False, "schema": {"type": "string"},
                "description": "Your id for the request, echoed back and written to the audit log when it is at "
                               "most 64 printable characters; otherwise the API makes one up."}},
            "headers": {"X-Request-Id": {"required": True, "schema": {"type": "string"},
                                         "description": "The request id (yours, or one the API made up)."}},
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API (a fresh deep copy; callers may change it)."""
    return copy.deepcopy(_document())


# --------------------------------------------------------------------------- validation

def _check_timestamp(value: Any) -> bool:
    if not isinstance(value, str):
        return True    # format applies to strings only; the type keyword speaks for the rest
    rules.parse_timestamp(value)
    return True


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("date-time", raises=exception.InvalidInput)(_check_timestamp)


@functools.lru_cache(maxsize=64)
def _python_pattern(pattern: str):
    return rules.python_pattern(pattern)


def _pattern(validator, pattern, instance, schema):
    # ECMA-262 anchors: "$" is the end of the string, never "before a final newline" as in Python.
    if validator.is_type(instance, "string") and not _python_pattern(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_ITEMS = jsonschema.Draft202012Validator.VALIDATORS["items"]


def _items(validator, items, instance, schema):
    # An import's {"cidrs": [...]} is a list of 120k strings, and jsonschema descends into each item
    # (0.5 s).  For the one item schema where a type test says everything - {"type": "string"} - a list of
    # strings is valid without descending; anything else, or any non-string item, goes through jsonschema's
    # own "items", so the errors are exactly its errors.
    if items == {"type": "string"} and validator.is_type(instance, "array") and not schema.get("prefixItems") \
            and all(type(item) is str for item in instance):
        return
    yield from _ITEMS(validator, items, instance, schema)


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                          validators={"pattern": _pattern, "items": _items})


@functools.cache
def _registry() -> referencing.Registry:
    resource = referencing.jsonschema.DRAFT202012.create_resource(_document())
    return referencing.Registry().with_resource(BASE_URI, resource)


def _refers(schema: Any) -> bool:
    """Whether ``schema`` holds a ``$ref`` anywhere."""
    if isinstance(schema, dict):
        return "$ref" in schema or any(_refers(value) for value in schema.values())
    if isinstance(schema, list):
        return any(_refers(value) for value in schema)
    return False


@functools.cache
def _validator(name: str):
    # A component without references is validated as itself: through a "$ref" every request paid the
    # registry's look-up, a third of a small body's validate() (33 -> 21 us for {"cidr": ..}, 2026-12-02).
    # The errors are the same: jsonschema leaves "$ref" out of an error's schema path.
    if not _refers(SCHEMAS[name]):
        return _Validator(SCHEMAS[name], format_checker=_FORMATS)
    return _Validator({"$ref": f"{BASE_URI}#/components/schemas/{name}"}, registry=_registry(),
                      format_checker=_FORMATS)


@functools.cache
def _params_validator(action: str, where: str):
    op = OPERATIONS[action]
    params = op.query if where == "query" else op.path_params
    schema = {"type": "object", "properties": params, "additionalProperties": False}
    return _Validator(schema, format_checker=_FORMATS)


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_type(kinds: Any) -> str:
    names = {"object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
             "number": "a number", "boolean": "true or false", "null": "null"}
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    return " or ".join(names.get(k, k) for k in kinds)


def _join(path: Iterable[Any], root: str) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or root


def _refusal(error: jsonschema.ValidationError, root: str, noun: str) -> exception.InvalidInput:
    """Turn one schema error into InvalidInput naming the field (``root`` when it is the whole value)."""
    path = list(error.absolute_path)
    kind = error.validator
    value = error.validator_value
    instance = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    if kind == "required":
        missing = [name for name in value if isinstance(instance, dict) and name not in instance]
        return exception.InvalidInput(_join([*path, missing[0] if missing else "?"], root), "is required")
    if kind == "additionalProperties":
        known = list(schema.get("properties", {}))
        extra = sorted(name for name in instance if name not in known)
        name = extra[0] if extra else "?"
        field = _join([*path, name], root) if path or root == "body" else name
        return exception.InvalidInput(field, f"unknown {noun}; the {noun}s are {', '.join(known)}")
    if kind == "not" and "dependentSchemas" in error.schema_path:
        schema_path = list(error.schema_path)
        field = schema_path[schema_path.index("dependentSchemas") + 1]
        others = value.get("required", []) if isinstance(value, dict) else []
        return exception.InvalidInput(_join([*path, field], root),
                                      f"give either {field} or {' or '.join(others)}, not both")
    field = _join(path, root)
    if kind == "type":
        return exception.InvalidInput(field, f"must be {_describe_type(value)}")
    if kind in ("enum", "const"):
        allowed = value if kind == "enum" else [value]
        return exception.InvalidInput(field, f"{_show(instance)} is not one of "
                                             f"{', '.join('null' if a is None else str(a) for a in allowed)}")
    if kind in ("minimum", "maximum"):
        low, high = schema.get("minimum"), schema.get("maximum")
        return exception.InvalidInput(field, f"{_show(instance, 40)} is out of range {low}..{high}")
    if kind == "maxLength":
        return exception.InvalidInput(field, f"is longer than {value} characters")
    if kind == "minLength":
        return exception.InvalidInput(field, "must not be empty" if value == 1 else
                                      f"is shorter than {value} characters")
    if kind == "pattern":
        return exception.InvalidInput(field, f"{_show(instance)} {_PATTERN_MESSAGES.get(value, 'is malformed')}")
    if kind == "format":
        cause = error.cause
        reason = cause.message.split(": ", 1)[-1] if isinstance(cause, exception.InvalidInput) else "is malformed"
        return exception.InvalidInput(field, reason)
    return exception.InvalidInput(field, error.message[:200])


# Which complaint about one value says most: its presence, then its type, then the details.
_RANK = {"required": 0, "additionalProperties": 1, "type": 2, "enum": 3, "const": 3}


def _first(errors: Iterable[jsonschema.ValidationError]) -> jsonschema.ValidationError | None:
    # Shallowest first ("cidr: is required" before a complaint about a port), then by _RANK, then in order.
    found = sorted(errors, key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)),
                                          _RANK.get(str(e.validator), 9), list(map(str, e.relative_schema_path))))
    return found[0] if found else None


def validate(name: str, instance: Any, root: str = "body") -> Any:
    """Check ``instance`` against the component schema ``name``; return it unchanged.

    Raises ``InvalidInput`` naming the first field at fault ("cidr: ...", "expires: unknown field ...").
    """
    error = _first(_validator(name).iter_errors(instance))
    if error is not None:
        raise _refusal(error, root, "field")
    return instance


def coerce_parameter(name: str, text: str, schema: dict[str, Any]) -> Any:
    """A query or path parameter's text as the value its schema's type says (integers: decimal digits)."""
    kind = schema.get("type")
    if kind == "boolean":
        if text not in ("true", "false", "1", "0"):
            raise exception.InvalidInput(name, f"{_show(text)} is not true or false")
        return text in ("true", "1")
    if kind == "integer":
        digits = text[1:] if text.startswith("-") else text
        # ASCII digits only (int() reads other scripts' digits too), and fewer than Python's 4300-digit
        # conversion limit; the schema's minimum and maximum then say whether the number is in range.
        if not digits.isascii() or not digits.isdigit() or len(digits) > 1000:
            raise exception.InvalidInput(name, f"{_show(text)} is not an integer")
        return int(text)
    return text


def validate_parameters(action: str, where: str, values: dict[str, Any]) -> dict[str, Any]:
    """Check the already-coerced ``query`` or ``path`` parameters of ``action``; return them.

    Unknown query parameters are refused, like unknown body fields.
    """
    if not values:                # no parameter is required anywhere (the schema has no "required")
        return values
    error = _first(_params_validator(action, where).iter_errors(values))
    if error is not None:
        raise _refusal(error, "query", "parameter")
    return values


def schema_of(name: str) -> dict[str, Any]:
    """The component schema ``name`` (a deep copy)."""
    return copy.deepcopy(SCHEMAS[name])
