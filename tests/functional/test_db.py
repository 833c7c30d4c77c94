"""The db layer on real SQLite, PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306).

Every test runs once per database kind on an empty, migrated database
(``any_db``); the schema tests get a brand-new database migrated from nothing
(``fresh_db``, ``alembic upgrade head``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from provfw import exception
from provfw.db import api as db
from provfw.db import migration
from provfw.db.sqlalchemy import models
from provfw.rules import make_spec

pytestmark = pytest.mark.functional

A = make_spec("203.0.113.5")
B = make_spec("198.51.100.0/24", "tcp", 8080)
C = make_spec("2001:db8::/32", "icmp", 128, 0)
D = make_spec("192.0.2.0/24", "udp", 53)
WHO = db.Audit("admin-token", request_id="req-1", reason="abuse report 42")


def generation() -> int:
    return db.provider_fw_generation_get()


def raw_rules() -> list:
    """Every row of the rules table, live or deleted, straight from the database."""
    with db.get_engine().connect() as conn:
        return list(conn.execute(sa.select(models.ProviderFirewallRule.__table__)
                                 .order_by(models.ProviderFirewallRule.id)).mappings())


def now() -> datetime.datetime:
    return models.utcnow()


# --------------------------------------------------------------------------- schema

KINDS = ["sqlite", "postgresql", "mariadb"]


@pytest.mark.parametrize("fresh_db", KINDS, indirect=True)
def test_migrated_schema_matches_the_models(fresh_db):
    migration.db_check(fresh_db.url)                    # raises on any drift between models and migrations
    assert migration.db_version(fresh_db.url) is not None
    tables = set(sa.inspect(db.get_engine()).get_table_names())
    assert {"provider_fw_rules", "provider_fw_generation", "services", "api_tokens", "audit_log"} <= tables
    assert generation() == 0


def constraint_names(engine) -> dict:
    inspector = sa.inspect(engine)
    names = {}
    for table in models.Base.metadata.tables:
        names[table] = (sorted(c["name"] for c in inspector.get_check_constraints(table)),
                        sorted(c["name"] for c in inspector.get_unique_constraints(table)),
                        sorted(i["name"] for i in inspector.get_indexes(table) if not i.get("unique")))
    return names


@pytest.mark.parametrize("fresh_db", KINDS, indirect=True)
def test_migrated_constraint_names_are_the_models_names(fresh_db):
    # alembic check compares neither CHECK constraints nor their names; a later migration that
    # alters a constraint by its model name must find it under that name on every backend.
    reference = sa.create_engine("sqlite://")
    models.Base.metadata.create_all(reference)
    try:
        assert constraint_names(db.get_engine()) == constraint_names(reference)
    finally:
        reference.dispose()


@pytest.mark.parametrize("fresh_db", KINDS, indirect=True)
def test_upgrade_is_idempotent(fresh_db):
    version = migration.db_version(fresh_db.url)
    migration.db_sync(fresh_db.url)
    assert migration.db_version(fresh_db.url) == version
    migration.db_check(fresh_db.url)


def _index_definitions(engine) -> dict[str, str]:
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            return dict(connection.execute(sa.text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'provider_fw_rules'")).all())
        return dict(connection.execute(sa.text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'provider_fw_rules'")).all())


def _query_plan(engine, where: str) -> str:
    """The plan of ``SELECT id FROM provider_fw_rules WHERE <where>`` (PostgreSQL: sequential scans off)."""
    query = f"SELECT id FROM provider_fw_rules WHERE {where}"
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text("SET enable_seqscan = off"))
            rows = connection.execute(sa.text(f"EXPLAIN {query}"))
        else:
            rows = connection.execute(sa.text(f"EXPLAIN QUERY PLAN {query}"))
        return " ".join(str(row[-1]) for row in rows)


@pytest.mark.parametrize("fresh_db", ["sqlite", "postgresql"], indirect=True)
def test_the_generation_indexes_hold_only_rules_deleted_or_renewed_and_the_deltas_use_them(fresh_db):
    # Migration 0005: NULL (never deleted, never renewed: every rule an import writes) is not indexed, and the
    # deltas' "column > N" still reads the index.  A downgrade gives the previous release's full indexes back.
    from alembic import command

    engine = db.get_engine()
    for column in ("deleted_generation", "updated_generation"):
        name = f"ix_provider_fw_rules_{column}"
        assert f"{column} IS NOT NULL" in _index_definitions(engine)[name]
        assert name in _query_plan(engine, f"{column} > 5")
    command.downgrade(migration.alembic_config(fresh_db.url), "0004")
    assert "IS NOT NULL" not in "".join(_index_definitions(engine)[f"ix_provider_fw_rules_{column}"]
                                        for column in ("deleted_generation", "updated_generation"))
    migration.db_sync(fresh_db.url)
    assert migration.db_version(fresh_db.url) == migration.head_revision()


@pytest.mark.parametrize("fresh_db", ["sqlite", "postgresql"], indirect=True)
def test_the_expiry_index_holds_only_rules_that_expire_and_the_expiry_uses_it(fresh_db):
    # Migration 0006: an import without expiry writes no entry there, and the expiry's query still reads it.
    from alembic import command

    engine = db.get_engine()
    name = "ix_provider_fw_rules_deleted_expires_at"
    assert "expires_at IS NOT NULL" in _index_definitions(engine)[name]
    assert name in _query_plan(engine, "deleted = 0 AND expires_at IS NOT NULL AND expires_at <= '2026-12-02 00:00:00'")
    command.downgrade(migration.alembic_config(fresh_db.url), "0005")
    assert "IS NOT NULL" not in _index_definitions(engine)[name]
    migration.db_sync(fresh_db.url)
    assert "expires_at IS NOT NULL" in _index_definitions(engine)[name]


def _manage(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "provfw-manage"), "--config-file",
                           str(config), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fresh_db", ["sqlite", "postgresql"], indirect=True)
def test_manage_db_check_says_how_far_behind_the_schema_is_and_agrees_once_synced(fresh_db, tmp_path):
    # Against an empty database it used to end in alembic's traceback ("Target database is not up to date"),
    # after a dozen INFO lines of alembic's plugins.
    from alembic import command

    config = tmp_path / "provfw.conf"
    config.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\n[database]\nconnection = {fresh_db.url}\n")
    head = migration.head_revision()
    assert head == migration.db_version(fresh_db.url)
    db.dispose()
    for revision, shown in (("base", "(empty)"), ("0005", "0005")):
        command.downgrade(migration.alembic_config(fresh_db.url), revision)
        behind = _manage(config, "db", "check")
        assert behind.returncode == 1, behind.stderr
        assert (f"provfw-manage: the schema is at {shown}, this release's at {head}: run 'provfw-manage db sync'"
                in behind.stderr)
        assert "Traceback" not in behind.stderr and behind.stdout == ""
        synced = _manage(config, "db", "sync")
        assert synced.returncode == 0 and synced.stdout == f"schema at {head}\n"
    agreed = _manage(config, "db", "check")
    assert agreed.returncode == 0 and agreed.stdout.endswith("models and migrations agree\n")
    assert "alembic.runtime.plugins" not in agreed.stderr and "Detected sequence" not in agreed.stderr


@pytest.mark.parametrize("fresh_db", ["sqlite", "postgresql"], indirect=True)
def test_manage_db_purge_says_what_went_and_refuses_a_date_it_cannot_read(fresh_db, tmp_path):
    config = tmp_path / "provfw.conf"
    config.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\n[database]\nconnection = {fresh_db.url}\n")
    rule, _ = db.provider_fw_rule_create(A, audit=WHO)
    gone = db.provider_fw_rule_destroy(rule.id, audit=WHO).generation
    db.provider_fw_rule_create(B, audit=WHO)              # the newest rule and record, which a purge keeps
    backdate_deletion(rule.id, 40)
    db.dispose()

    nothing = _manage(config, "db", "purge", "--older-than-days", "60")
    assert nothing.returncode == 0, nothing.stderr
    (line,) = nothing.stdout.splitlines()                  # no "snapshot" line when nothing went
    assert line.startswith("purged 0 deleted rule(s) from before ") and line.endswith(" UTC")
    done = _manage(config, "db", "purge", "--older-than-days", "0", "--audit-records")
    assert done.returncode == 0, done.stderr
    summary, snapshot = done.stdout.splitlines()
    assert summary.startswith("purged 1 deleted rule(s) and 2 audit record(s) from before ")
    assert snapshot == f"hosts that applied a generation older than {gone} get a full snapshot on their next check"
    for wrong in (["--before", "last tuesday"], ["--older-than-days", "-3"], ["--older-than-days", "36501"],
                  ["--before", "0001-01-01T00:00:00+05:00"], ["--max-rows", "0", "--older-than-days", "1"],
                  ["--before", "2099-01-01"], ["--before", "2026-01-01", "--older-than-days", "3"], []):
        refused = _manage(config, "db", "purge", *wrong)
        assert refused.returncode == 2 and "usage: provfw-manage db purge [-h]" in refused.stderr, wrong
        assert "Traceback" not in refused.stderr, wrong
    # An operator trial: a --before tomorrow with --audit-records took every audit record, of live rules too.
    assert "provfw-manage db purge: error: argument --before: '2099-01-01' is in the future" in _manage(
        config, "db", "purge", "--before", "2099-01-01", "--audit-records").stderr
    assert "not an ISO 8601 date or date and time in UTC years 1-9999: 'last tuesday'" in _manage(
        config, "db", "purge", "--before", "last tuesday").stderr


def test_manage_says_in_one_line_that_a_database_is_missing_and_creates_none(tmp_path):
    """An operator trial: pointed at the wrong place, `db purge` created an empty SQLite file there and ended in
    80 lines of traceback ('no such table: provider_fw_generation')."""
    config = tmp_path / "provfw.conf"
    state = tmp_path / "nowhere" / "state"
    config.write_text(f"[DEFAULT]\nstate_path = {state}\n")
    for argv in (["db", "purge", "--older-than-days", "30"], ["token", "list"], ["service", "list"]):
        missing = _manage(config, *argv)
        assert (missing.returncode, missing.stdout) == (1, ""), argv
        assert missing.stderr == (f"provfw-manage: no database at {state}/provfw.sqlite (no file): point --config-file "
                                  "at the deployment's configuration, or run 'provfw-manage db sync' to create it\n")
    assert not (tmp_path / "nowhere").exists(), "not even the state directory"
    state.mkdir(parents=True)
    (state / "provfw.sqlite").touch()                   # an empty file stays one (a second trial)
    refused = _manage(config, "token", "list")
    assert refused.returncode == 1 and "provfw.sqlite (an empty file)" in refused.stderr
    assert sorted(path.name for path in state.iterdir()) == ["provfw.sqlite"]
    assert (state / "provfw.sqlite").stat().st_size == 0
    empty = tmp_path / "empty.sqlite"
    with sa.create_engine(f"sqlite:///{empty}").begin() as conn:     # a database, but not provfw's
        conn.exec_driver_sql("CREATE TABLE other (x INTEGER)")
    config.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\n[database]\nconnection = sqlite:///{empty}\n")
    schemaless = _manage(config, "db", "purge", "--older-than-days", "30")
    assert (schemaless.returncode, schemaless.stderr) == (
        1, "provfw-manage: the database has no provfw schema: run 'provfw-manage db sync'\n")


def test_manage_bounds_its_wait_for_a_silent_database_as_the_daemons_do(sqlite_db, tmp_path):
    """provfw-manage installs the daemons' wait callback (provfw.cmd.psycopg_wait) before it opens the database:
    libpq alone would wait for a statement's answer for ever (tests/functional/test_psycopg_wait.py)."""
    config = tmp_path / "provfw.conf"
    config.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\n[database]\nconnection = {sqlite_db.url}\n")
    code = ("import sys; from psycopg2 import extensions; from provfw.cmd import manage; "
            "assert extensions.get_wait_callback() is None; "
            "code = manage.main(sys.argv[1:]); "
            "print(extensions.get_wait_callback().__qualname__); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, "--config-file", str(config), "db", "version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "make_wait.<locals>.wait"


def test_a_new_sqlite_database_file_is_readable_by_its_owner_only(tmp_path):
    # The all-in-one's database holds token hashes and the audit log; it was created 0644 (the umask).
    from provfw.db.sqlalchemy.api import create_engine

    engine = create_engine(f"sqlite:///{tmp_path}/provfw.sqlite")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    finally:
        engine.dispose()
    assert modes == {"provfw.sqlite": 0o600, "provfw.sqlite-wal": 0o600, "provfw.sqlite-shm": 0o600}
    existing = tmp_path / "kept.sqlite"
    existing.touch()
    os.chmod(existing, 0o640)                          # an operator's own choice stays
    engine = create_engine(f"sqlite:///{existing}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    finally:
        engine.dispose()
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640


def _insert_rule(conn, rule_id: int) -> None:
    conn.execute(sa.text(
        "INSERT INTO provider_fw_rules (id, cidr, ip_version, protocol, from_port, to_port, created_at, deleted, "
        "created_generation) VALUES (:id, :cidr, 4, 'all', -1, -1, :t, 0, 1)"),
        {"id": rule_id, "cidr": f"192.0.2.{rule_id}/32", "t": now()})


def _insert_sources(conn, rule_ids) -> None:
    conn.execute(sa.text("INSERT INTO provider_fw_rule_sources (rule_id, source, created_at) "
                         "VALUES (:rule_id, 'manual', :t)"), [{"rule_id": i, "t": now()} for i in rule_ids])


def _source_rule_ids(engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT rule_id FROM provider_fw_rule_sources ORDER BY rule_id")).scalars())


@pytest.mark.parametrize("fresh_db", KINDS, indirect=True)
def test_a_source_row_always_names_a_rule_on_every_database(fresh_db):
    # The foreign key's promises, whichever way the database keeps them: the constraint on MariaDB and SQLite,
    # statement-level triggers on PostgreSQL (migration 0006).  The same errors, the same cascade.
    engine = db.get_engine()
    with engine.begin() as conn:
        for rule_id in (1, 2, 3):
            _insert_rule(conn, rule_id)
        _insert_sources(conn, [1, 2, 3])
    for bad in ([4], [1, 4], [5, 6]):                 # one orphan, an orphan among good rows, only orphans
        with pytest.raises(sa.exc.IntegrityError):
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM provider_fw_rule_sources"))
                _insert_sources(conn, bad)
    assert _source_rule_ids(engine) == [1, 2, 3]      # each failed transaction changed nothing
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE provider_fw_rule_sources SET rule_id = 9 WHERE rule_id = 1"))
    with engine.begin() as conn:                      # rule_id changed to another rule that exists: allowed
        conn.execute(sa.text("DELETE FROM provider_fw_rule_sources WHERE rule_id = 3"))
        conn.execute(sa.text("UPDATE provider_fw_rule_sources SET rule_id = 3 WHERE rule_id = 2"))
    assert _source_rule_ids(engine) == [1, 3]
    with pytest.raises(sa.exc.IntegrityError):        # a referenced rule's id cannot change (ON UPDATE NO ACTION)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE provider_fw_rules SET id = 7 WHERE id = 1"))
    with engine.begin() as conn:                      # an unreferenced one can
        conn.execute(sa.text("UPDATE provider_fw_rules SET id = 8 WHERE id = 2"))
    with engine.begin() as conn:                      # deleting rule rows deletes their sources (ON DELETE CASCADE)
        conn.execute(sa.text("DELETE FROM provider_fw_rules WHERE id IN (1, 8)"))
    assert _source_rule_ids(engine) == [3]


def _pg_triggers(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")).scalars())


@pytest.mark.parametrize("fresh_db", ["postgresql"], indirect=True)
def test_on_postgresql_triggers_replace_the_source_rows_foreign_key_and_a_downgrade_gives_it_back(fresh_db):
    from alembic import command

    from provfw.db.sqlalchemy import models

    engine = db.get_engine()
    fk = "fk_provider_fw_rule_sources_rule_id_provider_fw_rules"
    assert models.TRIGGERED_FOREIGN_KEYS["postgresql"] == {fk}
    inspector = sa.inspect(engine)
    assert inspector.get_foreign_keys("provider_fw_rule_sources") == []
    assert _pg_triggers(engine) == {"provfw_sources_insert_rule_exists", "provfw_sources_update_rule_exists",
                                    "provfw_rules_delete_cascade_sources", "provfw_rules_update_id_referenced"}
    with pytest.raises(sa.exc.IntegrityError) as refused:
        with engine.begin() as conn:
            _insert_sources(conn, [42])
    assert refused.value.orig.pgcode == "23503"       # foreign_key_violation, as the constraint raised
    assert refused.value.orig.diag.constraint_name == fk
    command.downgrade(migration.alembic_config(fresh_db.url), "0005")
    keys = sa.inspect(engine).get_foreign_keys("provider_fw_rule_sources")
    assert [(k["name"], k["options"].get("ondelete")) for k in keys] == [(fk, "CASCADE")]
    assert _pg_triggers(engine) == set()
    migration.db_sync(fresh_db.url)
    migration.db_check(fresh_db.url)
    assert sa.inspect(engine).get_foreign_keys("provider_fw_rule_sources") == []


# --------------------------------------------------------------------------- CRUD

def test_create_get_list_and_delete(any_db):
    rule, gen = db.provider_fw_rule_create(C, description="ICMPv6 echo flood", created_by="ops")
    assert (rule.cidr, rule.ip_version, rule.protocol, rule.from_port, rule.to_port) == ("2001:db8::/32", 6,
                                                                                         "icmp", 128, 0)
    assert rule.created_generation == gen and rule.deleted == 0
    fetched = db.provider_fw_rule_get(rule.id)
    assert (fetched.description, fetched.created_by) == ("ICMPv6 echo flood", "ops")
    assert [r.id for r in db.provider_fw_rule_get_all()] == [rule.id]
    assert [r.id for r in db.provider_fw_rule_get_all_by_cidr("2001:db8::/32")] == [rule.id]
    assert db.provider_fw_rule_count() == 1
    db.provider_fw_rule_destroy(rule.id)
    with pytest.raises(exception.RuleNotFound):
        db.provider_fw_rule_get(rule.id)
    with pytest.raises(exception.RuleNotFound):
        db.provider_fw_rule_destroy(rule.id)
    assert db.provider_fw_rule_get_all() == [] and db.provider_fw_rule_count() == 0


def test_destroy_by_cidr_removes_every_rule_of_that_cidr(any_db):
    for spec in (make_spec("203.0.113.5", "tcp"), make_spec("203.0.113.5", "udp"), make_spec("203.0.113.5", "icmp"),
                 B):
        db.provider_fw_rule_create(spec)
    assert db.provider_fw_distinct_cidrs() == [("198.51.100.0/24", 1), ("203.0.113.5/32", 3)]
    changes = db.provider_fw_rule_destroy_by_cidr("203.0.113.5/32")
    assert len(changes.removed) == 3 and changes.generation == generation()
    assert [r.cidr for r in db.provider_fw_rule_get_all()] == ["198.51.100.0/24"]
    with pytest.raises(exception.NotFound):
        db.provider_fw_rule_destroy_by_cidr("203.0.113.5/32")


def test_soft_delete_keeps_the_row_and_allows_the_same_rule_again(any_db):
    rule, created = db.provider_fw_rule_create(A)
    deleted_gen = db.provider_fw_rule_destroy(rule.id, audit=WHO).generation
    (row,) = raw_rules()
    assert row["id"] == rule.id and row["deleted"] == rule.id
    assert row["deleted_at"] is not None and row["deleted_generation"] == deleted_gen == created + 1
    assert row["deleted_by"] == "admin-token"
    again, _ = db.provider_fw_rule_create(A)
    assert again.id != rule.id
    again_gen = db.provider_fw_rule_destroy(again.id).generation
    third, _ = db.provider_fw_rule_create(A)               # any number of deleted copies may exist
    rows = raw_rules()
    assert [(r["id"], r["deleted"]) for r in rows] == [(rule.id, rule.id), (again.id, again.id), (third.id, 0)]
    assert rows[1]["deleted_generation"] == again_gen


def test_duplicate_live_rule_is_refused(any_db):
    db.provider_fw_rule_create(B)
    before = generation()
    with pytest.raises(exception.DuplicateRule) as info:
        db.provider_fw_rule_create(make_spec("198.51.100.77/24", "TCP", "8080"))
    assert info.value.code == 409 and "198.51.100.0/24" in str(info.value)
    assert generation() == before


def test_database_refuses_a_second_live_copy_even_behind_the_api(any_db):
    # The unique constraint is the last guard; it must hold on every backend.
    db.provider_fw_rule_create(A)
    row = dict(cidr=A.cidr, ip_version=4, protocol=A.protocol, from_port=A.from_port, to_port=A.to_port,
               created_at=now(), created_generation=99, deleted=0)
    with pytest.raises(sa.exc.IntegrityError):
        with db.get_engine().begin() as conn:
            conn.execute(sa.insert(models.ProviderFirewallRule.__table__).values(**row))


@pytest.mark.parametrize("values", [
    dict(protocol="sctp"), dict(from_port=70000), dict(to_port=-2), dict(ip_version=5),
])
def test_check_constraints_refuse_impossible_rows(any_db, values):
    row = dict(cidr=A.cidr, ip_version=4, protocol="tcp", from_port=1, to_port=2, created_at=now(),
               created_generation=1, deleted=0)
    row.update(values)
    # PyMySQL reports MariaDB's CHECK failure (errno 4025) as OperationalError, the others as IntegrityError.
    with pytest.raises((sa.exc.IntegrityError, sa.exc.OperationalError), match="ck_provider_fw_rules_"):
        with db.get_engine().begin() as conn:
            conn.execute(sa.insert(models.ProviderFirewallRule.__table__).values(**row))


# --------------------------------------------------------------------------- generation

def test_generation_bumps_exactly_once_per_mutation_and_never_for_a_failed_one(any_db):
    steps = []

    def step(name, func, bump):
        before = generation()
        try:
            func()
        except exception.ProvfwError:
            pass
        steps.append((name, generation() - before, bump))

    rule_a = []
    step("create", lambda: rule_a.append(db.provider_fw_rule_create(A)[0]), 1)
    step("duplicate create", lambda: db.provider_fw_rule_create(A), 0)
    step("create_many of 3", lambda: db.provider_fw_rules_create_many([B, C, D]), 1)
    step("create_many of duplicates", lambda: db.provider_fw_rules_create_many([B, C]), 0)
    step("create over the limit", lambda: db.provider_fw_rule_create(make_spec("192.0.2.9"), max_rules=4), 0)
    step("destroy", lambda: db.provider_fw_rule_destroy(rule_a[0].id), 1)
    step("destroy of a deleted rule", lambda: db.provider_fw_rule_destroy(rule_a[0].id), 0)
    step("destroy of a missing id", lambda: db.provider_fw_rule_destroy(987654), 0)
    step("destroy_by_cidr", lambda: db.provider_fw_rule_destroy_by_cidr(B.cidr), 1)
    step("destroy_by_cidr of nothing", lambda: db.provider_fw_rule_destroy_by_cidr(B.cidr), 0)
    step("purge with nothing expired", lambda: db.provider_fw_rule_purge_expired(), 0)
    step("service heartbeat", lambda: db.service_update("hv1", heartbeat=True), 0)
    assert [(name, got) for name, got, _ in steps] == [(name, want) for name, _, want in steps]


def test_rule_limit_is_enforced(any_db):
    db.provider_fw_rules_create_many([A, B])
    with pytest.raises(exception.RuleLimitExceeded) as info:
        db.provider_fw_rules_create_many([C, D], max_rules=3)
    assert "max_rules" in str(info.value)
    assert db.provider_fw_rule_count() == 2


def test_changes_since_returns_what_was_added_and_removed(any_db):
    g0 = generation()
    rule_a, g1 = db.provider_fw_rule_create(A)
    _, g2 = db.provider_fw_rule_create(B)
    g3 = db.provider_fw_rule_destroy(rule_a.id).generation
    rule_c, g4 = db.provider_fw_rule_create(C)
    g5 = db.provider_fw_rule_destroy(rule_c.id).generation   # created and deleted after g3

    def summary(since):
        changes = db.provider_fw_changes_since(since)
        return changes.generation, sorted(r.spec for r in changes.added), sorted(r.spec for r in changes.removed)

    assert summary(g0) == (g5, [B], [])                      # A and C came and went: neither
    assert summary(g1) == (g5, [B], [A])
    assert summary(g2) == (g5, [], [A])
    assert summary(g3) == (g5, [], [])
    assert summary(g4) == (g5, [], [C])
    assert summary(g5) == (g5, [], [])


def test_changes_since_carries_expiry(any_db):
    expires = (now() + datetime.timedelta(hours=1)).replace(microsecond=0)
    db.provider_fw_rule_create(A, expires_at=expires)
    (added,) = db.provider_fw_changes_since(0).added
    assert (added.spec, added.expires_at) == (A, expires.replace(tzinfo=datetime.timezone.utc).timestamp())


def test_snapshot_has_live_unexpired_rules_at_one_generation(any_db):
    db.provider_fw_rule_create(A)
    db.provider_fw_rule_create(B, expires_at=now() - datetime.timedelta(seconds=1))
    rule_c, _ = db.provider_fw_rule_create(C)
    db.provider_fw_rule_destroy(rule_c.id)
    snapshot = db.provider_fw_snapshot()
    assert snapshot.generation == generation()
    assert [rule.spec for rule in snapshot.rules] == [A]


def test_the_snapshots_wire_form_is_its_rules_to_wire_and_serialises(any_db):
    """What the conductor sends (read without Rule objects) is exactly the snapshot's rules in wire form."""
    expires = (now() + datetime.timedelta(hours=1)).replace(microsecond=0)
    db.provider_fw_rule_create(A)
    db.provider_fw_rule_create(B, expires_at=expires)
    db.provider_fw_rule_create(C, expires_at=now() - datetime.timedelta(seconds=1))
    snapshot = db.provider_fw_snapshot()
    wire_generation, wire = db.provider_fw_snapshot_wire()
    assert wire_generation == snapshot.generation == generation()
    assert sorted(map(list, wire)) == sorted(rule.to_wire() for rule in snapshot.rules)
    assert [rule[5] for rule in sorted(wire)] == [None, expires.replace(tzinfo=datetime.timezone.utc).timestamp()]
    assert json.loads(json.dumps(wire)) == [list(rule) for rule in wire]


def test_purge_soft_deletes_expired_rules_in_one_generation(any_db):
    past = now() - datetime.timedelta(minutes=1)
    db.provider_fw_rule_create(A, expires_at=past)
    db.provider_fw_rule_create(B, expires_at=past)
    db.provider_fw_rule_create(C, expires_at=now() + datetime.timedelta(hours=1))
    before = generation()
    changes = db.provider_fw_rule_purge_expired()
    assert (len(changes.removed), changes.generation) == (2, before + 1)
    assert sorted(r.spec for r in db.provider_fw_changes_since(before).removed) == sorted([A, B])
    assert [r.cidr for r in db.provider_fw_rule_get_all()] == [C.cidr]


def backdate_deletion(rule_id: int, days: float) -> None:
    """Make rule ``rule_id``'s deletion ``days`` old, as if it had been deleted then."""
    with db.get_engine().begin() as conn:
        conn.execute(sa.update(models.ProviderFirewallRule.__table__)
                     .where(models.ProviderFirewallRule.id == rule_id)
                     .values(deleted_at=now() - datetime.timedelta(days=days)))


def purged_generation() -> int:
    with db.get_engine().connect() as conn:
        return conn.execute(sa.select(models.FirewallGeneration.purged_generation)).scalar_one()


def test_db_purge_deletes_only_the_rows_of_rules_deleted_before_the_date(any_db):
    """`provfw-manage db purge`: the rows of long-deleted rules go; live rules and recent deletions stay."""
    old, _ = db.provider_fw_rule_create(A)
    recent, _ = db.provider_fw_rule_create(B)
    live, _ = db.provider_fw_rule_create(C)
    old_gone = db.provider_fw_rule_destroy(old.id).generation
    db.provider_fw_rule_destroy(recent.id)
    backdate_deletion(old.id, 10)
    assert purged_generation() == 0
    moved = generation()

    result = db.provider_fw_purge_deleted(now() - datetime.timedelta(days=1), audit=WHO)

    assert (result.rules, result.audit_records, result.purged_generation) == (1, 0, old_gone)
    assert [(row["id"], row["deleted"] != 0) for row in raw_rules()] == [(recent.id, True), (live.id, False)]
    assert purged_generation() == old_gone
    assert generation() == moved, "hosts enforce the same rules: no generation moves"
    with db.get_engine().connect() as conn:
        assert conn.execute(sa.select(models.ProviderFirewallRuleSource.rule_id)).scalars().all() == [live.id]
    (record,) = [r for r in db.audit_get_all() if r.action == "db.purge"]
    assert (record.actor, json.loads(record.detail)["count"]) == (WHO.actor, 1)
    again = db.provider_fw_purge_deleted(now() - datetime.timedelta(days=1))
    assert (again.rules, again.purged_generation) == (0, old_gone)


def test_a_delta_that_would_need_purged_rows_is_refused_and_a_later_one_is_whole(any_db):
    """A host behind the purge must not be told "nothing was removed": the delta is None (a snapshot's job)."""
    g0 = generation()
    rule_a, g1 = db.provider_fw_rule_create(A)
    rule_b, g2 = db.provider_fw_rule_create(B)
    g3 = db.provider_fw_rule_destroy(rule_a.id).generation
    g4 = db.provider_fw_rule_destroy(rule_b.id).generation
    backdate_deletion(rule_a.id, 2)

    assert db.provider_fw_purge_deleted(now() - datetime.timedelta(days=1)).purged_generation == g3

    for since in (g0, g1, g2):
        assert db.provider_fw_changes_count_since(since) is None
        assert db.provider_fw_changes_since(since) is None
    changes = db.provider_fw_changes_since(g3)
    assert (changes.generation, changes.added, [r.spec for r in changes.removed]) == (g4, [], [B])
    assert db.provider_fw_changes_count_since(g3) == 1
    assert db.provider_fw_changes_since(g4).removed == []


def test_db_purge_goes_in_batches_stops_at_max_rows_and_takes_old_audit_records(any_db):
    from provfw.db.sqlalchemy import api as impl

    specs = [make_spec(f"192.0.2.{i}") for i in range(1, 8)]
    created = db.provider_fw_rules_create_many(specs, audit=WHO).added
    for rule in created:
        db.provider_fw_rule_destroy(rule.id, audit=WHO)
        backdate_deletion(rule.id, 3)
    with db.get_engine().begin() as conn:
        conn.execute(sa.update(models.AuditRecord.__table__).values(created_at=now() - datetime.timedelta(days=3)))
    records = len(db.audit_get_all(limit=1000))
    cutoff = now() - datetime.timedelta(days=1)

    first = impl.provider_fw_purge_deleted(cutoff, batch=2, max_rows=3)
    assert (first.rules, first.audit_records) == (3, 0)
    rest = impl.provider_fw_purge_deleted(cutoff, audit_records=True, batch=2, audit=WHO)
    # The newest row of each table stays: SQLite would hand its id out again (found by an operator trial).
    assert (rest.rules, rest.audit_records) == (3, records - 1)
    assert [row["id"] for row in raw_rules()] == [created[-1].id]
    assert rest.purged_generation == generation() - 1    # the last destroy but one's
    own, kept = db.audit_get_all()                      # newest first: the purge's own, then the newest it kept
    assert (own.action, json.loads(own.detail)["audit_records"]) == ("db.purge", records - 1)
    assert kept.action == "rule.delete" and own.id > kept.id
    rule, _ = db.provider_fw_rule_create(A)
    assert rule.id > created[-1].id, "no purged id is handed out again"


def test_expired_live_copy_is_replaced_by_a_new_create(any_db):
    old, _ = db.provider_fw_rule_create(A, expires_at=now() - datetime.timedelta(seconds=1))
    new, gen = db.provider_fw_rule_create(A)
    assert new.id != old.id
    assert [r.id for r in db.provider_fw_rule_get_all()] == [new.id]
    assert [r.spec for r in db.provider_fw_changes_since(gen - 1).removed] == [A]


def test_an_expired_rule_is_out_of_every_read_and_delete_before_the_purge_retires_it(any_db):
    expired, _ = db.provider_fw_rule_create(A, expires_at=now() - datetime.timedelta(seconds=1))
    db.provider_fw_rule_create(make_spec("203.0.113.5", "tcp"), expires_at=now() - datetime.timedelta(seconds=1))
    live, _ = db.provider_fw_rule_create(B, expires_at=now() + datetime.timedelta(hours=1))
    assert [r.id for r in db.provider_fw_rule_get_all()] == [live.id]
    assert db.provider_fw_rule_get_all_by_cidr(A.cidr) == []
    assert db.provider_fw_distinct_cidrs() == [(B.cidr, 1)]
    with pytest.raises(exception.RuleNotFound):
        db.provider_fw_rule_get(expired.id)
    before = generation()
    with pytest.raises(exception.RuleNotFound):
        db.provider_fw_rule_destroy(expired.id)
    with pytest.raises(exception.NotFound):
        db.provider_fw_rule_destroy_by_cidr(A.cidr)
    assert generation() == before                        # nothing changed
    assert len(db.provider_fw_rule_purge_expired().removed) == 2   # the purge still retires both rows


@pytest.mark.parametrize("rule_id", [0, -1, 2**63, 10**23, True])
def test_an_id_no_row_can_have_is_not_found_on_every_database(any_db, rule_id):
    # SQLite raised OverflowError binding 10**23; PostgreSQL and MariaDB found nothing.
    with pytest.raises(exception.RuleNotFound):
        db.provider_fw_rule_get(rule_id)
    with pytest.raises(exception.RuleNotFound):
        db.provider_fw_rule_destroy(rule_id)
    assert db.provider_fw_rule_get_all(marker=10**23) == []


# --------------------------------------------------------------------------- concurrency

def test_twenty_concurrent_identical_creates_make_exactly_one_rule(any_db):
    before = generation()
    barrier = threading.Barrier(20)
    outcomes: list = []
    lock = threading.Lock()

    def create():
        barrier.wait()
        try:
            db.provider_fw_rule_create(B, audit=WHO)
            outcome = "created"
        except exception.DuplicateRule:
            outcome = "duplicate"
        except Exception as exc:  # noqa: BLE001 - any other error is a failure, reported below
            outcome = f"{type(exc).__name__}: {exc}"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["created"] + ["duplicate"] * 19
    assert db.provider_fw_rule_count() == 1
    assert len([r for r in raw_rules() if r["cidr"] == B.cidr]) == 1
    assert generation() == before + 1
    assert [a.action for a in db.audit_get_all()] == ["rule.create"]


def test_concurrent_different_creates_all_succeed_with_distinct_generations(any_db):
    specs = [make_spec(f"192.0.2.{i}") for i in range(1, 11)]
    barrier = threading.Barrier(len(specs))
    generations: list = []

    def create(spec):
        barrier.wait()
        generations.append(db.provider_fw_rule_create(spec)[1])

    threads = [threading.Thread(target=create, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(generations) == list(range(1, 11))
    assert db.provider_fw_rule_count() == 10


# --------------------------------------------------------------------------- bulk and pagination

def test_create_many_dedupes_against_live_rules_and_itself(any_db):
    db.provider_fw_rule_create(A)
    before = generation()
    result = db.provider_fw_rules_create_many([A, B, B, C, make_spec("198.51.100.9/24", "tcp", 8080)], audit=WHO)
    assert result.generation == before + 1
    assert sorted((r.cidr, r.protocol) for r in result.added) == sorted([(B.cidr, "tcp"), (C.cidr, "icmp")])
    assert result.duplicates == [A]
    assert all(r.created_generation == result.generation for r in result.added)
    assert db.provider_fw_rule_count() == 3
    assert json.loads(db.audit_get_all(1)[0].detail)["duplicates"] == 3


def test_create_many_large_import_uses_one_generation(any_db):
    specs = [make_spec(f"10.{i // 250}.{i % 250}.1") for i in range(2500)]
    result = db.provider_fw_rules_create_many(specs)
    assert result.generation == 1
    rows = raw_rules()
    assert len(rows) == 2500 and {r["created_generation"] for r in rows} == {1}
    assert db.provider_fw_rule_count() == 2500
    assert len(db.provider_fw_changes_since(0).added) == 2500


def test_pagination_with_limit_and_marker_visits_every_rule_once(any_db):
    specs = [make_spec(f"192.0.2.{i}", "tcp" if i % 2 else "udp", 22) for i in range(1, 8)]
    ids = [db.provider_fw_rule_create(s)[0].id for s in specs]
    db.provider_fw_rule_destroy(ids[3])
    live = ids[:3] + ids[4:]
    pages, marker = [], None
    while True:
        page = db.provider_fw_rule_get_all(limit=3, marker=marker)
        if not page:
            break
        pages.append([r.id for r in page])
        marker = page[-1].id
    assert pages == [live[:3], live[3:6]] and sum(pages, []) == live
    assert [r.protocol for r in db.provider_fw_rule_get_all(protocol="udp")] == ["udp"] * 2
    assert [r.id for r in db.provider_fw_rule_get_all(cidr="192.0.2.5/32")] == [ids[4]]


# --------------------------------------------------------------------------- services

def test_service_update_upserts_one_row_per_host(any_db):
    db.service_update("hv1", driver="libvirt/iptables", heartbeat=True)
    first = db.service_get("hv1")
    assert first.heartbeat_at is not None and first.applied_generation == -1
    db.service_update("hv1", applied_generation=7, rule_count=3, last_error=None)
    db.service_update("hv2", last_error="boom")
    rows = db.service_get_all()
    assert [r.host for r in rows] == ["hv1", "hv2"]
    assert (rows[0].applied_generation, rows[0].rule_count, rows[0].driver) == (7, 3, "libvirt/iptables")
    assert rows[1].last_error == "boom"
    with pytest.raises(TypeError):
        db.service_update("hv1", hostname="x")
    assert db.service_destroy("hv2") is True and db.service_destroy("hv2") is False
    assert db.service_get("hv2") is None


def test_concurrent_first_heartbeats_of_one_host_make_one_row(any_db):
    barrier = threading.Barrier(5)
    errors = []

    def beat():
        barrier.wait()
        try:
            db.service_update("hv-race", heartbeat=True)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=beat) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(db.service_get_all()) == 1


def _report(generation: int, error: str | None = None, applied_at=None) -> dict:
    return {"driver": "libvirt/ipset", "heartbeat_at": models.utcnow(), "applied_generation": generation,
            "applied_at": applied_at, "rule_count": generation, "last_error": error, "quarantine": None,
            "bus_user": "provfw-compute-x"}


def test_batched_state_reports_update_old_hosts_insert_new_ones_and_keep_each_null(any_db):
    when = datetime.datetime(2026, 11, 30, 12, 0, 0)
    assert db.service_update_many({f"hv-{i:03d}": _report(1) for i in range(30)}) == 30

    written = db.service_update_many({f"hv-{i:03d}": _report(2, "refused" if i % 2 else None,
                                                             when if i % 3 else None) for i in range(20, 40)})

    rows = {row.host: row for row in db.service_get_all()}
    assert written == 20 and len(rows) == 40
    assert rows["hv-000"].applied_generation == 1 and rows["hv-000"].updated_at is None
    assert [(rows[h].applied_generation, rows[h].last_error, rows[h].applied_at)
            for h in ("hv-021", "hv-022", "hv-024")] == [(2, "refused", None), (2, None, when), (2, None, None)]
    assert rows["hv-021"].updated_at is not None


def test_state_reports_of_fifteen_hundred_hosts_cost_as_many_statements_as_ten_on_postgresql(pg_db):
    def statements(count: int, generation: int) -> int:
        before = db.statement_counts()["statements"]
        db.service_update_many({f"hv-{i:04d}": _report(generation) for i in range(count)})
        return db.statement_counts()["statements"] - before

    statements(1500, 1)                               # every row exists from now on

    assert statements(10, 2) == 1                     # one UPDATE ... FROM unnest(...) RETURNING host
    assert statements(1500, 3) == 1                   # the same one for 1,500 hosts
    assert statements(1501, 4) == 2                   # and one INSERT for the new host
    rows = db.service_get_all()
    assert len(rows) == 1501 and {row.applied_generation for row in rows} == {4}
    assert {row.host: row.updated_at is None for row in rows if row.host in ("hv-0000", "hv-1500")} == \
        {"hv-0000": False, "hv-1500": True}


# --------------------------------------------------------------------------- tokens

def test_token_is_stored_only_as_its_hash(any_db):
    secret = db.api_token_create("ops", "admin")
    with db.get_engine().connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(models.ApiToken.__table__)).mappings()]
    assert len(rows) == 1
    assert rows[0]["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert all(secret not in str(value) for value in rows[0].values())
    assert db.api_token_get_by_secret(secret).name == "ops"
    assert db.api_token_get_by_secret(secret + "x") is None
    with pytest.raises(exception.Conflict):
        db.api_token_create("ops", "reader")
    with pytest.raises(exception.InvalidInput) as info:
        db.api_token_create("x", "root")
    assert info.value.field == "role"
    db.api_token_revoke("ops")
    assert db.api_token_get_by_secret(secret) is None
    with pytest.raises(exception.NotFound):
        db.api_token_revoke("ops")


# --------------------------------------------------------------------------- audit

def test_each_mutation_writes_one_audit_row_with_its_generation(any_db):
    rule, gen_create = db.provider_fw_rule_create(A, audit=WHO)
    gen_delete = db.provider_fw_rule_destroy(rule.id, audit=db.Audit("second", reason="expired ticket")).generation
    with pytest.raises(exception.RuleNotFound):
        db.provider_fw_rule_destroy(rule.id, audit=WHO)                 # failed: no audit row
    db.provider_fw_rule_create(B, audit=WHO)
    with pytest.raises(exception.DuplicateRule):
        db.provider_fw_rule_create(B, audit=WHO)                         # refused: no audit row
    records = list(reversed(db.audit_get_all()))
    assert [(r.actor, r.action, r.generation) for r in records] == [
        ("admin-token", "rule.create", gen_create), ("second", "rule.delete", gen_delete),
        ("admin-token", "rule.create", gen_delete + 1)]
    detail = json.loads(records[0].detail)
    assert detail["reason"] == "abuse report 42" and detail["rules"][0]["cidr"] == A.cidr
    assert records[0].request_id == "req-1"


def test_audit_row_is_written_in_the_same_transaction_as_the_mutation(any_db):
    """Watch the SQL on each connection: the generation bump, the rule insert and the audit
    insert must sit between one BEGIN and one COMMIT."""
    engine = db.get_engine()
    events: list[tuple[int, str]] = []

    def on_begin(conn):
        events.append((id(conn.connection.dbapi_connection), "BEGIN"))

    def on_commit(conn):
        events.append((id(conn.connection.dbapi_connection), "COMMIT"))

    def on_execute(conn, cursor, statement, *args):
        # PostgreSQL: a group commit's BEGIN and COMMIT ride on its first and last statements
        # (db_impl._riding_transaction); SQLAlchemy's begin and commit events still frame them.
        statement = statement.removeprefix("BEGIN; ")
        verb = statement.split()[0].upper()
        if verb == "WITH" and "INSERT INTO" in statement:
            verb = "INSERT"       # PostgreSQL: new rules and their source rows in one data-modifying CTE
        events.append((id(conn.connection.dbapi_connection), verb + " " + (
            "audit_log" if "audit_log" in statement else "provider_fw_generation"
            if "provider_fw_generation" in statement else "provider_fw_rules" if "provider_fw_rules" in statement
            else "other")))

    sa.event.listen(engine, "begin", on_begin)
    sa.event.listen(engine, "commit", on_commit)
    sa.event.listen(engine, "before_cursor_execute", on_execute)
    try:
        rule, _ = db.provider_fw_rule_create(A, audit=WHO)
        db.provider_fw_rule_destroy(rule.id, audit=WHO)
    finally:
        sa.event.remove(engine, "begin", on_begin)
        sa.event.remove(engine, "commit", on_commit)
        sa.event.remove(engine, "before_cursor_execute", on_execute)

    transactions, current = [], {}
    for conn, what in events:
        if what == "BEGIN":
            current[conn] = []
        elif what == "COMMIT":
            transactions.append(current.pop(conn))
        elif conn in current:
            current[conn].append(what)
    writes = [t for t in transactions if any(s.startswith(("INSERT", "UPDATE")) for s in t)]
    assert len(writes) == 2, transactions
    create, delete = writes
    assert {"UPDATE provider_fw_generation", "INSERT provider_fw_rules", "INSERT audit_log"} <= set(create)
    assert {"UPDATE provider_fw_generation", "UPDATE provider_fw_rules", "INSERT audit_log"} <= set(delete)


def test_mutation_whose_audit_row_cannot_be_written_is_rolled_back(any_db):
    if any_db.kind == "sqlite":
        pytest.skip("SQLite does not enforce VARCHAR lengths, so this audit row cannot fail there")
    before = generation()
    with pytest.raises(sa.exc.DBAPIError):
        db.provider_fw_rule_create(A, audit=db.Audit("x" * 300))     # actor is VARCHAR(255)
    assert generation() == before
    assert db.provider_fw_rule_count() == 0 and raw_rules() == []
    assert db.audit_get_all() == []
