"""The database API: the only module the rest of provfw imports to touch the database.

Callers get plain values or detached model objects; no session ever escapes.
The implementation is ``provfw.db.sqlalchemy.api`` (SQLite, PostgreSQL, MariaDB).
"""

from __future__ import annotations

from provfw.db.sqlalchemy import api as IMPL

Audit = IMPL.Audit
CreateResult = IMPL.CreateResult
rule_of = IMPL.rule_of
Snapshot = IMPL.Snapshot
Changes = IMPL.Changes
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

def provider_fw_rule_create(spec, description=None, created_by=None, expires_at=None, audit=None, max_rules=None):
    """Create one live rule; return (rule, generation).  DuplicateRule if already live."""
    return IMPL.provider_fw_rule_create(spec, description, created_by, expires_at, audit, max_rules)


def provider_fw_rules_create_many(specs, description=None, created_by=None, expires_at=None, audit=None,
                                  max_rules=None, action="rule.create"):
    """Create the specs not already live in one transaction and one generation; return CreateResult."""
    return IMPL.provider_fw_rules_create_many(specs, description, created_by, expires_at, audit, max_rules, action)


def provider_fw_rule_get(rule_id):
    """The live, unexpired rule ``rule_id``; RuleNotFound otherwise (also for ids no row can have)."""
    return IMPL.provider_fw_rule_get(rule_id)


def provider_fw_rule_get_all(cidr=None, protocol=None, limit=None, marker=None):
    """Live, unexpired rules ordered by id, optionally filtered and paginated (marker = last id seen)."""
    return IMPL.provider_fw_rule_get_all(cidr, protocol, limit, marker)


def provider_fw_rule_get_all_by_cidr(cidr):
    """Live, unexpired rules whose normalised CIDR equals ``cidr``."""
    return IMPL.provider_fw_rule_get_all_by_cidr(cidr)


def provider_fw_rule_destroy(rule_id, audit=None):
    """Soft-delete one live, unexpired rule; return Changes (one rule removed).  RuleNotFound if it is not live."""
    return IMPL.provider_fw_rule_destroy(rule_id, audit)


def provider_fw_rule_destroy_by_cidr(cidr, audit=None):
    """Soft-delete every live, unexpired rule of ``cidr``; return Changes (the rules removed).  NotFound when none."""
    return IMPL.provider_fw_rule_destroy_by_cidr(cidr, audit)


def provider_fw_rule_purge_expired(now=None, older_than=None, audit=None):
    """Soft-delete expired rules; return Changes, or None when nothing had expired."""
    return IMPL.provider_fw_rule_purge_expired(now, older_than, audit)


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


def provider_fw_changes_count_since(generation):
    """How many rule rows were created or deleted after ``generation`` (an upper bound of the delta's size)."""
    return IMPL.provider_fw_changes_count_since(generation)


def provider_fw_changes_since(generation):
    """Changes(since, generation, added [Rule], removed [Rule]) after ``generation``."""
    return IMPL.provider_fw_changes_since(generation)


def provider_fw_metrics_read(binary="provfw-compute"):
    """MetricsRead(generation, {protocol: live unexpired rules}, [(host, applied_generation, heartbeat_at)])."""
    return IMPL.provider_fw_metrics_read(binary)


def ping():
    """The current generation; DatabaseUnavailable (503) when the database cannot be reached."""
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
