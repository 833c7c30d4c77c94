"""The database API: the only module the rest of provfw imports to touch the database.

Callers get plain values or detached model objects; no session ever escapes.
The implementation is ``provfw.db.sqlalchemy.api`` (SQLite, PostgreSQL, MariaDB).
"""

from __future__ import annotations

from provfw.db.sqlalchemy import api as IMPL

Audit = IMPL.Audit
CreateResult = IMPL.CreateResult
SyncResult = IMPL.SyncResult
FeedClaim = IMPL.FeedClaim
rule_of = IMPL.rule_of
Snapshot = IMPL.Snapshot
Changes = IMPL.Changes
FEED_SETTINGS = IMPL.FEED_SETTINGS
feed_source = IMPL.feed_source
MetricsRead = IMPL.MetricsRead


def configure(url, pool_size=5):
    """Use the database at ``url`` (SQLAlchemy URL) from now on."""
    return IMPL.configure(url, pool_size)


def get_engine():
    return IMPL.get_engine()


def dispose():
    """Close every pooled connection (before fork, at shutdown, between tests)."""
    IMPL.dispose()


def statement_counts():
    """{"statements", "transactions", "rows_read"} this process asked of the database since it started."""
    return IMPL.statement_counts()


# Provider firewall rules ---------------------------------------------------

def provider_fw_rule_create(spec, description=None, created_by=None, expires_at=None, audit=None, max_rules=None,
                            source="manual"):
    """Create one live rule, or renew it / add ``source`` to it; return (rule, generation).

    DuplicateRule when ``source`` already wants the live rule at least as long.
    """
    return IMPL.provider_fw_rule_create(spec, description, created_by, expires_at, audit, max_rules, source)


def provider_fw_rules_create_many(specs, description=None, created_by=None, expires_at=None, audit=None,
                                  max_rules=None, action="rule.create", source="manual"):
    """Make ``source`` want the specs (create, renew, attach) in one transaction and one generation;
    return CreateResult."""
    return IMPL.provider_fw_rules_create_many(specs, description, created_by, expires_at, audit, max_rules, action,
                                              source)


def provider_fw_rules_sync(source, specs, **options):
    """Add ``specs`` to ``source`` or (``mode="replace"``) make them its exact list, in one transaction and one
    generation; return SyncResult.  Options: mode, expires_at, description, created_by, audit, max_rules,
    action, guard (sources.Guard), force, dry_run, renew_slack (seconds), audit_detail, notify (called with the
    committed Changes; a small call with it may share a group commit).  ReplaceGuardTripped,
    RuleLimitExceeded (both 409) change nothing."""
    return IMPL.provider_fw_rules_sync(source, specs, **options)


def provider_fw_rule_get(rule_id):
    """The live, unexpired rule ``rule_id``; RuleNotFound otherwise (also for ids no row can have)."""
    return IMPL.provider_fw_rule_get(rule_id)


def provider_fw_rule_get_many(rule_ids):
    """The live rules among ``rule_ids``, ordered by id."""
    return IMPL.provider_fw_rule_get_many(rule_ids)


def provider_fw_rule_get_all(cidr=None, protocol=None, limit=None, marker=None, source=None, within=None):
    """Live, unexpired rules ordered by id, optionally filtered (``source``: rules that source wants;
    ``within``: an ipaddress network, rules inside it, itself included) and paginated (marker = last id seen)."""
    return IMPL.provider_fw_rule_get_all(cidr, protocol, limit, marker, source, within)


def provider_fw_rule_get_containing(network, protocol=None, source=None):
    """Live, unexpired rules whose network contains ``network`` (an ipaddress network; an address is a /32 or
    /128), most specific first."""
    return IMPL.provider_fw_rule_get_containing(network, protocol, source)


def provider_fw_rule_sources(rule_ids):
    """rule_id -> [(source, expires_at)] for the live rules among ``rule_ids``."""
    return IMPL.provider_fw_rule_sources(rule_ids)


def provider_fw_source_counts():
    """[(source, live rules it wants)] sorted by source."""
    return IMPL.provider_fw_source_counts()


def provider_fw_rule_get_all_by_cidr(cidr):
    """Live, unexpired rules whose normalised CIDR equals ``cidr``."""
    return IMPL.provider_fw_rule_get_all_by_cidr(cidr)


def provider_fw_rule_destroy(rule_id, audit=None, source=None, notify=None):
    """Delete one live, unexpired rule (with ``source``: only that source's wish; the rule stays while another source
    wants it); return Changes.  RuleNotFound if it is not live, NotFound if it lacks ``source``.  ``notify``: as
    in provider_fw_rules_sync."""
    return IMPL.provider_fw_rule_destroy(rule_id, audit, source, notify)


def provider_fw_rule_destroy_by_cidr(cidr, audit=None, source=None, notify=None):
    """Delete every live, unexpired rule of ``cidr`` (with ``source``: that source's wishes); return Changes (with
    ``source``: Unblocked, whose ``kept`` counts the rules that stay for other sources).  NotFound when none.
    ``notify``: as in provider_fw_rules_sync."""
    return IMPL.provider_fw_rule_destroy_by_cidr(cidr, audit, source, notify)


def provider_fw_rule_purge_expired(now=None, older_than=None, audit=None):
    """Soft-delete expired rules (and forget lapsed source wishes); return Changes, or None when no rule had
    expired."""
    return IMPL.provider_fw_rule_purge_expired(now, older_than, audit)


def provider_fw_purge_deleted(before, audit_records=False, max_rows=None, audit=None):
    """Delete the rows of rules soft-deleted before ``before`` (naive UTC datetime) and, with
    ``audit_records``, the audit records created before it, in batches; return PurgeResult(rules,
    audit_records, purged_generation).  Hosts behind ``purged_generation`` get a snapshot, not a delta."""
    return IMPL.provider_fw_purge_deleted(before, audit_records, max_rows=max_rows, audit=audit)


def provider_fw_distinct_cidrs():
    """[(cidr, count of live, unexpired rules)] for every CIDR that has one."""
    return IMPL.provider_fw_distinct_cidrs()


def provider_fw_rule_count():
    return IMPL.provider_fw_rule_count()


def provider_fw_generation_get():
    """The current rule-set generation."""
    return IMPL.provider_fw_generation_get()


def provider_fw_snapshot(now=None):
    """Snapshot(generation, [Rule]) of the live, unexpired rules, consistent with one generation."""
    return IMPL.provider_fw_snapshot(now)


def provider_fw_snapshot_wire(now=None):
    """The same as (generation, [rule in wire form: (id, cidr, protocol, from_port, to_port, expires_at)]),
    for a reply to hosts."""
    return IMPL.provider_fw_snapshot_wire(now)


def provider_fw_changes_count_since(generation):
    """How many rule rows were created or deleted after ``generation`` (an upper bound of the delta's size);
    None when rows a delta would need were purged (``provider_fw_purge_deleted``): only a snapshot answers."""
    return IMPL.provider_fw_changes_count_since(generation)


def provider_fw_changes_since(generation):
    """Changes(since, generation, added [Rule], removed [Rule]) after ``generation``; None when rows it would
    need were purged (``provider_fw_purge_deleted``)."""
    return IMPL.provider_fw_changes_since(generation)


# Feeds ---------------------------------------------------------------------

def feed_create(name, settings, audit=None, shown=None):
    """Create a feed (``settings``: FEED_SETTINGS; ``shown``: what the audit records); Conflict if the name
    is taken."""
    return IMPL.feed_create(name, settings, audit, shown)


def feed_get(name):
    """The feed ``name``; NotFound otherwise."""
    return IMPL.feed_get(name)


def feed_get_all():
    return IMPL.feed_get_all()


def feed_update(name, settings, audit=None, shown=None):
    """Change some of a feed's settings; NotFound when there is no such feed."""
    return IMPL.feed_update(name, settings, audit, shown)


def feed_request_sync(name, force=False, audit=None):
    """Make the feed due now (``force``: its next sync may pass the replace guard)."""
    return IMPL.feed_request_sync(name, force, audit)


def feed_destroy(name, audit=None):
    """Delete the feed and its source from every rule in one generation; return SyncResult."""
    return IMPL.feed_destroy(name, audit)


def feed_claim_due(claimant, lease, now=None, limit=10):
    """[FeedClaim] of due feeds this caller now holds for ``lease`` seconds (compare-and-set)."""
    return IMPL.feed_claim_due(claimant, lease, now, limit)


def feed_record(claim, state):
    """Record a sync's outcome and release the claim; False when the claim was lost."""
    return IMPL.feed_record(claim, state)


def feed_sync(claim, specs, state, **options):
    """Replace-sync the claimed feed's source and record ``state`` in one transaction; return SyncResult."""
    return IMPL.feed_sync(claim, specs, state, **options)


def feed_rule_counts():
    """feed name -> live rules it wants."""
    return IMPL.feed_rule_counts()


def provider_fw_metrics_read(binary="provfw-compute"):
    """MetricsRead(generation, {protocol: live unexpired rules}, [(host, applied_generation, heartbeat_at)])."""
    return IMPL.provider_fw_metrics_read(binary)


def ping():
    """The current generation; DatabaseUnavailable (503) when the database cannot be reached, SchemaNotReady (503)
    when it answers without provfw's tables."""
    return IMPL.ping()


# Services ------------------------------------------------------------------

def service_update(host, binary="provfw-compute", **values):
    """Upsert a worker's Service row (heartbeat=True stamps the heartbeat)."""
    return IMPL.service_update(host, binary, **values)


def service_update_many(reports, binary="provfw-compute"):
    """Write {host: {field: value}} state reports in one transaction (see SERVICE_REPORT_FIELDS); return rows."""
    return IMPL.service_update_many(reports, binary)


def service_get(host, binary="provfw-compute"):
    return IMPL.service_get(host, binary)


def service_get_all(binary="provfw-compute"):
    return IMPL.service_get_all(binary)


def service_destroy(host, binary="provfw-compute"):
    return IMPL.service_destroy(host, binary)


# Tokens and audit ----------------------------------------------------------

def new_token_secret():
    """A fresh API token secret (not stored anywhere yet)."""
    return IMPL.new_token_secret()


def api_token_create(name, role, secret=None):
    """Create an API token; return the secret, which is not stored (only its hash).  With ``secret`` (from
    ``new_token_secret``) store that one instead of a new one.  Conflict if ``name`` is taken."""
    return IMPL.api_token_create(name, role, secret)


def api_token_get_by_secret(secret, include_revoked=False):
    """The active token with this secret, or None; ``include_revoked`` finds revoked ones too."""
    return IMPL.api_token_get_by_secret(secret, include_revoked)


def api_token_get_all():
    return IMPL.api_token_get_all()


def api_token_revoke(name):
    return IMPL.api_token_revoke(name)


def audit_get_all(limit=100):
    return IMPL.audit_get_all(limit)
