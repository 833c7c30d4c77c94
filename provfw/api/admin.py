"""AdminController: the admin REST API for provider firewall rules.

Every mutation validates all its input before touching the database (bad
input changes nothing), writes through ``provfw.db.api`` in one transaction
(which bumps the generation and writes the audit record), and then calls
``ComputeAPI.trigger_provider_fw_rules_refresh`` so every compute worker
reloads.  Reads never cast.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import webob

from provfw import exception, rules
from provfw.api import wsgi
from provfw.db import api as db

LOG = logging.getLogger(__name__)

DEFAULT_PAGE = 1000
MAX_PAGE = 10000
MAX_TTL = 10 * 365 * 24 * 3600
MAX_REFUSED_REPORTED = 1000


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _iso(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=value.microsecond).isoformat() + "Z"


def rule_view(rule) -> dict[str, Any]:
    return {
        "id": rule.id, "cidr": rule.cidr, "protocol": rule.protocol, "from_port": rule.from_port,
        "to_port": rule.to_port, "description": rule.description, "created_by": rule.created_by,
        "created_at": _iso(rule.created_at), "expires_at": _iso(rule.expires_at),
        "generation": rule.created_generation,
    }


def parse_expiry(body: dict[str, Any], now: datetime.datetime | None = None) -> datetime.datetime | None:
    """``expires_at`` (ISO 8601, UTC if no zone) or ``ttl`` (seconds); never both; never in the past."""
    now = now or utcnow()
    expires_at, ttl = body.get("expires_at"), body.get("ttl")
    if expires_at is not None and ttl is not None:
        raise exception.InvalidInput("ttl", "give either ttl or expires_at, not both")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) and not (isinstance(ttl, str) and ttl.isdigit()):
            raise exception.InvalidInput("ttl", "must be a number of seconds")
        seconds = float(ttl)
        if not 0 < seconds <= MAX_TTL:
            raise exception.InvalidInput("ttl", f"must be between 1 and {MAX_TTL} seconds")
        return now + datetime.timedelta(seconds=seconds)
    if expires_at is None:
        return None
    if not isinstance(expires_at, str):
        raise exception.InvalidInput("expires_at", "must be an ISO 8601 timestamp")
    try:
        value = datetime.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        raise exception.InvalidInput("expires_at", f"{expires_at!r} is not an ISO 8601 timestamp") from None
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    if value <= now:
        raise exception.InvalidInput("expires_at", "is in the past")
    return value


class AdminController:
    def __init__(self, conf, compute_api):
        self.conf = conf
        self.compute_api = compute_api
        self.protected = rules.parse_protected_networks(conf.protected_cidrs)

    # ------------------------------------------------------------ helpers

    def _body(self, request: webob.Request) -> dict[str, Any]:
        body = wsgi.json_body(request, self.conf.api.max_request_body_size)
        if not isinstance(body, dict):
            raise exception.InvalidInput("body", "must be a JSON object")
        return body

    def _spec(self, body: dict[str, Any]) -> rules.RuleSpec:
        return rules.spec_from_body(body, self.protected)

    def _notify(self, changes: rules.Changes) -> bool:
        """Cast the change to every worker (the rules themselves when small, else only the generations)."""
        return self.compute_api.notify(changes)

    def _notify_created(self, result) -> bool:
        """Cast a create_many result; a bulk create (rows not read back) casts only the generations."""
        if result.added_count and not result.added:
            return self.compute_api.trigger_provider_fw_rules_refresh(result.generation, result.generation - 1)
        return self._notify(rules.Changes(result.generation - 1, result.generation,
                                          [db.rule_of(row) for row in result.added], list(result.retired)))

    @staticmethod
    def _int_param(request: webob.Request, name: str, low: int, high: int) -> int | None:
        value = request.GET.get(name)
        if value is None or value == "":
            return None
        if not value.isdigit():
            raise exception.InvalidInput(name, "must be a non-negative integer")
        number = int(value)
        if not low <= number <= high:
            raise exception.InvalidInput(name, f"must be between {low} and {high}")
        return number

    # ------------------------------------------------------------ meta

    def versions(self, request, context):
        return wsgi.json_response({"versions": [{"id": "v1", "status": "CURRENT"}]})

    def health(self, request, context):
        """200 ``{"status": "ok", "generation": N}``; 503 ``{"status": "unavailable", "reason": "..."}`` when
        the database cannot be reached (the reason names the failure's type; details go to the log)."""
        try:
            generation = db.ping()
        except exception.DatabaseUnavailable as exc:
            LOG.warning("health check: %s: %s", exc.message, exc.__cause__)
            return wsgi.json_response({"status": "unavailable", "reason": exc.message}, 503)
        return wsgi.json_response({"status": "ok", "generation": generation})

    # ------------------------------------------------------------ rules

    def create(self, request, context):
        body = self._body(request)
        spec = self._spec(body)
        description = rules.validate_description(body.get("description"))
        expires_at = parse_expiry(body)
        rule, generation = db.provider_fw_rule_create(
            spec, description=description, created_by=context.actor, expires_at=expires_at,
            audit=context.audit(description), max_rules=self.conf.max_rules)
        notified = self._notify(rules.Changes(generation - 1, generation, [db.rule_of(rule)], []))
        return wsgi.json_response({"rule": rule_view(rule), "generation": generation, "notified": notified}, 201)

    def index(self, request, context):
        cidr = request.GET.get("cidr")
        if cidr is not None:
            cidr = rules.normalise_cidr(cidr)
        protocol = request.GET.get("protocol")
        if protocol is not None and protocol not in rules.PROTOCOLS:
            raise exception.InvalidInput("protocol", f"{protocol!r} is not one of {', '.join(rules.PROTOCOLS)}")
        limit = self._int_param(request, "limit", 1, MAX_PAGE) or DEFAULT_PAGE
        marker = self._int_param(request, "marker", 0, 2**63 - 1)
        generation = db.provider_fw_generation_get()
        found = db.provider_fw_rule_get_all(cidr=cidr, protocol=protocol, limit=limit + 1, marker=marker)
        page = found[:limit]
        next_marker = page[-1].id if len(found) > limit else None
        return wsgi.json_response({"rules": [rule_view(r) for r in page], "generation": generation,
                                   "next_marker": next_marker})

    @staticmethod
    def _rule_id(value: str) -> int:
        if not value.isdigit():
            raise exception.RuleNotFound(value)
        return int(value)

    def show(self, request, context, id):
        return wsgi.json_response({"rule": rule_view(db.provider_fw_rule_get(self._rule_id(id)))})

    def delete(self, request, context, id):
        changes = db.provider_fw_rule_destroy(self._rule_id(id), audit=context.audit())
        self._notify(changes)
        response = webob.Response(status=204)
        response.headers["X-Provfw-Generation"] = str(changes.generation)
        return response

    # ------------------------------------------------------------ bulk import

    def import_rules(self, request, context):
        """Text (one CIDR or address a line, '#' comments) or JSON (a list, or {"cidrs": [...], ...}).

        Options (query string, or JSON keys): protocol (default all), from_port, to_port, description, ttl /
        expires_at.  One transaction and one cast; the answer counts added / duplicate / refused.
        """
        data = wsgi.read_body(request, self.conf.api.max_import_body_size)
        options: dict[str, Any] = {k: v for k, v in request.GET.items()}
        is_json = (request.content_type or "").endswith("json")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise exception.InvalidInput("body", "is not UTF-8 text") from None
        entries: list[tuple[int, str]]
        if is_json:
            try:
                payload = json.loads(text)
            except ValueError as exc:
                raise exception.InvalidInput("body", f"is not valid JSON ({exc})") from None
            if isinstance(payload, dict):
                options.update({k: v for k, v in payload.items() if k != "cidrs"})
                payload = payload.get("cidrs")
            if not isinstance(payload, list):
                raise exception.InvalidInput("cidrs", "must be a JSON list of CIDR strings")
            entries = [(i + 1, item) for i, item in enumerate(payload)]
        else:
            entries = []
            for number, line in enumerate(text.splitlines(), start=1):
                value = line.split("#", 1)[0].strip()
                if value:
                    entries.append((number, value))
        protocol = options.get("protocol", "all")
        template = rules.make_spec("192.0.2.0/24", protocol, options.get("from_port"), options.get("to_port"))
        description = rules.validate_description(options.get("description"))
        expires_at = parse_expiry(options)

        specs: list[rules.RuleSpec] = []
        refused: list[dict[str, Any]] = []
        for number, value in entries:
            try:
                spec = rules.make_spec(value, template.protocol, template.from_port, template.to_port, self.protected)
            except exception.ProvfwError as exc:
                refused.append({"line": number, "value": str(value)[:100], "reason": exc.message})
                continue
            specs.append(spec)
        unique = list(dict.fromkeys(specs))
        in_file_duplicates = len(specs) - len(unique)
        generation = None
        added = 0
        duplicates = in_file_duplicates
        if unique:
            result = db.provider_fw_rules_create_many(
                unique, description=description, created_by=context.actor, expires_at=expires_at,
                audit=context.audit(description), max_rules=self.conf.max_rules, action="rule.import")
            added, duplicates, generation = result.added_count, duplicates + len(result.duplicates), result.generation
            if added:
                self._notify_created(result)
        if generation is None:
            generation = db.provider_fw_generation_get()
        return wsgi.json_response({
            "added": added, "duplicate": duplicates, "refused": len(refused),
            "refused_lines": refused[:MAX_REFUSED_REPORTED], "generation": generation,
        }, 201 if added else 200)

    # ------------------------------------------------------------ the seed's CIDR-level calls

    def block_external_addresses(self, request, context):
        """Seed semantics: block every tcp and udp port and all ICMP from ``cidr``."""
        body = self._body(request)
        if "cidr" not in body:
            raise exception.InvalidInput("cidr", "is required")
        cidr = rules.normalise_cidr(body["cidr"])
        specs = rules.external_block_specs(cidr)
        rules.check_not_protected(specs[0], self.protected)
        description = rules.validate_description(body.get("description"))
        expires_at = parse_expiry(body)
        result = db.provider_fw_rules_create_many(
            specs, description=description, created_by=context.actor, expires_at=expires_at,
            audit=context.audit(description), max_rules=self.conf.max_rules, action="cidr.block")
        if not result.added:
            return wsgi.json_response({"status": "Failed", "message": "Duplicate rule. 0 rules added"}, 409)
        self._notify_created(result)
        return wsgi.json_response({"status": "OK", "message": f"Added {len(result.added)} rules",
                                   "rules": [rule_view(r) for r in result.added],
                                   "generation": result.generation})

    def list_blocks(self, request, context):
        blocks = db.provider_fw_distinct_cidrs()
        return wsgi.json_response({"blocks": [{"cidr": cidr, "rules": count} for cidr, count in blocks],
                                   "generation": db.provider_fw_generation_get()})

    def remove_block(self, request, context):
        body = self._body(request)
        if "cidr" not in body:
            raise exception.InvalidInput("cidr", "is required")
        cidr = rules.normalise_cidr(body["cidr"])
        changes = db.provider_fw_rule_destroy_by_cidr(cidr, audit=context.audit(body.get("description")))
        self._notify(changes)
        count = len(changes.removed)
        # "cidr" and "deleted" let clients report the result without parsing the seed's message text.
        return wsgi.json_response({"status": "OK", "message": f"Deleted {count} rules", "cidr": cidr,
                                   "deleted": count, "generation": changes.generation})

    # ------------------------------------------------------------ services and audit

    def services(self, request, context):
        now = utcnow()
        down_after = datetime.timedelta(seconds=self.conf.compute.service_down_time)
        generation = db.provider_fw_generation_get()
        views = []
        for service in db.service_get_all():
            up = service.heartbeat_at is not None and now - service.heartbeat_at <= down_after
            views.append({
                "host": service.host, "binary": service.binary, "state": "up" if up else "down",
                "heartbeat_at": _iso(service.heartbeat_at), "applied_generation": service.applied_generation,
                "in_sync": service.applied_generation == generation, "applied_at": _iso(service.applied_at),
                "rule_count": service.rule_count, "driver": service.driver, "last_error": service.last_error,
                "quarantine": json.loads(service.quarantine) if service.quarantine else [],
                "bus_user": service.bus_user,
            })
        return wsgi.json_response({"services": views, "generation": generation})

    def audit_log(self, request, context):
        context.require_admin()
        limit = self._int_param(request, "limit", 1, 1000) or 100
        records = db.audit_get_all(limit)
        return wsgi.json_response({"audit": [{
            "id": r.id, "at": _iso(r.created_at), "actor": r.actor, "request_id": r.request_id, "action": r.action,
            "generation": r.generation, "detail": json.loads(r.detail) if r.detail else None} for r in records]})
