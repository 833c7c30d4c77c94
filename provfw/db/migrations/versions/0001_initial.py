"""Initial schema: provider firewall rules, generation, services, tokens, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "provider_fw_rules",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("cidr", sa.String(43), nullable=False, comment="Normalised network, host bits cleared"),
        sa.Column("ip_version", sa.Integer(), nullable=False, comment="4 or 6"),
        sa.Column("protocol", sa.String(8), nullable=False, comment="tcp, udp, icmp or all"),
        sa.Column("from_port", sa.Integer(), nullable=False, comment="First port, or ICMP type; -1 = any"),
        sa.Column("to_port", sa.Integer(), nullable=False, comment="Last port, or ICMP code; -1 = any"),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("created_by", sa.String(255), nullable=True, comment="Name of the API token that created it"),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=True),
        sa.Column("deleted_at", Timestamp, nullable=True),
        sa.Column("deleted", BigId, nullable=False, comment="0 while live, the row id once deleted"),
        sa.Column("deleted_by", sa.String(255), nullable=True),
        sa.Column("expires_at", Timestamp, nullable=True, comment="Hosts stop enforcing the rule at this time"),
        sa.Column("created_generation", sa.BigInteger(), nullable=False, comment="Generation that added the rule"),
        sa.Column("deleted_generation", sa.BigInteger(), nullable=True, comment="Generation that removed it"),
        sa.PrimaryKeyConstraint("id", name="pk_provider_fw_rules"),
        sa.UniqueConstraint("cidr", "protocol", "from_port", "to_port", "deleted",
                            name="uq_provider_fw_rules_cidr_protocol_from_port_to_port_deleted"),
        sa.CheckConstraint("protocol IN ('tcp', 'udp', 'icmp', 'all')", name=op.f("ck_provider_fw_rules_protocol")),
        sa.CheckConstraint("from_port >= -1 AND from_port <= 65535 AND to_port >= -1 AND to_port <= 65535",
                           name=op.f("ck_provider_fw_rules_port_range")),
        sa.CheckConstraint("ip_version IN (4, 6)", name=op.f("ck_provider_fw_rules_ip_version")),
    )
    op.create_index("ix_provider_fw_rules_created_generation", "provider_fw_rules", ["created_generation"])
    op.create_index("ix_provider_fw_rules_deleted_generation", "provider_fw_rules", ["deleted_generation"])
    op.create_index("ix_provider_fw_rules_deleted_expires_at", "provider_fw_rules", ["deleted", "expires_at"])

    generation = op.create_table(
        "provider_fw_generation",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_provider_fw_generation"),
        sa.CheckConstraint("id = 1", name=op.f("ck_provider_fw_generation_single_row")),
    )
    op.bulk_insert(generation, [{"id": 1, "generation": 0}])

    op.create_table(
        "services",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("binary", sa.String(64), nullable=False),
        sa.Column("driver", sa.String(255), nullable=True),
        sa.Column("heartbeat_at", Timestamp, nullable=True),
        sa.Column("applied_generation", sa.BigInteger(), nullable=False, comment="-1: nothing applied yet"),
        sa.Column("applied_at", Timestamp, nullable=True),
        sa.Column("rule_count", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_services"),
        sa.UniqueConstraint("host", "binary", name="uq_services_host_binary"),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("revoked_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.CheckConstraint("role IN ('admin', 'reader')", name=op.f("ck_api_tokens_role")),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False, comment="API token name"),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True, comment="JSON: what changed, and the reason given"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_created_at", "audit_log", ["created_at"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
    op.drop_table("services")
    op.drop_table("provider_fw_generation")
    op.drop_table("provider_fw_rules")
