"""SQLAlchemy 2 models.  Alembic migrations in ``provfw/db/migrations/`` must match them
(``alembic check`` runs in CI).

Soft delete follows Nova: ``deleted`` is 0 while a row is live and becomes the
row's own id when it is deleted, so the unique constraint on
(cidr, protocol, from_port, to_port, deleted) allows exactly one live rule per
spec on every database (NULLs in unique keys would not), while any number of
deleted copies may remain for history and for generation deltas.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Optional

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, MetaData,
                        String, Text, UniqueConstraint, text)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Foreign keys that a database enforces with triggers instead of the constraint, by dialect name: on PostgreSQL
# the source rows' key to their rule is checked once per statement, not once per row (migration 0006).  The
# models keep declaring them (SQLAlchemy joins by them; create_all makes them); alembic check skips them there.
TRIGGERED_FOREIGN_KEYS = {"postgresql": frozenset({"fk_provider_fw_rule_sources_rule_id_provider_fw_rules"})}

# BigInteger ids would be wasted on SQLite, whose autoincrement needs INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")
intpk = Annotated[int, mapped_column(BigId, primary_key=True, autoincrement=True)]
# Microsecond precision on MariaDB (DATETIME defaults to whole seconds there).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
timestamp = Annotated[datetime.datetime, mapped_column(Timestamp)]


def utcnow() -> datetime.datetime:
    """Naive UTC: every database stores it the same way."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ProviderFirewallRule(Base):
    """One provider-level block: traffic from ``cidr`` matching protocol/ports is dropped on every host."""

    __tablename__ = "provider_fw_rules"
    __table_args__ = (
        UniqueConstraint("cidr", "protocol", "from_port", "to_port", "deleted"),
        CheckConstraint("protocol IN ('tcp', 'udp', 'icmp', 'all')", name="protocol"),
        CheckConstraint("from_port >= -1 AND from_port <= 65535 AND to_port >= -1 AND to_port <= 65535",
                        name="port_range"),
        CheckConstraint("ip_version IN (4, 6)", name="ip_version"),
        Index("ix_provider_fw_rules_created_generation", "created_generation"),
        # Partial where the database has them (migration 0005): NULL for every rule never deleted or renewed,
        # and the deltas only ask "column > N".
        Index("ix_provider_fw_rules_deleted_generation", "deleted_generation",
              postgresql_where=text("deleted_generation IS NOT NULL"),
              sqlite_where=text("deleted_generation IS NOT NULL")),
        # Partial where the database has them (migration 0006): only the expiry reads it, for rules that expire.
        Index("ix_provider_fw_rules_deleted_expires_at", "deleted", "expires_at",
              postgresql_where=text("expires_at IS NOT NULL"), sqlite_where=text("expires_at IS NOT NULL")),
        Index("ix_provider_fw_rules_updated_generation", "updated_generation",
              postgresql_where=text("updated_generation IS NOT NULL"),
              sqlite_where=text("updated_generation IS NOT NULL")),
    )

    id: Mapped[intpk]
    cidr: Mapped[str] = mapped_column(String(43), comment="Normalised network, host bits cleared")
    ip_version: Mapped[int] = mapped_column(Integer, comment="4 or 6")
    protocol: Mapped[str] = mapped_column(String(8), comment="tcp, udp, icmp or all")
    from_port: Mapped[int] = mapped_column(Integer, comment="First port, or ICMP type; -1 = any")
    to_port: Mapped[int] = mapped_column(Integer, comment="Last port, or ICMP code; -1 = any")
    description: Mapped[Optional[str]] = mapped_column(String(255))
    created_by: Mapped[Optional[str]] = mapped_column(String(255), comment="Name of the API token that created it")
    created_at: Mapped[timestamp] = mapped_column(default=utcnow)
    updated_at: Mapped[Optional[timestamp]] = mapped_column(onupdate=utcnow)
    deleted_at: Mapped[Optional[timestamp]]
    deleted: Mapped[int] = mapped_column(BigId, default=0, comment="0 while live, the row id once deleted")
    deleted_by: Mapped[Optional[str]] = mapped_column(String(255))
    expires_at: Mapped[Optional[timestamp]] = mapped_column(
        comment="Hosts stop enforcing the rule at this time: the latest expiry among its sources (NULL wins)")
    created_generation: Mapped[int] = mapped_column(BigInteger, comment="Generation that added the rule")
    deleted_generation: Mapped[Optional[int]] = mapped_column(BigInteger, comment="Generation that removed it")
    updated_generation: Mapped[Optional[int]] = mapped_column(
        BigInteger, comment="Generation that last changed its expiry (renewed, or a source let go)")


class ProviderFirewallRuleSource(Base):
    """Who wants a live rule, and until when: one row per (rule, source).

    ``source`` is ``manual`` / ``manual:LABEL``, ``import:NAME`` or
    ``feed:NAME``.  The rule's ``expires_at`` is the latest of its sources'
    ``expires_at`` (NULL wins), so hosts see one expiry; the rule is deleted
    when its last source lets go.  Rows are deleted with their source (and
    when their rule is deleted); a live rule without any row was written by
    a release before sources and counts as ``manual``.
    """

    __tablename__ = "provider_fw_rule_sources"
    __table_args__ = (
        Index("ix_provider_fw_rule_sources_source_rule_id", "source", "rule_id"),
    )

    # On PostgreSQL, statement-level triggers enforce this key instead of the constraint's row-by-row check
    # (migration 0006, TRIGGERED_FOREIGN_KEYS); MariaDB and SQLite keep the constraint.
    rule_id: Mapped[int] = mapped_column(BigId, ForeignKey("provider_fw_rules.id", ondelete="CASCADE"),
                                         primary_key=True)
    source: Mapped[str] = mapped_column(String(80), primary_key=True,
                                        comment="manual, manual:LABEL, import:NAME or feed:NAME")
    expires_at: Mapped[Optional[timestamp]] = mapped_column(comment="Until when this source wants the rule")
    created_at: Mapped[timestamp] = mapped_column(default=utcnow)
    updated_at: Mapped[Optional[timestamp]]
    created_by: Mapped[Optional[str]] = mapped_column(String(255), comment="API token (or feed) that added it")


class Feed(Base):
    """A block list the conductor fetches on a schedule and replace-syncs as source ``feed:<name>``.

    The settings are the operator's; the rest is the last sync's state, for
    the API and for conditional requests.  ``next_sync_at`` schedules it;
    ``claim_token`` / ``claimed_until`` are the lease a conductor takes (by
    compare-and-set) before it fetches, so two conductors never sync one
    feed at once.
    """

    __tablename__ = "provider_fw_feeds"
    __table_args__ = (
        UniqueConstraint("name"),
        CheckConstraint("protocol IN ('tcp', 'udp', 'icmp', 'all')", name="protocol"),
        CheckConstraint("interval_seconds > 0", name="interval"),
        CheckConstraint("ttl_seconds IS NULL OR ttl_seconds > 0", name="ttl"),
        Index("ix_provider_fw_feeds_next_sync_at", "next_sync_at"),
    )

    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(64), comment="The rules' source is feed:<name>")
    url: Mapped[str] = mapped_column(String(2048))
    format: Mapped[str] = mapped_column(String(16), default="auto", comment="provfw.feeds.formats name or auto")
    csv_column: Mapped[Optional[str]] = mapped_column(String(255), comment="CSV address column, by header name")
    protocol: Mapped[str] = mapped_column(String(8), default="all")
    from_port: Mapped[Optional[int]] = mapped_column(Integer)
    to_port: Mapped[Optional[int]] = mapped_column(Integer)
    interval_seconds: Mapped[int] = mapped_column(Integer, comment="Seconds between syncs")
    ttl_seconds: Mapped[Optional[int]] = mapped_column(
        Integer, comment="Listed rules expire this long after the last sync that saw them; NULL: never")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_non_global: Mapped[bool] = mapped_column(Boolean, default=False,
                                                   comment="Block non-global ranges the list names (audited)")
    description: Mapped[Optional[str]] = mapped_column(String(255))
    created_at: Mapped[timestamp] = mapped_column(default=utcnow)
    created_by: Mapped[Optional[str]] = mapped_column(String(255))
    updated_at: Mapped[Optional[timestamp]]
    next_sync_at: Mapped[Optional[timestamp]] = mapped_column(comment="Due from this time; NULL: never (disabled)")
    force_next: Mapped[bool] = mapped_column(Boolean, default=False,
                                             comment="The next sync may pass the replace guard (asked by an admin)")
    claim_token: Mapped[Optional[str]] = mapped_column(String(36), comment="The conductor lease holding the feed")
    claimed_until: Mapped[Optional[timestamp]]
    etag: Mapped[Optional[str]] = mapped_column(String(1024), comment="ETag of the last list applied")
    last_modified: Mapped[Optional[str]] = mapped_column(String(64), comment="Last-Modified of the last list applied")
    content_sha256: Mapped[Optional[str]] = mapped_column(String(64), comment="Hash of the last list applied")
    last_attempt_at: Mapped[Optional[timestamp]]
    last_success_at: Mapped[Optional[timestamp]] = mapped_column(comment="Last time the list was confirmed")
    last_applied_at: Mapped[Optional[timestamp]] = mapped_column(comment="Last time a downloaded list was synced")
    last_status: Mapped[Optional[str]] = mapped_column(String(16))
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    last_counts: Mapped[Optional[str]] = mapped_column(Text, comment="JSON: counts of the last sync that applied")
    last_generation: Mapped[Optional[int]] = mapped_column(BigInteger)


class FirewallGeneration(Base):
    """A single row whose counter every rule mutation bumps in its own transaction.

    Updating this row also serialises rule mutations, so generations are
    handed out in commit order and a delta 'since N' never misses a change.
    """

    __tablename__ = "provider_fw_generation"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    live_rules: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0",
                                            comment="Live rules, kept in step by every mutation (max_rules check)")
    purged_generation: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0",
        comment="Newest deleted_generation of the deleted rules purged: deltas since an older generation are "
                "snapshots")
    updated_at: Mapped[Optional[timestamp]]


class Service(Base):
    """A compute worker: its heartbeat and what it last applied, as its reports to the conductor said."""

    __tablename__ = "services"
    __table_args__ = (UniqueConstraint("host", "binary"),)

    id: Mapped[intpk]
    host: Mapped[str] = mapped_column(String(255))
    binary: Mapped[str] = mapped_column(String(64), default="provfw-compute")
    driver: Mapped[Optional[str]] = mapped_column(String(255))
    heartbeat_at: Mapped[Optional[timestamp]]
    applied_generation: Mapped[int] = mapped_column(BigInteger, default=-1, comment="-1: nothing applied yet")
    applied_at: Mapped[Optional[timestamp]]
    rule_count: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    quarantine: Mapped[Optional[str]] = mapped_column(
        Text, comment='JSON: rules this host refused, [{"id", "cidr", "reason"}]')
    bus_user: Mapped[Optional[str]] = mapped_column(
        String(255), comment="AMQP user the broker validated for the latest report")
    created_at: Mapped[timestamp] = mapped_column(default=utcnow)
    updated_at: Mapped[Optional[timestamp]] = mapped_column(onupdate=utcnow)


class ApiToken(Base):
    """An API credential; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        UniqueConstraint("name"),
        UniqueConstraint("token_hash"),
        CheckConstraint("role IN ('admin', 'reader')", name="role"),
    )

    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[timestamp] = mapped_column(default=utcnow)
    revoked_at: Mapped[Optional[timestamp]]


class AuditRecord(Base):
    """Who changed what, when and why."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_created_at", "created_at"),)

    id: Mapped[intpk]
    created_at: Mapped[timestamp] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(255), comment="API token name")
    request_id: Mapped[Optional[str]] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    generation: Mapped[Optional[int]] = mapped_column(BigInteger)
    detail: Mapped[Optional[str]] = mapped_column(Text, comment="JSON: what changed, and the reason given")
