"""Check a source row's rule once per statement on PostgreSQL, and index only expiring rules.

**The foreign key of ``provider_fw_rule_sources.rule_id``.**  PostgreSQL
checks a foreign key row by row: for each inserted source row an ``AFTER``
trigger runs ``SELECT 1 FROM provider_fw_rules WHERE id = $1 FOR KEY SHARE``,
which locks the rule row (a WAL record and a dirtied page each).  A
120,430-rule import writes as many source rows, and that check was 0.45 s of
the 1.75 s the import spent in the database (docs/benchmarks.md, issue 7).
On PostgreSQL the constraint becomes triggers that keep what it promised:

* an insert into ``provider_fw_rule_sources`` whose rows name a rule that does
  not exist fails with SQLSTATE 23503 (``foreign_key_violation``, what the
  constraint raised: psycopg2 and SQLAlchemy give the same ``IntegrityError``),
  checked once per statement against its transition table (one anti-join);
* so does an update that changes a source row's ``rule_id`` (a row trigger that
  fires only when the value changes: provfw never changes it);
* deleting rule rows deletes their source rows (``ON DELETE CASCADE``; provfw
  itself only soft-deletes, an operator archiving old rows may not), and
  changing a referenced rule's ``id`` fails (``ON UPDATE NO ACTION``).

What it does not keep is the constraint's row lock: a transaction deleting a
rule row concurrently with an insert naming it could leave an orphan.  Rule
rows are never deleted by provfw, and every write that inserts source rows
holds the generation row's lock, so no provfw process can race itself there.
MariaDB and SQLite keep the constraint (their imports are not COPY-sized).
The model still declares it (``models.ProviderFirewallRuleSource``), and
``env.py`` leaves it out of ``alembic check``'s comparison on PostgreSQL.

**``ix_provider_fw_rules_deleted_expires_at``** becomes partial (``WHERE
expires_at IS NOT NULL``) on PostgreSQL and SQLite, as migration 0005 did for
the generation indexes: the only query that reads it is the expiry's
(``deleted = 0 AND expires_at IS NOT NULL AND expires_at <= :cutoff``), and
an import without expiry wrote an entry per rule that it never reads.

Together, an import of the 120,430-rule IPsum list into PostgreSQL, in-process:
1.69-1.77 s -> 1.31-1.37 s (docs/benchmarks.md).  Compatible with the
previous release: the same tables, columns and index names; a previous
release's writes are checked the same way.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FK_NAME = "fk_provider_fw_rule_sources_rule_id_provider_fw_rules"
EXPIRY_INDEX = "ix_provider_fw_rules_deleted_expires_at"
PARTIAL = ("postgresql", "sqlite")

# (name, table, function body, when and how it fires): each function is its trigger's own, named alike.
TRIGGERS = (
    ("provfw_sources_insert_rule_exists", "provider_fw_rule_sources", """
        IF EXISTS (SELECT 1 FROM provfw_new_sources n
                   WHERE NOT EXISTS (SELECT 1 FROM provider_fw_rules r WHERE r.id = n.rule_id)) THEN
            RAISE foreign_key_violation USING
                MESSAGE = 'insert on provider_fw_rule_sources names a rule that does not exist',
                CONSTRAINT = '%(fk)s', TABLE = 'provider_fw_rule_sources';
        END IF;
        RETURN NULL;""",
     "AFTER INSERT ON %(table)s REFERENCING NEW TABLE AS provfw_new_sources FOR EACH STATEMENT"),
    ("provfw_sources_update_rule_exists", "provider_fw_rule_sources", """
        IF NOT EXISTS (SELECT 1 FROM provider_fw_rules r WHERE r.id = NEW.rule_id) THEN
            RAISE foreign_key_violation USING
                MESSAGE = format('update on provider_fw_rule_sources names rule %%s, which does not exist',
                                 NEW.rule_id),
                CONSTRAINT = '%(fk)s', TABLE = 'provider_fw_rule_sources';
        END IF;
        RETURN NULL;""",
     "AFTER UPDATE OF rule_id ON %(table)s FOR EACH ROW "
     "WHEN (NEW.rule_id IS DISTINCT FROM OLD.rule_id)"),
    ("provfw_rules_delete_cascade_sources", "provider_fw_rules", """
        DELETE FROM provider_fw_rule_sources s USING provfw_gone_rules g WHERE s.rule_id = g.id;
        RETURN NULL;""",
     "AFTER DELETE ON %(table)s REFERENCING OLD TABLE AS provfw_gone_rules FOR EACH STATEMENT"),
    ("provfw_rules_update_id_referenced", "provider_fw_rules", """
        IF EXISTS (SELECT 1 FROM provider_fw_rule_sources s WHERE s.rule_id = OLD.id) THEN
            RAISE foreign_key_violation USING
                MESSAGE = format('rule %%s is still referenced from provider_fw_rule_sources', OLD.id),
                CONSTRAINT = '%(fk)s', TABLE = 'provider_fw_rules';
        END IF;
        RETURN NULL;""",
     "AFTER UPDATE OF id ON %(table)s FOR EACH ROW WHEN (NEW.id IS DISTINCT FROM OLD.id)"),
)


def _expiry_index(partial: bool) -> None:
    if op.get_bind().dialect.name not in PARTIAL:
        return
    where = sa.text("expires_at IS NOT NULL") if partial else None
    op.drop_index(EXPIRY_INDEX, table_name="provider_fw_rules")
    op.create_index(EXPIRY_INDEX, "provider_fw_rules", ["deleted", "expires_at"], postgresql_where=where,
                    sqlite_where=where)


def upgrade() -> None:
    _expiry_index(partial=True)
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_constraint(FK_NAME, "provider_fw_rule_sources", type_="foreignkey")
    for name, table, body, fires in TRIGGERS:
        op.execute(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $provfw$ BEGIN"
                   f"{body % {'fk': FK_NAME}}\n    END $provfw$")
        op.execute(f"CREATE TRIGGER {name} {fires % {'table': table}} EXECUTE FUNCTION {name}()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name, table, _body, _fires in TRIGGERS:
            op.execute(f"DROP TRIGGER {name} ON {table}")
            op.execute(f"DROP FUNCTION {name}()")
        op.create_foreign_key(FK_NAME, "provider_fw_rule_sources", "provider_fw_rules", ["rule_id"], ["id"],
                              ondelete="CASCADE")
    _expiry_index(partial=False)
