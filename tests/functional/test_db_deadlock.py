"""Real deadlocks on PostgreSQL and MariaDB: a provfw mutation that loses one is run again and succeeds.

Two connections lock two rows in opposite order: another client holds a
rule row and then asks for the generation row, while provfw's deletion holds
the generation row (its first statement) and then asks for the rule.  The
server breaks the cycle by rolling back one transaction; each test arranges
for the victim to be provfw's (PostgreSQL: the other client's
``deadlock_timeout`` is long, so provfw's backend runs the deadlock check
first; MariaDB: the other client has written more rows, and InnoDB rolls
back the smaller transaction).  The deletion must then succeed on its retry.
"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from provfw import metrics
from provfw.db import api as db
from provfw.db.sqlalchemy import api as db_impl
from provfw.rules import make_spec
from tests.conftest import _empty

pytestmark = pytest.mark.functional


@pytest.fixture(params=["postgresql", "mariadb"])
def server_db(request, _session_databases):
    yield _empty(_session_databases, request.param)


def deadlocks(operation: str) -> float:
    return metrics.CONTROL.get_sample_value("provfw_db_deadlocks_total", {"operation": operation}) or 0.0


def lock_waiters(monitor: sa.Connection, kind: str) -> int:
    """Sessions of this database blocked in the deletion's UPDATE of the rule (each look in its own transaction)."""
    if kind == "postgresql":
        query = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE provider_fw_rules%'")
    else:
        # innodb_trx is server-wide and cached; the process list says what each session of ours is executing.
        query = ("SELECT count(*) FROM information_schema.processlist WHERE db = DATABASE() "
                 "AND info LIKE 'UPDATE provider_fw_rules%' AND time >= 0")
    try:
        return monitor.execute(sa.text(query)).scalar_one()
    finally:
        monitor.rollback()


def test_a_deletion_that_loses_a_deadlock_is_run_again_and_succeeds(server_db):
    rule, created_at = db.provider_fw_rule_create(make_spec("203.0.113.7"))
    other = sa.create_engine(server_db.url, poolclass=sa.pool.NullPool)
    before = deadlocks("provider_fw_rule_destroy")
    outcome: dict = {}

    def delete() -> None:
        try:
            outcome["changes"] = db.provider_fw_rule_destroy(rule.id, audit=db.Audit("deadlock-test"))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    deleter = threading.Thread(target=delete)
    with other.connect() as holder, other.connect() as monitor:
        transaction = holder.begin()
        if server_db.kind == "postgresql":
            holder.exec_driver_sql("SET LOCAL deadlock_timeout = '20s'")
        else:
            # Heavier than provfw's transaction, so InnoDB rolls provfw's back.
            holder.execute(sa.insert(db_impl.AuditRecord.__table__),
                           [{"actor": "weight", "action": "test", "detail": "{}"} for _ in range(50)])
        holder.execute(sa.update(db_impl.ProviderFirewallRule.__table__)
                       .where(db_impl.ProviderFirewallRule.id == rule.id).values(description="held"))
        deleter.start()
        deadline = time.monotonic() + 15
        while lock_waiters(monitor, server_db.kind) == 0:
            assert time.monotonic() < deadline and deleter.is_alive(), f"the deletion never waited: {outcome}"
            time.sleep(0.02)
        # Close the cycle: we hold the rule and want the generation row the deletion holds.
        holder.execute(sa.update(db_impl.FirewallGeneration.__table__)
                       .where(db_impl.FirewallGeneration.id == 1)
                       .values(generation=db_impl.FirewallGeneration.generation + 1))
        transaction.commit()
    deleter.join(30)
    other.dispose()

    assert "error" not in outcome, outcome.get("error")
    assert [removed.id for removed in outcome["changes"].removed] == [rule.id]
    assert deadlocks("provider_fw_rule_destroy") == before + 1
    assert db.provider_fw_rule_get_all() == []
    # Our generation bump and the other client's, each once: the rolled-back attempt left nothing.
    assert db.provider_fw_generation_get() == created_at + 2
    assert outcome["changes"].generation == created_at + 2
    assert [r.action for r in db.audit_get_all() if r.actor == "deadlock-test"] == ["rule.delete"]


def test_deadlock_codes_are_told_by_type_and_code_not_by_text():
    class PgError(Exception):
        pgcode = "40P01"

    class Serialisation(Exception):
        pgcode = "40001"

    class UniqueViolation(Exception):
        pgcode = "23505"

    def wrapped(orig):
        return sa.exc.OperationalError("statement", {}, orig)

    assert db_impl.is_deadlock(wrapped(PgError("whatever the server said")))
    assert db_impl.is_deadlock(wrapped(Serialisation("x")))
    assert not db_impl.is_deadlock(wrapped(UniqueViolation("deadlock detected")))       # text is ignored
    assert db_impl.is_deadlock(wrapped(Exception(1213, "Deadlock found when trying to get lock")))
    assert db_impl.is_deadlock(wrapped(Exception(1205, "Lock wait timeout exceeded")))
    assert not db_impl.is_deadlock(wrapped(Exception(1062, "Duplicate entry; Deadlock found")))
    assert not db_impl.is_deadlock(wrapped(Exception("Deadlock found when trying to get lock")))
    assert not db_impl.is_deadlock(ValueError(1213))
