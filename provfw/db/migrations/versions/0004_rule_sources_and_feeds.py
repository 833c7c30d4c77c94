"""Rule sources, renewals reaching the hosts, and feeds.

* ``provider_fw_rule_sources``: who wants each live rule (``manual``,
  ``import:NAME``, ``feed:NAME``) and until when; the rule's ``expires_at``
  stays the one expiry hosts see (the latest of its sources').  Every live
  rule gets a ``manual`` row here, which is what it was.
* ``provider_fw_rules.updated_generation``: the generation that last changed
  a rule's expiry, so a renewal is in the delta of every host behind it.
* ``provider_fw_feeds``: the feeds the conductor syncs, with their last state.

Compatible with the previous release, which may still run during the
upgrade: new tables and one nullable column.  A rule the previous release
creates meanwhile has no source row and counts as ``manual``; its changes
to expiries do not exist (that release never renews).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("provider_fw_rules") as batch:
        batch.add_column(sa.Column("updated_generation", sa.BigInteger(), nullable=True,
                                   comment="Generation that last changed its expiry (renewed, or a source let go)"))
        batch.create_index("ix_provider_fw_rules_updated_generation", ["updated_generation"])
        batch.alter_column("expires_at", existing_type=Timestamp, existing_nullable=True,
                           comment="Hosts stop enforcing the rule at this time: the latest expiry among its "
                                   "sources (NULL wins)",
                           existing_comment="Hosts stop enforcing the rule at this time")

    op.create_table(
        "provider_fw_rule_sources",
        sa.Column("rule_id", BigId, nullable=False),
        sa.Column("source", sa.String(80), nullable=False, comment="manual, manual:LABEL, import:NAME or feed:NAME"),
        sa.Column("expires_at", Timestamp, nullable=True, comment="Until when this source wants the rule"),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=True),
        sa.Column("created_by", sa.String(255), nullable=True, comment="API token (or feed) that added it"),
        sa.ForeignKeyConstraint(["rule_id"], ["provider_fw_rules.id"], ondelete="CASCADE",
                                name="fk_provider_fw_rule_sources_rule_id_provider_fw_rules"),
        sa.PrimaryKeyConstraint("rule_id", "source", name="pk_provider_fw_rule_sources"),
    )
    op.create_index("ix_provider_fw_rule_sources_source_rule_id", "provider_fw_rule_sources", ["source", "rule_id"])
    op.execute("INSERT INTO provider_fw_rule_sources (rule_id, source, expires_at, created_at, created_by) "
               "SELECT id, 'manual', expires_at, created_at, created_by FROM provider_fw_rules WHERE deleted = 0")

    op.create_table(
        "provider_fw_feeds",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, comment="The rules' source is feed:<name>"),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("format", sa.String(16), nullable=False, comment="provfw.feeds.formats name or auto"),
        sa.Column("csv_column", sa.String(255), nullable=True, comment="CSV address column, by header name"),
        sa.Column("protocol", sa.String(8), nullable=False),
        sa.Column("from_port", sa.Integer(), nullable=True),
        sa.Column("to_port", sa.Integer(), nullable=True),
        sa.Column("interval_seconds", sa.Integer(), nullable=False, comment="Seconds between syncs"),
        sa.Column("ttl_seconds", sa.Integer(), nullable=True,
                  comment="Listed rules expire this long after the last sync that saw them; NULL: never"),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("allow_non_global", sa.Boolean(), nullable=False,
                  comment="Block non-global ranges the list names (audited)"),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=True),
        sa.Column("updated_at", Timestamp, nullable=True),
        sa.Column("next_sync_at", Timestamp, nullable=True, comment="Due from this time; NULL: never (disabled)"),
        sa.Column("force_next", sa.Boolean(), nullable=False,
                  comment="The next sync may pass the replace guard (asked by an admin)"),
        sa.Column("claim_token", sa.String(36), nullable=True, comment="The conductor lease holding the feed"),
        sa.Column("claimed_until", Timestamp, nullable=True),
        sa.Column("etag", sa.String(1024), nullable=True, comment="ETag of the last list applied"),
        sa.Column("last_modified", sa.String(64), nullable=True, comment="Last-Modified of the last list applied"),
        sa.Column("content_sha256", sa.String(64), nullable=True, comment="Hash of the last list applied"),
        sa.Column("last_attempt_at", Timestamp, nullable=True),
        sa.Column("last_success_at", Timestamp, nullable=True, comment="Last time the list was confirmed"),
        sa.Column("last_applied_at", Timestamp, nullable=True, comment="Last time a downloaded list was synced"),
        sa.Column("last_status", sa.String(16), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_counts", sa.Text(), nullable=True, comment="JSON: counts of the last sync that applied"),
        sa.Column("last_generation", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_provider_fw_feeds"),
        sa.UniqueConstraint("name", name="uq_provider_fw_feeds_name"),
        sa.CheckConstraint("protocol IN ('tcp', 'udp', 'icmp', 'all')", name=op.f("ck_provider_fw_feeds_protocol")),
        sa.CheckConstraint("interval_seconds > 0", name=op.f("ck_provider_fw_feeds_interval")),
        sa.CheckConstraint("ttl_seconds IS NULL OR ttl_seconds > 0", name=op.f("ck_provider_fw_feeds_ttl")),
    )
    op.create_index("ix_provider_fw_feeds_next_sync_at", "provider_fw_feeds", ["next_sync_at"])


def downgrade() -> None:
    op.drop_index("ix_provider_fw_feeds_next_sync_at", table_name="provider_fw_feeds")
    op.drop_table("provider_fw_feeds")
    op.drop_index("ix_provider_fw_rule_sources_source_rule_id", table_name="provider_fw_rule_sources")
    op.drop_table("provider_fw_rule_sources")
    with op.batch_alter_table("provider_fw_rules") as batch:
        batch.alter_column("expires_at", existing_type=Timestamp, existing_nullable=True,
                           comment="Hosts stop enforcing the rule at this time",
                           existing_comment="Hosts stop enforcing the rule at this time: the latest expiry among "
                                            "its sources (NULL wins)")
        batch.drop_index("ix_provider_fw_rules_updated_generation")
        batch.drop_column("updated_generation")
