"""Remember up to which generation deleted rules were purged, so no delta is answered without them.

Rules are soft-deleted (``deleted`` = their id, ``deleted_generation`` the
generation that removed them) because a host catching up asks for the rules
removed after its generation.  ``provfw-manage db purge`` deletes the rows of
rules deleted before a date, as ``nova-manage db purge`` does Nova's; a host
whose generation is older than the newest ``deleted_generation`` purged can
then no longer be answered with a delta and gets a full snapshot.
``purged_generation`` on the generation row is that bound (0: nothing was ever
purged).  Compatible with the previous release: a column with a server
default, which that release never reads.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COMMENT = "Newest deleted_generation of the deleted rules purged: deltas since an older generation are snapshots"


def upgrade() -> None:
    with op.batch_alter_table("provider_fw_generation") as batch:
        batch.add_column(sa.Column("purged_generation", sa.BigInteger(), nullable=False, server_default="0",
                                   comment=COMMENT))


def downgrade() -> None:
    with op.batch_alter_table("provider_fw_generation") as batch:
        batch.drop_column("purged_generation")
