"""Per-host quarantine and the bus identity that reported it.

Workers no longer write their Service rows; the conductor does, from the
state reports each worker sends over the bus.  ``quarantine`` holds the rules
this host's kernel refused (JSON list of {"id", "cidr", "reason"}); the rest
are applied.  ``bus_user`` is the AMQP user the broker validated for the
latest report.  Compatible with the previous release: nullable columns only.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("quarantine", sa.Text(), nullable=True,
                                   comment='JSON: rules this host refused, [{"id", "cidr", "reason"}]'))
        batch.add_column(sa.Column("bus_user", sa.String(255), nullable=True,
                                   comment="AMQP user the broker validated for the latest report"))


def downgrade() -> None:
    with op.batch_alter_table("services") as batch:
        batch.drop_column("bus_user")
        batch.drop_column("quarantine")
