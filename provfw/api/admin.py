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

from provfw import exception, gcpause, rules, sources
from provfw.api import schemas, wsgi
from provfw.db import api as db
from provfw.feeds import fetch, formats, importer

LOG = logging.getLogger(__name__)

DEFAULT_PAGE = schemas.DEFAULT_PAGE
MAX_PAGE = schemas.MAX_PAGE
MAX_TTL = rules.MAX_LIFETIME
MAX_REFUSED_REPORTED = 1000


# API field -> Feed column, where they differ (interval and column are reserved words in SQL).
FEED_FIELDS = {"column": "csv_column", "interval": "interval_seconds", "ttl": "ttl_seconds"}


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _iso(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=value.microsecond).isoformat() + "Z"


def rule_view(rule, sources: list | None = None) -> dict[str, Any]:
    """A rule as the API shows it; ``sources``: [(source, expires_at)] (db.provider_fw_rule_sources)."""
    return {
        "id": rule.id, "cidr": rule.cidr, "protocol": rule.protocol, "from_port": rule.from_port,
        "to_port": rule.to_port, "description": rule.description, "created_by": rule.created_by,
        "created_at": _iso(rule.created_at), "expires_at": _iso(rule.expires_at),
        "generation": rule.created_generation, "updated_generation": rule.updated_generation,
        "sources": [{"source": name, "expires_at": _iso(expires)} for name, expires in sources or ()],
    }


def rule_views(rows) -> list[dict[str, Any]]:
    """``rule_view`` of each row, with its sources (one query for all)."""
    found = db.provider_fw_rule_sources([row.id for row in rows])
    return [rule_view(row, found.get(row.id)) for row in rows]


def feed_view(feed, rules_count: int, now: datetime.datetime) -> dict[str, Any]:
    return {
        "name": feed.name, "source": db.feed_source(feed.name), "url": fetch.redact(feed.url),
        "format": feed.format, "column": feed.csv_column, "interval": feed.interval_seconds,
        "protocol": feed.protocol, "from_port": feed.from_port, "to_port": feed.to_port, "ttl": feed.ttl_seconds,
        "enabled": feed.enabled, "allow_non_global": feed.allow_non_global, "description": feed.description,
        "created_at": _iso(feed.created_at), "created_by": feed.created_by, "rules": rules_count,
        "next_sync": _iso(feed.next_sync_at),
        "syncing": feed.claimed_until is not None and feed.claimed_until > now, "force_next": bool(feed.force_next),
        "last_sync": _iso(feed.last_attempt_at), "last_success": _iso(feed.last_success_at),
        "last_applied": _iso(feed.last_applied_at), "last_status": feed.last_status, "last_error": feed.last_error,
        "last_generation": feed.last_generation,
        "counts": json.loads(feed.last_counts) if feed.last_counts else None,
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

    # ------------------------------------------------------------ meta

    def versions(self, request, context):
        return wsgi.json_response({"versions": [{"id": "v1", "status": "CURRENT"}]})

    def health(self, request, context):
        """200 ``{"status": "ok", "generation": N}``; 503 ``{"status": "unavailable", "reason": "..."}`` when
        the database cannot be reached or has no provfw schema (the reason names the failure's type; details go
        to the log)."""
        try:
            generation = db.ping()
        except (exception.DatabaseUnavailable, exception.SchemaNotReady) as exc:
            LOG.warning("health check: %s: %s", exc.message, exc.__cause__)
            return wsgi.json_response({"status": "unavailable", "reason": exc.message}, 503)
        return wsgi.json_response({"status": "ok", "generation": generation})

    def openapi(self, request, context):
        """The published contract (OpenAPI 3.1), public like the version list."""
        return wsgi.json_response(schemas.openapi_document())

    # ------------------------------------------------------------ rules

    def _allow_non_global(self, options: dict[str, Any]) -> bool:
        """The request's opt-in (audited by the caller), else the configuration's."""
        value = options.get("allow_non_global")
        return self.conf.allow_non_global if value is None else bool(value)

    def _guard(self) -> sources.Guard:
        return sources.Guard(self.conf.feeds.replace_guard_fraction, self.conf.feeds.replace_guard_min_rules)

    def _sync(self, context, source: str, specs: list[rules.RuleSpec], *, expires_at, description, action: str,
              audit_detail: dict | None = None, **options) -> tuple[db.SyncResult, bool | None]:
        """One add or replace of a source's rules, and the cast; return (result, notified or None)."""
        result = db.provider_fw_rules_sync(
            source, specs, expires_at=expires_at, description=description, created_by=context.actor,
            audit=context.audit(description), max_rules=self.conf.max_rules, action=action,
            audit_detail=audit_detail, notify=self._notify, **options)
        return result, result.notified

    def create(self, request, context):
        body = self._body(request)
        spec = self._spec(body)
        source = sources.parse_source(body.get("source") or sources.MANUAL, sources.MANUAL)
        allow = self._allow_non_global(body)
        hit = importer.check_one(spec, self.protected, allow)
        description = rules.validate_description(body.get("description"))
        expires_at = parse_expiry(body)
        detail = {"allow_non_global": True, "non_global_allowed": [{"cidr": spec.cidr, "range": hit}]} if hit else {}
        result, notified = self._sync(context, source, [spec], expires_at=expires_at, description=description,
                                      action="rule.create", audit_detail=detail)
        if spec in result.unchanged:
            raise exception.DuplicateRule(spec)
        rule, wants = result.rules[result.rule_ids[spec]]
        created = result.added == 1
        return wsgi.json_response({"rule": rule_view(rule, wants), "generation": result.generation,
                                   "renewed": result.renewed == 1, "notified": bool(notified)},
                                  201 if created else 200)

    def index(self, request, context):
        params = wsgi.query(request)
        cidr = params.get("cidr")
        if cidr is not None:
            cidr = rules.normalise_cidr(cidr)
        protocol = params.get("protocol")
        source = params.get("source")
        if source is not None:
            source = sources.parse_source(source, sources.MANUAL, allowed=sources.KINDS)
        generation = db.provider_fw_generation_get()
        contains = params.get("contains")
        if contains is not None:
            network = rules.parse_network(contains, "contains")
            found = db.provider_fw_rule_get_containing(network, protocol=protocol, source=source)
            if cidr is not None:
                found = [r for r in found if r.cidr == cidr]
            return wsgi.json_response({"rules": rule_views(found), "generation": generation, "next_marker": None})
        limit = params.get("limit", DEFAULT_PAGE)
        marker = params.get("marker")
        within = params.get("within")
        if within is not None:
            within = rules.parse_network(within, "within")
        found = db.provider_fw_rule_get_all(cidr=cidr, protocol=protocol, limit=limit + 1, marker=marker,
                                            source=source, within=within)
        page = found[:limit]
        next_marker = page[-1].id if len(found) > limit else None
        return wsgi.json_response({"rules": rule_views(page), "generation": generation, "next_marker": next_marker})

    def sources(self, request, context):
        return wsgi.json_response({"sources": [{"source": name, "rules": count}
                                               for name, count in db.provider_fw_source_counts()],
                                   "generation": db.provider_fw_generation_get()})

    @staticmethod
    def _rule_id(value: int | str) -> int:
        # The Router typed the path id against its schema (1 .. 2**63-1); this only guards direct calls.
        if isinstance(value, str) and not (value.isascii() and value.isdigit()) or int(value) > schemas.MAX_ID:
            raise exception.RuleNotFound(value)
        return int(value)

    def show(self, request, context, id):
        return wsgi.json_response({"rule": rule_views([db.provider_fw_rule_get(self._rule_id(id))])[0]})

    def delete(self, request, context, id):
        source = wsgi.query(request).get("source")
        if source is not None:
            source = sources.parse_source(source, sources.MANUAL, allowed=sources.KINDS)
        changes = db.provider_fw_rule_destroy(self._rule_id(id), audit=context.audit(), source=source,
                                              notify=self._notify)
        response = webob.Response(status=204)
        response.headers["X-Provfw-Generation"] = str(changes.generation)
        return response

    # ------------------------------------------------------------ bulk import

    def import_rules(self, request, context):
        """A block list as text (any format of docs/feeds.md) or JSON (a list, or {"cidrs": [...], ...}).

        Options (query string, or JSON keys that override it): protocol, from_port, to_port, description,
        ttl / expires_at, source (import:NAME; default import:default), mode (add | replace), format and
        column (text), dry_run, force, allow_non_global.  One transaction, one generation and one cast; the
        answer counts added / renewed / duplicate / removed / deleted / refused.
        """
        # Parsing, planning and the rows read back allocate per entry of lists of 120k: gcpause says why.
        with gcpause.paused():
            return self._import_rules(request, context)

    def _import_rules(self, request, context):
        payload = wsgi.body(request)
        options: dict[str, Any] = dict(wsgi.query(request))
        is_json = wsgi.media_type(request) == schemas.JSON
        if is_json:
            if isinstance(payload, dict):
                options.update({k: v for k, v in payload.items() if k != "cidrs"})
                payload = payload["cidrs"]
            if options.get("format", formats.AUTO) != formats.AUTO or options.get("column") is not None:
                raise exception.InvalidInput("format", "format and column apply to text bodies; a JSON body is "
                                                       "a list of values")
            entries, refused = [], []
            # Per entry of lists of 120k: tuple.__new__ skips the NamedTuple's Python-level __new__.
            add, make, entry, parse = entries.append, tuple.__new__, formats.Entry, formats.parse_value
            for number, item in enumerate(payload, start=1):
                try:
                    networks = parse(item)
                except exception.InvalidInput as exc:
                    refused.append(formats.Refused(number, str(item)[:100], exc.reason))
                    continue
                for network in networks:
                    add(make(entry, (number, network)))
            distinct = list({entry.network: entry for entry in reversed(entries)}.values())[::-1]
            repeated, used_format = len(entries) - len(distinct), "json"
            entries = distinct
        mode = options.get("mode") or "add"
        if mode == "replace" and not options.get("source"):
            raise exception.InvalidInput("source", "mode=replace needs a source: the list it replaces")
        source = sources.parse_source(options.get("source") or "default", "import", allowed=("import",))
        like = importer.template(options.get("protocol") or "all", options.get("from_port"), options.get("to_port"))
        description = rules.validate_description(options.get("description"))
        expires_at = parse_expiry(options)
        allow = self._allow_non_global(options)
        if is_json:
            built = importer.build_from_entries(entries, refused, repeated, like, self.protected, allow)
        else:
            # As bytes, so the parser's checks for binary data apply as they do to a download.  Parsed with
            # the rule template: most entries of a large list come out of the parser as rules (parse_specs).
            parsed, built = importer.parse_specs(payload.encode("utf-8"), options.get("format", formats.AUTO),
                                                 options.get("column"), like, self.protected, allow)
            used_format = parsed.format
        detail: dict[str, Any] = {"format": used_format, "refused": len(built.refused)}
        if built.non_global:
            detail.update(allow_non_global=True, non_global_allowed=[
                {"line": line, "cidr": cidr, "range": hit} for line, cidr, hit in built.non_global])
        dry_run = bool(options.get("dry_run"))
        result, notified = self._sync(context, source, built.specs, expires_at=expires_at, description=description,
                                      action="rule.import", audit_detail=detail, mode=mode, dry_run=dry_run,
                                      force=bool(options.get("force")), guard=self._guard())
        preview = None
        if dry_run:
            preview = {key: [spec.cidr for spec in specs] for key, specs in result.preview.items()}
        return wsgi.json_response({
            "added": result.added, "renewed": result.renewed, "duplicate": result.duplicate + built.duplicates,
            "removed": result.removed, "deleted": result.deleted, "refused": len(built.refused),
            "refused_lines": [r._asdict() for r in built.refused[:MAX_REFUSED_REPORTED]],
            "generation": result.generation, "source": source, "mode": mode, "format": used_format,
            "dry_run": dry_run, "non_global_allowed": built.non_global_count,
            "guard": result.guard.as_dict() if result.guard else None, "preview": preview, "notified": notified,
        }, 201 if result.added and not dry_run else 200)

    # ------------------------------------------------------------ the seed's CIDR-level calls

    def block_external_addresses(self, request, context):
        """Seed semantics: block every tcp and udp port and all ICMP from ``cidr``."""
        body = self._body(request)
        cidr = rules.normalise_cidr(body["cidr"])
        specs = rules.external_block_specs(cidr)
        source = sources.parse_source(body.get("source") or sources.MANUAL, sources.MANUAL)
        hit = importer.check_one(specs[0], self.protected, self._allow_non_global(body))
        description = rules.validate_description(body.get("description"))
        expires_at = parse_expiry(body)
        detail = {"allow_non_global": True, "non_global_allowed": [{"cidr": cidr, "range": hit}]} if hit else {}
        result, _ = self._sync(context, source, specs, expires_at=expires_at, description=description,
                               action="cidr.block", audit_detail=detail)
        if set(result.unchanged) == set(specs):
            return wsgi.json_response({"status": "Failed", "message": "Duplicate rule. 0 rules added"}, 409)
        added_ids = {rule.id for rule in result.changes.added if rule.spec in result.preview["added"]}
        rows = [result.rules[rule_id] for rule_id in sorted(added_ids) if rule_id in result.rules]
        message = f"Added {len(rows)} rules" + (f", renewed {result.renewed}" if result.renewed else "")
        unchanged = len(set(result.unchanged) & set(specs))
        return wsgi.json_response({"status": "OK", "message": message,
                                   "rules": [rule_view(rule, wants) for rule, wants in rows],
                                   "renewed": result.renewed, "unchanged": unchanged,
                                   "kept": len(specs) - len(rows) - result.renewed - unchanged,
                                   "generation": result.generation})

    def list_blocks(self, request, context):
        blocks = db.provider_fw_distinct_cidrs()
        return wsgi.json_response({"blocks": [{"cidr": cidr, "rules": count} for cidr, count in blocks],
                                   "generation": db.provider_fw_generation_get()})

    def remove_block(self, request, context):
        body = self._body(request)
        cidr = rules.normalise_cidr(body["cidr"])
        reason = rules.validate_description(body.get("description"))
        source = body.get("source")
        if source is not None:
            source = sources.parse_source(source, sources.MANUAL, allowed=sources.KINDS)
        changes = db.provider_fw_rule_destroy_by_cidr(cidr, audit=context.audit(reason), source=source,
                                                      notify=self._notify)
        count = len(changes.removed)
        # "cidr" and "deleted" let clients report the result without parsing the seed's message text.
        return wsgi.json_response({"status": "OK", "message": f"Deleted {count} rules", "cidr": cidr,
                                   "deleted": count, "kept": getattr(changes, "kept", 0),
                                   "generation": changes.generation})

    # ------------------------------------------------------------ feeds

    def _feed_settings(self, body: dict[str, Any], current=None) -> dict[str, Any]:
        """FEED_SETTINGS from a create (``current`` None) or update body, checked as a whole."""
        def pick(key, column, default):
            if key in body:
                return body[key]
            return getattr(current, column) if current is not None else default

        settings = {
            "url": fetch.check_url(pick("url", "url", None)),
            "format": pick("format", "format", formats.AUTO),
            "csv_column": pick("column", "csv_column", None),
            "protocol": pick("protocol", "protocol", "all") or "all",
            "from_port": pick("from_port", "from_port", None), "to_port": pick("to_port", "to_port", None),
            "interval_seconds": pick("interval", "interval_seconds", None),
            "ttl_seconds": pick("ttl", "ttl_seconds", None),
            "enabled": pick("enabled", "enabled", True), "allow_non_global": pick("allow_non_global",
                                                                                  "allow_non_global", False),
            "description": rules.validate_description(pick("description", "description", None)),
        }
        like = importer.template(settings["protocol"], settings["from_port"], settings["to_port"])
        settings.update(protocol=like.protocol, from_port=settings["from_port"] and like.from_port,
                        to_port=settings["to_port"] and like.to_port)
        if settings["csv_column"] is not None and settings["format"] not in (formats.AUTO, "csv"):
            raise exception.InvalidInput("column", f"applies to format csv, not {settings['format']}")
        minimum = self.conf.feeds.min_interval
        if settings["interval_seconds"] < minimum:
            raise exception.InvalidInput("interval", f"must be at least {minimum} seconds ([feeds] min_interval)")
        ttl = settings["ttl_seconds"]
        if ttl is not None and ttl < 2 * settings["interval_seconds"]:
            twice = 2 * settings["interval_seconds"]
            raise exception.InvalidInput("ttl", f"must be at least twice the interval ({twice} s), or the rules "
                                                "lapse between two syncs")
        return settings

    def _feed_view(self, feed) -> dict[str, Any]:
        return feed_view(feed, db.feed_rule_counts().get(feed.name, 0), utcnow())

    def feed_index(self, request, context):
        counts, now = db.feed_rule_counts(), utcnow()
        return wsgi.json_response({"feeds": [feed_view(f, counts.get(f.name, 0), now) for f in db.feed_get_all()]})

    def feed_create(self, request, context):
        body = self._body(request)
        settings = self._feed_settings(body)
        feed = db.feed_create(body["name"], settings, audit=context.audit(settings["description"]),
                              shown={**settings, "url": fetch.redact(settings["url"])})
        return wsgi.json_response({"feed": self._feed_view(feed)}, 201)

    def feed_show(self, request, context, name):
        return wsgi.json_response({"feed": self._feed_view(db.feed_get(name))})

    def feed_update(self, request, context, name):
        body = self._body(request)
        settings = self._feed_settings(body, db.feed_get(name))
        given = {FEED_FIELDS.get(field, field) for field in body}
        if {"protocol", "from_port", "to_port"} & given:
            given |= {"protocol", "from_port", "to_port"}        # normalised together
        changed = {key: value for key, value in settings.items() if key in given}
        shown = {**changed, "url": fetch.redact(changed["url"])} if "url" in changed else changed
        feed = db.feed_update(name, changed, audit=context.audit(), shown=shown)
        return wsgi.json_response({"feed": self._feed_view(feed)})

    def feed_delete(self, request, context, name):
        result = db.feed_destroy(name, audit=context.audit())
        notified = self._notify(result.changes) if result.changed else None
        return wsgi.json_response({"feed": name, "removed": result.removed, "deleted": result.deleted,
                                   "generation": result.generation, "notified": notified})

    def feed_sync(self, request, context, name):
        force = bool(wsgi.query(request).get("force"))
        feed = db.feed_request_sync(name, force=force, audit=context.audit())
        return wsgi.json_response({"feed": self._feed_view(feed)}, 202)

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
