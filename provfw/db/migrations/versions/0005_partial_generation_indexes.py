"""Index only the rules a generation column names.

``deleted_generation`` and ``updated_generation`` are NULL for every rule
that was never deleted or renewed: every row an import writes.  Their
indexes held an entry for each such row, which no query reads (the deltas
ask ``column > N``, which a NULL never satisfies) and which each insert paid
for.  On PostgreSQL and SQLite they become partial indexes (``WHERE column IS
NOT NULL``), which both databases use for ``column > N``; MariaDB has no
partial indexes and keeps the full ones.  The COPY of a 120k-rule import:
2.15-2.39 -> 1.86-1.93 s on PostgreSQL (three runs each, alternating, a slow
moment of the development VM; docs/benchmarks.md, issue 7).

Compatible with the previous release: the same index names and columns, and
the queries it runs are answered the same way.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = ("deleted_generation", "updated_generation")
PARTIAL = ("postgresql", "sqlite")


def _recreate(partial: bool) -> None:
    if op.get_bind().dialect.name not in PARTIAL:
        return
    for column in COLUMNS:
        name = f"ix_provider_fw_rules_{column}"
        where = sa.text(f"{column} IS NOT NULL") if partial else None
        op.drop_index(name, table_name="provider_fw_rules")
        op.create_index(name, "provider_fw_rules", [column], postgresql_where=where, sqlite_where=where)


def upgrade() -> None:
    _recreate(partial=True)


def downgrade() -> None:
    _recreate(partial=False)
