"""AdminController: the admin REST API for provider firewall rules.

The Router has already checked every request against the contract
(``provfw.api.schemas``: types, ranges, patterns, unknown fields); the
controller applies what JSON Schema cannot say through ``provfw.rules``
(the CIDR parses, ports agree with the protocol, the expiry lies ahead,
protected networks).  Every mutation validates all its input before touching
the database (bad input changes nothing), writes through ``provfw.db.api`` in
one transaction (which bumps the generation and writes the audit record), and
then calls ``ComputeAPI.trigger_provider_fw_rules_refresh`` so every compute
worker reloads.  Reads never cast.  Status codes per route are in
``schemas.OPERATIONS`` and the published document (``GET /v1/openapi.json``).
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import webob

from provfw import exception, rules
from provfw.api import schemas, wsgi
from provfw.db import api as db

LOG = logging.getLogger(__name__)

DEFAULT_PAGE = schemas.DEFAULT_PAGE
MAX_PAGE = schemas.MAX_PAGE
MAX_TTL = rules.MAX_LIFETIME
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
    """``expires_at`` (RFC 3339 with an offset) or ``ttl`` (integer seconds); never both; never in the past;
    at most ten years ahead.  See ``rules.expiry``."""
    return rules.expiry(body.get("ttl"), body.get("expires_at"), now or utcnow())


class AdminController:
    def __init__(self, conf, compute_api):
        self.conf = conf
        self.compute_api = compute_api
        self.protected = rules.parse_protected_networks(conf.protected_cidrs)

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _body(request: webob.Request) -> dict[str, Any]:
        """The JSON object the Router checked against the operation's schema."""
        return wsgi.body(request)

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

    # ------------------------------------------------------------ meta

    def versions(self, request, context):
        return wsgi.json_response({"versions": [{"id": "v1", "status": "CURRENT"}]})

    def health(self, request, context):
        generation = db.provider_fw_generation_get()
        return wsgi.json_response({"status": "ok", "generation": generation})

    def openapi(self, request, context):
        """The published contract (OpenAPI 3.1), public like the version list."""
        return wsgi.json_response(schemas.openapi_document())

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
        params = wsgi.query(request)
        cidr = params.get("cidr")
        if cidr is not None:
            cidr = rules.normalise_cidr(cidr)
        protocol = params.get("protocol")
        limit = params.get("limit", DEFAULT_PAGE)
        marker = params.get("marker")
        generation = db.provider_fw_generation_get()
        found = db.provider_fw_rule_get_all(cidr=cidr, protocol=protocol, limit=limit + 1, marker=marker)
        page = found[:limit]
        next_marker = page[-1].id if len(found) > limit else None
        return wsgi.json_response({"rules": [rule_view(r) for r in page], "generation": generation,
                                   "next_marker": next_marker})

    @staticmethod
    def _rule_id(value: int | str) -> int:
        # The Router typed the path id against its schema (1 .. 2**63-1); this only guards direct calls.
        if isinstance(value, str) and not (value.isascii() and value.isdigit()) or int(value) > schemas.MAX_ID:
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
        payload = wsgi.body(request)
        options: dict[str, Any] = dict(wsgi.query(request))
        entries: list[tuple[int, Any]]
        if wsgi.media_type(request) == schemas.JSON:
            if isinstance(payload, dict):
                options.update({k: v for k, v in payload.items() if k != "cidrs"})
                payload = payload["cidrs"]
            entries = [(i + 1, item) for i, item in enumerate(payload)]
        else:
            entries = []
            for number, line in enumerate(payload.splitlines(), start=1):
                value = line.split("#", 1)[0].strip()
                if value:
                    entries.append((number, value))
        protocol = options.get("protocol") or "all"
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
        cidr = rules.normalise_cidr(body["cidr"])
        reason = rules.validate_description(body.get("description"))
        changes = db.provider_fw_rule_destroy_by_cidr(cidr, audit=context.audit(reason))
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
        limit = wsgi.query(request).get("limit", 100)
        records = db.audit_get_all(limit)
        return wsgi.json_response({"audit": [{
            "id": r.id, "at": _iso(r.created_at), "actor": r.actor, "request_id": r.request_id, "action": r.action,
            "generation": r.generation, "detail": json.loads(r.detail) if r.detail else None} for r in records]})
