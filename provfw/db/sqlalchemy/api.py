"""SQLAlchemy implementation of the db API.  Use it only through ``provfw.db.api``.

Design: every rule mutation runs in one transaction that first bumps the single
generation row.  That UPDATE takes a row lock on PostgreSQL and MariaDB (and
SQLite transactions start with BEGIN IMMEDIATE), so mutations are serialised,
generations are assigned in commit order, and a worker asking for the changes
since generation N can never miss one.  The unique constraint on
(cidr, protocol, from_port, to_port, deleted) is the final guard against two
live copies of one rule.

Every mutation runs whole inside ``_retry_on_deadlock``: a transaction that
loses a lock race - MariaDB/Galera error 1213 (deadlock, also Galera's
certification failure) or 1205 (lock wait timeout), PostgreSQL SQLSTATE
40001 (serialisation failure) or 40P01 (deadlock detected) - was rolled back
by the server, so it is run again from its first statement (oslo.db's
``wrap_db_retry`` policy), up to ``DEADLOCK_ATTEMPTS`` times with jittered
backoff; then ``DBDeadlock`` (503).  Errors are told by code, never by text.
Audit lines reach the ``provfw.audit`` logger only after their transaction
committed, so a retried or rolled-back change is never logged as made.
How long each transaction waited for the generation row lock and held it
goes to ``provfw_db_generation_lock_wait_seconds`` and ``..._held_seconds``
(``_generation_locked``, ``_generation_released``): the held sum's rate is
the share of time mutations were serialised behind this process.

Thread-safety: the engine and sessionmaker are process-wide and thread-safe;
each function opens its own session.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime
import functools
import hashlib
import io
import ipaddress
import itertools
import json
import logging
import operator
import os
import secrets
import threading
import time
import uuid
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc, func, select, update
from sqlalchemy.dialects import postgresql as pg_types
from sqlalchemy.orm import Session, sessionmaker

from provfw import exception, gcpause, metrics, rules as rules_mod, sources as sources_mod
from provfw.db.sqlalchemy import models
from provfw.db.sqlalchemy.models import (ApiToken, AuditRecord, Feed, FirewallGeneration, ProviderFirewallRule,
                                         ProviderFirewallRuleSource, Service)
from provfw.retrying import call_retrying

LOG = logging.getLogger(__name__)
AUDIT_LOG = logging.getLogger("provfw.audit")

DEADLOCK_ATTEMPTS = 5
# SQLSTATEs of a transaction the server rolled back for losing a lock race (PostgreSQL, psycopg2 and psycopg 3).
_PG_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
# libpq's PQtransactionStatus, as psycopg2's connection.info.transaction_status reports it
# (psycopg2.extensions.TRANSACTION_STATUS_*; not imported: psycopg2 is there only with PostgreSQL).
_PG_IDLE, _PG_IN_TRANSACTION, _PG_IN_ERROR = 0, 2, 3
# MySQL/MariaDB error numbers of the same (PyMySQL and mysqlclient put the number first in ``args``):
# 1213 ER_LOCK_DEADLOCK (Galera reports a certification failure with it too), 1205 ER_LOCK_WAIT_TIMEOUT.
_MYSQL_RETRY_ERRNOS = frozenset({1213, 1205})


def is_deadlock(error: BaseException) -> bool:
    """True when ``error`` (a SQLAlchemy DBAPIError) means "lost a lock race; running it again is safe"."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    orig = error.orig
    sqlstate = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _PG_RETRY_SQLSTATES
    args = getattr(orig, "args", ())
    return bool(args) and isinstance(args[0], int) and args[0] in _MYSQL_RETRY_ERRNOS


def _retried(operation: str, func, *args, **kwargs):
    """Run ``func`` (one whole transaction) again when the database rolled it back for a deadlock.

    ``operation`` names it in the log and in ``provfw_db_deadlocks``.  Raises DBDeadlock after
    DEADLOCK_ATTEMPTS attempts.
    """
    def attempt():
        try:
            return func(*args, **kwargs)
        except sa_exc.DBAPIError as exc:
            if not is_deadlock(exc):
                raise
            metrics.DB_DEADLOCKS.labels(operation).inc()
            raise exception.DBDeadlock(f"{operation}: the database kept rolling the transaction back "
                                       f"({type(exc.orig).__name__}); try again") from exc

    return call_retrying(f"database transaction {operation}", attempt, exception.DBDeadlock,
                         attempts=DEADLOCK_ATTEMPTS, initial=0.05, maximum=1.0, log=LOG)


def _retry_on_deadlock(func):
    """``_retried`` as a decorator, the operation named after ``func``."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return _retried(func.__name__, func, *args, **kwargs)
    return wrapper


_lock = threading.Lock()
BULK_THRESHOLD = 1000  # creates larger than this skip the ORM and return only a count
_engine: sa.Engine | None = None
_sessionmaker: sessionmaker | None = None
_url: str | None = None


# --------------------------------------------------------------------------- engine

def _sqlite_pragmas(dbapi_conn, _record):
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # Let SQLAlchemy, not pysqlite, decide when transactions begin.
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn):
    # IMMEDIATE takes the write lock up front: concurrent writers queue on the
    # busy timeout instead of failing with "database is locked" at commit.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


# A pooled connection idle longer than this is pinged before use (see _ping_if_idle).
PING_IDLE_SECONDS = 1.0


def _checked_in(_dbapi_conn, record) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn, record, proxy) -> None:
    """Pessimistic disconnect handling that costs nothing under load.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: a round trip per
    transaction (a tenth of a mutation's time in the API benchmark).  A
    connection handed back less than ``PING_IDLE_SECONDS`` ago was working
    then; one idle longer (a database restart, a failover, a cut) is pinged,
    and a dead one is replaced before the caller sees it (DisconnectionError
    makes the pool reconnect).
    """
    if time.monotonic() - record.info.get("idle_since", 0.0) < PING_IDLE_SECONDS:
        return
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("SELECT 1")
        cursor.fetchall()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use this connection
        raise sa_exc.DisconnectionError(f"connection failed its idle check: {exc}") from exc
    finally:
        try:
            cursor.close()
        except Exception:  # noqa: BLE001
            pass


def _create_private_file(url: str) -> None:
    """Create a SQLite database file that does not exist yet with mode 0600 (an empty file is an empty
    database to SQLite, which gives its ``-wal`` and ``-shm`` files the same mode).  It holds token hashes and
    the audit log; the umask's 0644 let every local user read them.  An existing file keeps its mode."""
    path = sa.engine.make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def create_engine(url: str, pool_size: int = 5) -> sa.Engine:
    """Create an engine with the settings provfw needs on each backend (a new SQLite file: mode 0600)."""
    kwargs: dict = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        _create_private_file(url)
    else:
        kwargs.update(pool_size=pool_size, max_overflow=2 * pool_size, pool_recycle=3600)
        # A database that vanishes without a reset (a black hole) must not hang a
        # query for the kernel's TCP timeout: the worker's refresh holds the apply
        # lock while it reads, so drift repair and expiry would wait behind it.
        if url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10,
                                      "keepalives_interval": 5, "keepalives_count": 3,
                                      "options": "-c statement_timeout=60000"}
        elif url.startswith(("mysql", "mariadb")):
            kwargs["connect_args"] = {"connect_timeout": 5, "read_timeout": 60, "write_timeout": 60}
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        event.listen(engine, "checkin", _checked_in)
        event.listen(engine, "checkout", _ping_if_idle)
    event.listen(engine, "before_cursor_execute", _count_statement)
    event.listen(engine, "after_cursor_execute", _count_rows)
    event.listen(engine, "begin", _count_transaction)
    event.listen(engine, "handle_error", _unavailable)
    return engine


def _unavailable(context: sa.engine.ExceptionContext) -> None:
    """A connection that could not be made or was lost leaves the db layer as DatabaseUnavailable.

    So every caller - the API (503 with the reason, not a generic 500), the conductor's loops, provfw-manage -
    sees one documented error for "the database is away" whatever the driver; SQLAlchemy still invalidates the
    lost connection (its ``_handle_dbapi_exception`` does so after the handlers).  A failed connect has no
    connection yet; a lost one is ``is_disconnect``.  A pool's pre-ping is left to the pool, which reconnects,
    and errors of a working connection (a deadlock, a constraint, SQLite's missing table) stay as they are.
    """
    if context.is_pre_ping or not isinstance(context.original_exception, Exception):
        return
    failed_connect = context.connection is None and isinstance(context.sqlalchemy_exception, sa_exc.OperationalError)
    if context.is_disconnect or failed_connect:
        raise exception.DatabaseUnavailable(
            f"database unreachable ({type(context.original_exception).__name__})") from context.original_exception


# --------------------------------------------------------------------------- statement counters

_counts_lock = threading.Lock()
_counts = {"statements": 0, "transactions": 0, "rows_read": 0}


def _count_statement(conn, cursor, statement, parameters, context, executemany):
    # An executemany is one statement per parameter set on the server (psycopg2 and
    # PyMySQL loop over them for UPDATE), so it counts as that many.
    count = len(parameters) if executemany and isinstance(parameters, (list, tuple)) else 1
    with _counts_lock:
        _counts["statements"] += count


def _count_rows(conn, cursor, statement, parameters, context, executemany):
    # cursor.description is set only for statements that return rows; rowcount is then
    # the rows the server sent (psycopg2, PyMySQL; -1 where the driver cannot tell).
    if cursor.description is not None and cursor.rowcount > 0:
        with _counts_lock:
            _counts["rows_read"] += cursor.rowcount


def _count_transaction(conn):
    with _counts_lock:
        _counts["transactions"] += 1


def statement_counts() -> dict[str, int]:
    """What this process asked of the database since it started (every engine it created).

    ``{"statements": n, "transactions": n, "rows_read": n}``: statements the
    server executed (an executemany counts once per parameter set), transactions
    begun, and rows returned by SELECTs.  Counting costs one lock per statement.
    """
    with _counts_lock:
        return dict(_counts)


def configure(url: str, pool_size: int = 5) -> sa.Engine:
    """Point the db layer at ``url`` (replacing any previous engine)."""
    global _engine, _sessionmaker, _url
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = create_engine(url, pool_size)
        _sessionmaker = sessionmaker(bind=_engine, expire_on_commit=False)
        _url = url
        return _engine


def get_engine() -> sa.Engine:
    if _engine is None:
        from provfw import conf
        configure(conf.database_url(), conf.CONF.database.pool_size)
    assert _engine is not None
    return _engine


def dispose() -> None:
    global _engine, _sessionmaker
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = _sessionmaker = None


def _session() -> Session:
    get_engine()
    assert _sessionmaker is not None
    return _sessionmaker()


@event.listens_for(Session, "before_commit")
def _write_audit_rows(session: Session) -> None:
    """The transaction's audit rows (``_audit``) and its move of the live-rule counter (``_adjust_live_rules``),
    just before COMMIT: inside the transaction (a row that cannot be written rolls the mutation back), one
    round trip for a whole group commit, and on PostgreSQL one for both (``_AUDIT_AND_LIVE_PG``)."""
    if session.info.get("new_rules"):
        raise exception.ProvfwError("a transaction's deferred new rules were not written (_commit_riding)")
    rows = session.info.pop("audit_rows", None)
    delta = session.info.pop("live_delta", 0)
    connection = session.connection() if rows or delta else None
    if rows and delta and connection.dialect.name == "postgresql":
        connection.execute(_AUDIT_AND_LIVE_PG, {"b_rows": _json_rows(rows), "b_created_at": _now(), "b_delta": delta})
        return
    if rows:
        connection.execute(_AUDIT_INSERT, rows)
    if delta:
        connection.execute(_ADJUST_LIVE, {"b_delta": delta})


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    """The transaction committed: end its hold of the generation row lock, log its audit lines."""
    _generation_released(session)
    for line in session.info.pop("audit_lines", ()):
        AUDIT_LOG.info(line)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    """The transaction rolled back: end its hold of the lock, drop what it would have audited and counted."""
    _generation_released(session)
    session.info.pop("audit_lines", None)
    session.info.pop("audit_rows", None)
    session.info.pop("live_delta", None)
    session.info.pop("new_rules", None)


def _generation_locked(session: Session, asked: float) -> None:
    """The statement asked at ``asked`` (``time.monotonic()``) holds the generation row lock now: observe how
    long taking it took, and start the hold that ``_generation_released`` observes at COMMIT or ROLLBACK.
    The first take of a transaction counts (the expiry purge locks the row, then bumps it)."""
    if "generation_locked" not in session.info:
        now = time.monotonic()
        session.info["generation_locked"] = now
        metrics.DB_GENERATION_LOCK_WAIT_SECONDS.observe(now - asked)


def _generation_released(session: Session) -> None:
    locked = session.info.pop("generation_locked", None)
    if locked is not None:
        metrics.DB_GENERATION_LOCK_HELD_SECONDS.observe(time.monotonic() - locked)


# --------------------------------------------------------------------------- values

@dataclasses.dataclass(frozen=True)
class Audit:
    """Who is making a change, under which request, and why."""

    actor: str
    request_id: str | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class CreateResult:
    """``added`` holds the new rows for small creates; bulk creates only count them (``added_count``).

    ``duplicates``: specs whose source already wanted the live rule at least as
    long (nothing changed for them; for small creates, as ``added``).  ``renewed``: live rules whose expiry the
    call moved later (rows for small creates; ``renewed_count`` always).
    ``kept``: live rules that gained the source (or a longer wish of it)
    without their expiry moving.  ``retired`` are live but expired copies of
    the created specs that the same transaction soft-deleted to make room
    (hosts had already stopped enforcing them).  ``changes`` is what hosts are
    told.
    """

    generation: int
    added: list[ProviderFirewallRule]
    duplicates: list[rules_mod.RuleSpec]
    added_count: int = 0
    retired: list[rules_mod.Rule] = dataclasses.field(default_factory=list)
    renewed: list[ProviderFirewallRule] = dataclasses.field(default_factory=list)
    kept: list[ProviderFirewallRule] = dataclasses.field(default_factory=list)
    changes: rules_mod.Changes | None = None
    renewed_count: int = 0


# The values the db layer returns are the ones the hosts use (provfw.rules).
Snapshot = rules_mod.Snapshot
Changes = rules_mod.Changes


def _now() -> datetime.datetime:
    return models.utcnow()


def _json_value(value):
    if isinstance(value, datetime.datetime):
        return value.isoformat()      # naive UTC, as stored; PostgreSQL reads ISO 8601 into TIMESTAMP
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_rows(rows: Sequence[dict]) -> str:
    """``rows`` (dicts of str, int, None and naive UTC datetimes) as the JSON text ``json_to_recordset`` reads:
    one parameter for a whole group's rows (PostgreSQL).  Keys the statement does not name are ignored."""
    return json.dumps(rows, default=_json_value)


def _spec_of(row) -> rules_mod.RuleSpec:
    return rules_mod.RuleSpec(row.cidr, row.protocol, row.from_port, row.to_port)


def _epoch(value: datetime.datetime | None) -> float | None:
    """Naive UTC datetime -> POSIX seconds (the hosts' clock), None stays None."""
    return None if value is None else value.replace(tzinfo=datetime.timezone.utc).timestamp()


def rule_of(row) -> rules_mod.Rule:
    """The hosts' view of a rule row (any row with id, cidr, protocol, ports and expires_at)."""
    return rules_mod.Rule(row.id, _spec_of(row), _epoch(row.expires_at))


_GENERATION = FirewallGeneration.__table__
_RULES = ProviderFirewallRule.__table__
_SOURCES = ProviderFirewallRuleSource.__table__

# The mutations' statements, built once and run on the session's connection.  Built per call, a statement
# costs SQLAlchemy its construction and its cache key on every execution, and Session.execute adds the ORM's
# execution layer (an ORM-enabled DELETE also evaluates it for the identity map): two statements and a
# COMMIT took 1.7-2.3 ms of CPU built per call through the session against 0.9-1.0 ms prebuilt on the
# connection (PostgreSQL 15, this machine, 2026-12-01), and every one of them runs under the generation
# row lock.  Bind names start with ``b_``: SQLAlchemy reserves a column's own name in SET and VALUES.
_BUMP = (update(_GENERATION).where(_GENERATION.c.id == 1)
         .values(generation=_GENERATION.c.generation + 1, updated_at=sa.bindparam("b_now")))
_BUMP_RETURNING = _BUMP.returning(_GENERATION.c.generation, _GENERATION.c.live_rules)
_GENERATION_ROW = select(_GENERATION.c.generation, _GENERATION.c.live_rules).where(_GENERATION.c.id == 1)
_ADJUST_LIVE = (update(_GENERATION).where(_GENERATION.c.id == 1)
                .values(live_rules=_GENERATION.c.live_rules + sa.bindparam("b_delta")))
_AUDIT_INSERT = AuditRecord.__table__.insert()
# PostgreSQL: a transaction's audit rows and its move of the live-rule counter in one statement (one round trip
# less for every mutation).  The rows travel as ONE JSON parameter (``json_to_recordset``): psycopg2 adapts a
# list parameter element by element in Python-called adapters, which for a group's arrays cost more CPU than
# the statement's own round trip; one ``json.dumps`` and one string cost a quarter of it (``_json_rows``).
_AUDIT_AND_LIVE_PG = sa.text(
    "WITH audit AS (INSERT INTO audit_log (created_at, actor, request_id, action, generation, detail) "
    "SELECT CAST(:b_created_at AS TIMESTAMP), actor, request_id, action, generation, detail "
    "FROM json_to_recordset(CAST(:b_rows AS JSON)) AS d(actor VARCHAR, request_id VARCHAR, action VARCHAR, "
    "generation BIGINT, detail TEXT)) "
    "UPDATE provider_fw_generation SET live_rules = live_rules + :b_delta WHERE id = 1")
# PostgreSQL: a group commit's BEGIN rides on its bump and its COMMIT on the audit rows with the live-rule
# counter (``_riding_transaction``): one simple query may hold several statements, and psycopg2 answers the
# last one's rows.  The counter moves by 0 when a group changed no live rule: it is one statement whatever.
_BEGIN_AND_BUMP_PG = sa.text("BEGIN; UPDATE provider_fw_generation SET generation = generation + 1, "
                             "updated_at = :b_now WHERE id = 1 RETURNING generation, live_rules")
_AUDIT_LIVE_AND_COMMIT_PG = sa.text(_AUDIT_AND_LIVE_PG.text + "; COMMIT")
# The new rules' fields and each row's owner, as ``json_to_recordset`` reads them (``_json_rows``).
_NEW_RULE_FIELDS = (("cidr", "VARCHAR"), ("ip_version", "INTEGER"), ("protocol", "VARCHAR"), ("from_port", "INTEGER"),
                    ("to_port", "INTEGER"), ("description", "VARCHAR"), ("created_by", "VARCHAR"),
                    ("created_at", "TIMESTAMP"), ("expires_at", "TIMESTAMP"), ("created_generation", "BIGINT"),
                    ("source", "VARCHAR"), ("actor", "VARCHAR"))
# PostgreSQL: a group commit's first round trip also retires its unblocks' rules (by every source, one actor:
# ``_retire_cidrs``'s statement, the generation read from the row just bumped) and looks up its blocks' live
# rules (``_existing_live``'s) and takes ids for its new rules (``_defer_new_rules``), so a group of blocks and
# unblocks is two round trips, not five.  The third statement of the query starts after the bump holds the
# generation row lock, so under READ COMMITTED it sees every mutation committed before (one statement's CTE
# could not: its snapshot would predate the lock wait).  psycopg2 answers the last statement's rows: ``kind``
# 0 is the generation row, 1 a retired rule, 2 a live rule of a looked-up CIDR, 3 an id taken.
_BEGIN_BUMP_AND_READ_PG = sa.text(
    "BEGIN; UPDATE provider_fw_generation SET generation = generation + 1, updated_at = :b_now WHERE id = 1; "
    "WITH g AS (SELECT generation, live_rules FROM provider_fw_generation WHERE id = 1), "
    "retired AS (UPDATE provider_fw_rules SET deleted = id, deleted_at = :b_now, "
    "deleted_generation = (SELECT generation FROM g), deleted_by = :b_actor, updated_at = :b_now "
    "WHERE cidr = ANY(CAST(:b_unblock AS VARCHAR[])) AND deleted = 0 "
    "AND (expires_at IS NULL OR expires_at > :b_now) "
    "RETURNING id, cidr, protocol, from_port, to_port, expires_at), "
    "forgot AS (DELETE FROM provider_fw_rule_sources WHERE rule_id IN (SELECT id FROM retired)) "
    "SELECT 0 AS kind, NULL AS id, NULL AS cidr, NULL AS protocol, NULL AS from_port, NULL AS to_port, "
    "CAST(NULL AS TIMESTAMP) AS expires_at, generation, live_rules FROM g "
    "UNION ALL SELECT 1, id, cidr, protocol, from_port, to_port, expires_at, NULL, NULL FROM retired "
    "UNION ALL SELECT 2, id, cidr, protocol, from_port, to_port, expires_at, NULL, NULL FROM provider_fw_rules "
    "WHERE deleted = 0 AND cidr = ANY(CAST(:b_lookup AS VARCHAR[])) "
    "UNION ALL SELECT 3, nextval(pg_get_serial_sequence('provider_fw_rules', 'id')), NULL, NULL, NULL, NULL, "
    "NULL, NULL, NULL FROM generate_series(1, :b_ids)")


def _new_rules_ctes(with_ids: bool) -> str:
    """The CTEs that write new rules and their source rows from ONE JSON parameter (``_json_rows``), whatever
    their count (PostgreSQL): ``data`` (``json_to_recordset``), ``new`` (the rules' INSERT .. RETURNING every
    column) and ``sources`` (a source row per rule, matched to its owner by spec - the live spec is unique;
    RETURNING's order is not promised - or by the id sent, ``with_ids``).  Against the two statements of other
    databases: SQLAlchemy's ordered insertmanyvalues rendered a VALUES row per rule in Python and psycopg2
    formatted each parameter; against one array per column, psycopg2 adapted each element (``_json_rows``)."""
    id_column = "id, " if with_ids else ""
    return (
        f"WITH data AS (SELECT * FROM json_to_recordset(CAST(:b_{'new' if with_ids else 'rows'} AS JSON)) AS d("
        + ("id BIGINT, " if with_ids else "") + ", ".join(f"{name} {kind}" for name, kind in _NEW_RULE_FIELDS)
        + ")), "
        f"new AS (INSERT INTO provider_fw_rules ({id_column}cidr, ip_version, protocol, from_port, to_port, "
        "description, created_by, created_at, expires_at, created_generation, deleted) "
        f"SELECT {id_column}cidr, ip_version, protocol, from_port, to_port, description, created_by, created_at, "
        "expires_at, created_generation, 0 FROM data RETURNING *), "
        "sources AS (INSERT INTO provider_fw_rule_sources (rule_id, source, expires_at, created_at, created_by) "
        "SELECT new.id, data.source, new.expires_at, new.created_at, data.actor "
        f"FROM new JOIN data USING ({'id' if with_ids else 'cidr, protocol, from_port, to_port'}))")


# PostgreSQL: a group's (or one create's) new rules and their source rows in ONE statement (``_insert_new_rules``).
_NEW_RULES_PG = sa.text(_new_rules_ctes(with_ids=False) + " SELECT * FROM new").columns(*_RULES.c)
# PostgreSQL: the last round trip of a group whose new rules were deferred (``_defer_new_rules``): the rules with
# the ids ``_BEGIN_BUMP_AND_READ_PG`` took (kind 3), their source rows, the audit rows, the live-rule counter and
# COMMIT.  A group of blocks and unblocks is then two round trips under the generation row lock.
_NEW_RULES_AUDIT_LIVE_AND_COMMIT_PG = sa.text(
    _new_rules_ctes(with_ids=True) + ", " + _AUDIT_AND_LIVE_PG.text.removeprefix("WITH ") + "; COMMIT")

_WIRE_COLUMNS = (_RULES.c.id, _RULES.c.cidr, _RULES.c.protocol, _RULES.c.from_port, _RULES.c.to_port,
                 _RULES.c.expires_at)
_IN_FORCE_AT = sa.and_(_RULES.c.deleted == 0,
                       sa.or_(_RULES.c.expires_at.is_(None), _RULES.c.expires_at > sa.bindparam("b_now")))
_IN_FORCE_BY_ID = select(*_WIRE_COLUMNS).where(_RULES.c.id == sa.bindparam("b_id"), _IN_FORCE_AT)
_IN_FORCE_BY_CIDR = (select(*_WIRE_COLUMNS).where(_RULES.c.cidr == sa.bindparam("b_cidr"), _IN_FORCE_AT)
                     .order_by(_RULES.c.id))
# An unblock of a CIDR by every source: the soft delete finds the rules and answers them (PostgreSQL, SQLite).
# A soft delete: ``deleted`` takes the row's id, so the unique key on (cidr, ..., deleted) lets a new live copy in.
_SOFT_DELETE_VALUES = dict(deleted=_RULES.c.id, deleted_at=sa.bindparam("b_now"),
                           deleted_generation=sa.bindparam("b_generation"), deleted_by=sa.bindparam("b_actor"),
                           updated_at=sa.bindparam("b_now"))


def _forgetting_sources(retire: sa.Update) -> sa.Select:
    """``retire`` (an UPDATE of rule rows .. RETURNING their ids) and the DELETE of those rules' source rows,
    as ONE statement for PostgreSQL: a data-modifying ``WITH``, which PostgreSQL runs to completion whether
    or not the outer SELECT reads it (docs: "Data-Modifying Statements in WITH").  An unblock's two round
    trips under the generation row lock become one; the answer is ``retire``'s rows."""
    retired = retire.cte("retired")
    forgot = sa.delete(_SOURCES).where(_SOURCES.c.rule_id.in_(select(retired.c.id))).cte("forgot")
    return select(*retired.c).add_cte(forgot)


# Every column: the rows as stored are the API's answer for new rules, without reading them back.
_INSERT_RULES_RETURNING = _RULES.insert().returning(*_RULES.c, sort_by_parameter_order=True)
# The new rules' source rows, written by the database from the rule rows just taken (their expires_at
# and created_at are the source's).
_SOURCES_OF_NEW_RULES = sa.insert(_SOURCES).from_select(
    ["rule_id", "source", "expires_at", "created_at", "created_by"],
    select(_RULES.c.id, sa.bindparam("b_source", type_=sa.String), _RULES.c.expires_at, _RULES.c.created_at,
           sa.bindparam("b_actor", type_=sa.String))
    .where(_RULES.c.created_generation == sa.bindparam("b_generation"), _RULES.c.deleted == 0))
_INSERT_SOURCES = _SOURCES.insert()
_RULES_WITH_SOURCES = (
    select(_RULES, _SOURCES.c.source.label("source_name"), _SOURCES.c.expires_at.label("source_expires_at"))
    .select_from(_RULES.outerjoin(_SOURCES, _SOURCES.c.rule_id == _RULES.c.id))
    .where(_RULES.c.id.in_(sa.bindparam("b_ids", expanding=True)), _RULES.c.deleted == 0))


def _one_of(column, name: str, element_type, postgresql: bool):
    """``column`` is one of the list bound as ``name``.

    On PostgreSQL ``= ANY(:name)`` with the list as one array parameter (psycopg2 adapts it in C); elsewhere an
    expanding ``IN``, for which SQLAlchemy renders a placeholder per value on every execution - 8-10 % of a
    120k-entry churn sync's API time went to rendering the IN lists of its 1,204 leaving rules in chunks of
    1,000 (py-spy, 2026-12-01).
    """
    if postgresql:
        return column == sa.any_(sa.bindparam(name, type_=pg_types.ARRAY(element_type)))
    return column.in_(sa.bindparam(name, expanding=True))


@dataclasses.dataclass(frozen=True)
class _ListStatements:
    """The statements that take a list of ids (or CIDRs), in the form one dialect runs best; ``chunk``: the
    longest list one execution takes (SQLite and MariaDB: a placeholder each; PostgreSQL: one array)."""

    soft_delete: sa.Update
    forget_sources: sa.Delete
    source_rows: sa.Select
    live_by_cidrs: sa.Select
    retire_by_cidrs: sa.Update
    # PostgreSQL: retire_by_cidrs and forget_sources of the retired rules in one statement (None elsewhere).
    retire_by_cidrs_forgetting: sa.Select | None
    chunk: int

    @classmethod
    def build(cls, postgresql: bool) -> "_ListStatements":
        ids = functools.partial(_one_of, name="b_ids", element_type=sa.BigInteger(), postgresql=postgresql)
        retire_by_cidrs = update(_RULES).where(_one_of(_RULES.c.cidr, "b_cidrs", sa.String(), postgresql),
                                               _IN_FORCE_AT).values(**_SOFT_DELETE_VALUES).returning(*_WIRE_COLUMNS)
        return cls(
            soft_delete=update(_RULES).where(ids(_RULES.c.id), _RULES.c.deleted == 0).values(**_SOFT_DELETE_VALUES),
            forget_sources=sa.delete(_SOURCES).where(ids(_SOURCES.c.rule_id)),
            source_rows=select(_SOURCES.c.rule_id, _SOURCES.c.source, _SOURCES.c.expires_at).where(
                ids(_SOURCES.c.rule_id)),
            live_by_cidrs=select(*_WIRE_COLUMNS).where(
                _RULES.c.deleted == 0, _one_of(_RULES.c.cidr, "b_cidrs", sa.String(), postgresql)),
            retire_by_cidrs=retire_by_cidrs,
            retire_by_cidrs_forgetting=_forgetting_sources(retire_by_cidrs) if postgresql else None,
            chunk=50_000 if postgresql else 1000)


_LISTS = {postgresql: _ListStatements.build(postgresql) for postgresql in (False, True)}


def _lists(connection: sa.Connection) -> _ListStatements:
    return _LISTS[connection.dialect.name == "postgresql"]


def _bump_generation(session: Session, begin: bool = False, asked: float | None = None) -> tuple[int, int]:
    """Take the generation row lock; return (new generation, live rules).

    The first statement of every mutation: from here to COMMIT the row lock
    serialises mutations, so everything after it runs as few statements as
    possible (Core statements, RETURNING where the database has it).
    ``begin``: send BEGIN with it (``_riding_transaction``).  ``asked``: the
    ``time.monotonic()`` at which the transaction began asking for the lock
    (default: now), so that a BEGIN that waits for it - SQLite's IMMEDIATE,
    sent when the session first connects - counts in the lock's wait metric.
    """
    asked = time.monotonic() if asked is None else asked
    connection = session.connection()
    if begin:
        row = connection.execute(_BEGIN_AND_BUMP_PG, {"b_now": _now()}).first()
    elif connection.dialect.update_returning:          # PostgreSQL, SQLite; not MariaDB
        row = connection.execute(_BUMP_RETURNING, {"b_now": _now()}).first()
    else:
        row = None if connection.execute(_BUMP, {"b_now": _now()}).rowcount != 1 else \
            connection.execute(_GENERATION_ROW).first()
    if row is None:
        raise exception.ProvfwError("provider_fw_generation row missing: run 'provfw-manage db sync'")
    _generation_locked(session, asked)
    return row[0], row[1]


def _adjust_live_rules(session: Session, delta: int) -> None:
    """Move the live-rule counter by ``delta``: written just before COMMIT with the audit rows
    (``_write_audit_rows``), in the same transaction, under the same generation row lock."""
    if delta:
        session.info["live_delta"] = session.info.get("live_delta", 0) + delta


def _live_rules(session: Session) -> int:
    return session.execute(select(_GENERATION.c.live_rules).where(_GENERATION.c.id == 1)).scalar_one()


def _audit(session: Session, audit: Audit | None, action: str, generation: int | None, detail: dict) -> None:
    if audit is None:
        return
    if audit.reason:
        detail = {**detail, "reason": audit.reason}
    # Written by _write_audit_rows when the transaction commits.
    session.info.setdefault("audit_rows", []).append({
        "actor": audit.actor, "request_id": audit.request_id, "action": action, "generation": generation,
        "detail": json.dumps(detail, default=str, sort_keys=True)})
    # Logged by _after_commit once the transaction committed.
    session.info.setdefault("audit_lines", []).append(
        json.dumps({"actor": audit.actor, "request_id": audit.request_id, "action": action,
                    "generation": generation, **detail}, default=str, sort_keys=True))


# --------------------------------------------------------------------------- group commit

@dataclasses.dataclass
class _Mutation:
    """One transaction that holds the generation row lock: its generation, the live rules, what its steps did."""

    generation: int
    live_before: int
    live_delta: int = 0     # written once, before COMMIT (_commit_group)
    changed: bool = False   # some step changed rules: commit; otherwise roll back and the generation stays
    wrote: bool = False     # the running step has written, so an error of it spoils the transaction
    # PostgreSQL, a group whose steps were all batched: rule ids taken from the sequence with the bump, for
    # new rules written with the audit rows and COMMIT (``_defer_new_rules``); None: insert them at once.
    new_ids: Iterator[int] | None = None

    @property
    def live(self) -> int:
        """Live rules now, with what the transaction's earlier steps did."""
        return self.live_before + self.live_delta


# A step of a group commit: run inside the transaction, return (the caller's answer, the change or None).
# It raises a ProvfwError (NotFound, DuplicateRule, the guards) only before it writes, or sets m.wrote first.
Step = Callable[[Session, _Mutation], tuple]


class _NothingChanged(Exception):
    """Roll a group commit back: no step changed anything."""


@contextlib.contextmanager
def _riding_transaction(session: Session) -> Iterator[bool]:
    """On PostgreSQL, let a group commit's BEGIN and COMMIT ride on its first and last statements.

    psycopg2 opens a transaction with a round trip of its own (``BEGIN``) and
    ends it with another (``COMMIT``); on the +1 CIDR path those were two of
    six round trips, the COMMIT one of them under the generation row lock.
    Here the connection is switched to autocommit for the transaction, which
    stops psycopg2 from sending either: the bump is sent as ``BEGIN; UPDATE
    ..`` (``_bump_generation``) and the audit rows with the counter as ``...;
    COMMIT`` (``_commit_riding``).  SQLAlchemy's own commit and rollback are
    then no-ops at the driver, so this manager owns the end of the
    transaction: on any error before the COMMIT it sends ``ROLLBACK`` itself
    (or, when the connection's state cannot be known, invalidates it), and
    it always switches autocommit back off before SQLAlchemy sees the
    connection again, so the pool only ever holds connections in psycopg2's
    default mode.  Yields whether BEGIN and COMMIT ride: False (the driver's
    own, as for every other transaction) on other databases and on a
    connection that has a transaction open already (the idle check's
    ``SELECT 1``).
    """
    connection = session.connection()
    raw = connection.connection.dbapi_connection if connection.dialect.name == "postgresql" else None
    if raw is None or raw.autocommit or raw.info.transaction_status != _PG_IDLE:
        yield False
        return
    raw.autocommit = True
    try:
        yield True
    finally:
        try:
            status = raw.info.transaction_status
            if status in (_PG_IN_TRANSACTION, _PG_IN_ERROR):
                cursor = raw.cursor()
                try:
                    cursor.execute("ROLLBACK")
                finally:
                    cursor.close()
            elif status != _PG_IDLE:          # a query still running (interrupted), or the connection is gone
                connection.invalidate()
        except Exception:  # noqa: BLE001 - the error that brought us here is the one to report
            LOG.debug("could not roll back a riding transaction; dropping its connection", exc_info=True)
            connection.invalidate()
        if not raw.closed:
            raw.autocommit = False


def _commit_riding(session: Session) -> None:
    """The transaction's audit rows and live-rule counter, and COMMIT, in one round trip (PostgreSQL)."""
    session.flush()                   # nothing the ORM holds may reach the server after the COMMIT
    rows = session.info.pop("audit_rows", None) or []
    delta = session.info.pop("live_delta", 0)
    new = session.info.pop("new_rules", None)
    arguments = {"b_rows": _json_rows(rows), "b_created_at": _now(), "b_delta": delta}
    if new:
        session.connection().execute(_NEW_RULES_AUDIT_LIVE_AND_COMMIT_PG, {**arguments, "b_new": _json_rows(new)})
    else:
        session.connection().execute(_AUDIT_LIVE_AND_COMMIT_PG, arguments)


def _commit_group(steps: Sequence[Step]) -> tuple[list, Changes | None]:
    """Run ``steps`` in ONE transaction under one generation bump; return (outcomes, merged change or None).

    An outcome is a step's answer, or the ProvfwError it raised before writing (that step changed nothing;
    the others commit).  Any other error - a database error, or a step's error after it wrote - rolls the
    whole transaction back and propagates.  When no step changed anything the transaction (the bump) is
    rolled back and the change is None.  Steps that ``_run_batched`` can take together run first, as a
    few statements for all of them; the others then run one after another, in their order.
    """
    outcomes: list = [None] * len(steps)
    changes: list[Changes] = []
    with _session() as session:
        try:
            asked = time.monotonic()
            with session.begin(), _riding_transaction(session) as riding:
                unblocks, syncs = _batches(steps, session.get_bind().dialect.update_returning, singles=riding)
                if riding and (unblocks or syncs):
                    now = _now()
                    # Every step batched: no later step needs to see the new rules before COMMIT, so they are
                    # written with it, under ids taken now (one for each spec an add wants: at most what it
                    # creates; an unused id is a gap, as a rolled-back insert leaves).
                    every = len(unblocks) + len(syncs) == len(steps)
                    m, read = _bump_and_read(session, unblocks, syncs, now, asked, new_ids=sum(
                        len(step.call.wanted) for _, step in syncs) if every else 0)
                else:
                    m, read = _Mutation(*_bump_generation(session, begin=riding, asked=asked)), None
                    now = _now()
                batched = _run_batched(session, m, unblocks, syncs, now, changes, read)
                outcomes = [batched.get(index) for index in range(len(steps))]
                for index, step in enumerate(steps):
                    if index in batched:
                        continue
                    m.wrote = False
                    try:
                        answer, change = step(session, m)
                    except exception.ProvfwError as exc:
                        if m.wrote:
                            raise
                        outcomes[index] = exc
                        continue
                    outcomes[index] = answer
                    if change is not None:
                        changes.append(change)
                if not m.changed:
                    raise _NothingChanged()
                _adjust_live_rules(session, m.live_delta)
                if riding:
                    _commit_riding(session)
        except _NothingChanged:
            return outcomes, None
    metrics.DB_GROUP_COMMIT_MUTATIONS.observe(len(steps))
    return outcomes, rules_mod.merge_changes(changes) if changes else Changes(m.generation - 1, m.generation, [], [])


class _SyncStep:
    """A small add (``_SyncCall.batchable``) as a group commit's step; ``_run_batched`` takes several at once."""

    __slots__ = ("call",)

    def __init__(self, call: "_SyncCall"):
        self.call = call

    def __call__(self, session: Session, m: _Mutation) -> tuple:
        return _sync_step(self.call, session, m)


class _UnblockStep:
    """``provider_fw_rule_destroy_by_cidr`` as a step; ``_run_batched`` takes several by every source at once."""

    __slots__ = ("cidr", "audit", "source")

    def __init__(self, cidr: str, audit: "Audit | None", source: str | None):
        self.cidr, self.audit, self.source = cidr, audit, source

    def __call__(self, session: Session, m: _Mutation) -> tuple:
        return _destroy_by_cidr_step(self.cidr, self.audit, self.source, session, m)


def _batches(steps: Sequence[Step], update_returning: bool, singles: bool = False) -> tuple[list, list]:
    """The group's steps that ``_run_batched`` takes: (unblocks by every source, small adds), each a list of
    (index, step).

    Without this a group's transaction ran 3 statements per block and 2 per
    unblock one after another, under the generation row lock, so a group's
    time grew with its size; together they are 3 and 2 statements for the
    whole group (``_sync_batch``, ``_unblock_batch``), and on PostgreSQL the
    look-up and the retire ride on the bump (``_bump_and_read``).  The
    mutations of one group were all in flight together (none of their
    callers has an answer yet), so running these first is one valid order of
    them: the same as if they had queued first.  A step that touches a CIDR
    an earlier taken step touches is left to run after, in its turn, so it
    sees that step's writes.  A kind is taken only when the group has two
    steps of it, or one with ``singles`` (when its statements ride on the
    bump, a lone step costs no statement of its own either).
    """
    syncs: list[tuple[int, _SyncStep]] = []
    unblocks: list[tuple[int, _UnblockStep]] = []
    touched: set[str] = set()
    for index, step in enumerate(steps):
        if isinstance(step, _SyncStep):
            cidrs, bucket = {spec.cidr for spec in step.call.wanted}, syncs
        elif isinstance(step, _UnblockStep) and step.source is None and update_returning:
            cidrs, bucket = {step.cidr}, unblocks
        else:
            continue
        if cidrs.isdisjoint(touched):
            touched |= cidrs
            bucket.append((index, step))
    least = 1 if singles else 2
    return (unblocks if len(unblocks) >= least else []), (syncs if len(syncs) >= least else [])


def _actor(audit: "Audit | None") -> str | None:
    return audit.actor if audit else None


class _Read(NamedTuple):
    """What ``_bump_and_read`` read: the retired rules by CIDR (None: the unblocks were not retired), the live
    rules of the adds' specs (``_existing_live``'s answer)."""

    retired: dict[str, list] | None
    found: dict


def _bump_and_read(session: Session, unblocks: list, syncs: list, now: datetime.datetime, asked: float,
                   new_ids: int = 0) -> tuple[_Mutation, _Read]:
    """PostgreSQL, riding transaction: BEGIN, the bump, the retire of ``unblocks``' rules (when they share one
    actor), the look-up of ``syncs``' specs and ``new_ids`` ids from the rules' sequence (``m.new_ids``) in
    ONE round trip (``_BEGIN_BUMP_AND_READ_PG``)."""
    connection = session.connection()
    actors = {_actor(step.audit) for _, step in unblocks}
    retiring = len(actors) == 1
    by_cidr: dict[str, set] = {}
    for _, step in syncs:
        for spec in step.call.wanted:
            by_cidr.setdefault(spec.cidr, set()).add(spec)
    rows = connection.execute(_BEGIN_BUMP_AND_READ_PG, {
        "b_now": now, "b_actor": next(iter(actors)) if retiring else None,
        "b_unblock": [step.cidr for _, step in unblocks] if retiring else [], "b_lookup": list(by_cidr),
        "b_ids": new_ids}).all()
    head = [row for row in rows if row.kind == 0]
    if not head:
        raise exception.ProvfwError("provider_fw_generation row missing: run 'provfw-manage db sync'")
    _generation_locked(session, asked)
    retired: dict[str, list] | None = {} if retiring else None
    found: dict = {}
    ids: list[int] = []
    for row in rows:
        if row.kind == 1:
            retired.setdefault(row.cidr, []).append(row)
        elif row.kind == 2:
            spec = _spec_of(row)
            if spec in by_cidr.get(spec.cidr, ()):
                found[spec] = (row.id, row.expires_at)
        elif row.kind == 3:
            ids.append(row.id)
    m = _Mutation(head[0].generation, head[0].live_rules, new_ids=iter(ids) if new_ids else None)
    return m, _Read(retired, found)


def _run_batched(session: Session, m: _Mutation, unblocks: list, syncs: list, now: datetime.datetime,
                 changes: list[Changes], read: _Read | None = None) -> dict[int, object]:
    """Run ``_batches``' unblocks together, then its small adds together; return index -> outcome.  ``read``:
    what ``_bump_and_read`` retired and looked up already.  Appends the steps' changes to ``changes``, in the
    order they ran."""
    outcomes: dict[int, object] = {}
    if unblocks:
        _unblock_batch(session, m, unblocks, now, outcomes, changes, read.retired if read else None)
    if syncs:
        _sync_batch(session, m, syncs, now, outcomes, changes, read.found if read else None)
    return outcomes


def _retire_cidrs(connection: sa.Connection, cidrs: Sequence[str], now: datetime.datetime, generation: int,
                  actor: str | None) -> list:
    """Retire every live rule of ``cidrs`` by every source and forget their source rows; return the rules'
    wire rows (``_WIRE_COLUMNS``) as they were.  PostgreSQL: one statement per chunk (``_forgetting_sources``);
    SQLite: an UPDATE .. RETURNING, then the DELETE of the source rows.  Needs ``update_returning``."""
    lists = _lists(connection)
    retire = lists.retire_by_cidrs_forgetting if lists.retire_by_cidrs_forgetting is not None else \
        lists.retire_by_cidrs
    rows: list = []
    for start in range(0, len(cidrs), lists.chunk):
        rows += connection.execute(retire, {"b_cidrs": list(cidrs[start:start + lists.chunk]), "b_now": now,
                                            "b_generation": generation, "b_actor": actor}).all()
    if lists.retire_by_cidrs_forgetting is None:
        ids = [row.id for row in rows]
        for start in range(0, len(ids), lists.chunk):
            connection.execute(lists.forget_sources, {"b_ids": ids[start:start + lists.chunk]})
    return rows


def _unblock_batch(session: Session, m: _Mutation, steps: list[tuple[int, "_UnblockStep"]], now: datetime.datetime,
                   outcomes: dict, changes: list[Changes], retired: dict[str, list] | None = None) -> None:
    """Unblocks of distinct CIDRs by every source: one UPDATE .. RETURNING per actor, one DELETE of sources
    (PostgreSQL: one statement per actor for both, ``_forgetting_sources``).  ``retired``: their rules by
    CIDR, retired already (``_bump_and_read``)."""
    generation = m.generation
    m.wrote = True
    found = retired
    if found is None:
        connection = session.connection()
        by_actor: dict[str | None, list[str]] = {}
        for _, step in steps:
            by_actor.setdefault(_actor(step.audit), []).append(step.cidr)
        found = {}
        for actor, cidrs in by_actor.items():
            for row in _retire_cidrs(connection, cidrs, now, generation, actor):
                found.setdefault(row.cidr, []).append(row)
    for index, step in steps:
        rows = sorted(found.get(step.cidr, ()), key=lambda row: row.id)
        if not rows:
            outcomes[index] = exception.NotFound(f"no provider firewall rules for {step.cidr}")
            continue
        m.live_delta -= len(rows)
        change = Changes(generation - 1, generation, [], [rule_of(row) for row in rows])
        _audit(session, step.audit, "cidr.unblock", generation,
               {"cidr": step.cidr, "count": len(rows), "ids": [row.id for row in rows]})
        m.changed = True
        outcomes[index] = change
        changes.append(change)


def _sync_batch(session: Session, m: _Mutation, steps: list[tuple[int, "_SyncStep"]], now: datetime.datetime,
                outcomes: dict, changes: list[Changes], found: dict | None = None) -> None:
    """Small adds of distinct CIDRs: one look-up (and one read of their sources when some are live) for all,
    then one INSERT .. RETURNING and one of source rows for every add that only creates rules (a block of a
    CIDR not blocked yet).  An add that renews, gains a source or retires an expired copy is written on its
    own (``_sync_write``), against the same look-up.  Answers and errors are each add's as ``_sync_step``
    would give them."""
    if found is None:
        found = _existing_live(session, [spec for _, step in steps for spec in step.call.wanted])
    full = _source_rows(session, [rule_id for rule_id, _ in found.values()]) if found else {}
    make_held = sources_mod.Held
    creating: list[tuple[int, _SyncCall, sources_mod.Plan, _HeldRules]] = []
    for index, step in steps:
        call = step.call
        held = {spec: make_held(found[spec][0], spec, found[spec][1], full.get(found[spec][0]))
                for spec in call.wanted if spec in found}
        held_rules = _HeldRules(held, {}, call.wanted, 0)
        m.wrote = False
        try:
            plan = _sync_plan(m, call, now, held_rules)
        except _Unchanged as unchanged:
            outcomes[index] = _unchanged_result(call, m.generation - 1, unchanged)
            continue
        except exception.ProvfwError as exc:
            outcomes[index] = exc
            continue
        if len(plan.create) == len(call.wanted) and not (
                plan.retire or plan.delete or plan.source_insert or plan.source_update or plan.source_delete
                or plan.rule_expiry):
            m.live_delta += len(plan.create)     # now: the next add's max_rules check counts these rules
            creating.append((index, call, plan, held_rules))
            continue
        done = _sync_write(session, m, call, now, held_rules, plan)
        outcomes[index] = _done_result(call, m.generation, done)
        changes.append(done.changes)
    if not creating:
        return
    generation = m.generation
    values, owners = [], []
    for _, call, plan, _ in creating:
        actor = call.audit.actor if call.audit else call.created_by
        for spec in plan.create:
            values.append(dict(cidr=spec.cidr, ip_version=spec.version, protocol=spec.protocol,
                               from_port=spec.from_port, to_port=spec.to_port, description=call.description,
                               created_by=call.created_by, created_at=now, expires_at=call.expires_at,
                               created_generation=generation, deleted=0))
            owners.append((call.source, actor))
    m.wrote = m.changed = True
    inserted = iter(_defer_new_rules(session, values, owners, m.new_ids) if m.new_ids is not None else
                    _insert_new_rules(session.connection(), values, owners))
    for index, call, plan, held_rules in creating:
        rows = list(itertools.islice(inserted, len(plan.create)))
        created = dict(zip(plan.create, (row.id for row in rows)))
        change = _plan_changes(plan, held_rules.held, {}, created, generation, call.expires_at)
        _audit(session, call.audit, call.action, generation,
               _sync_detail(plan, call.source, call.mode, created, call.given - len(call.wanted), call.force,
                            call.audit_detail))
        read_back = {row.id: (row, [(call.source, row.expires_at)]) for row in rows}
        outcomes[index] = _done_result(call, generation, _SyncDone(plan, change, created, read_back))
        changes.append(change)


def _alone(operation: str, step: Step, notify: Callable[[Changes], bool] | None) -> tuple:
    """``step`` in a transaction of its own, then ``notify`` of its change; return (answer, notified or None)."""
    outcomes, change = _retried(operation, _commit_group, [step])
    if isinstance(outcomes[0], BaseException):
        raise outcomes[0]
    return outcomes[0], notify(change) if notify is not None and change is not None else None


def _mutate(operation: str, step: Step, notify: Callable[[Changes], bool] | None):
    """Run a mutation ``step``: through the group commit when the caller casts with ``notify``, else alone."""
    if notify is not None and _GROUP.accepts(True):
        return _GROUP.run(step, functools.partial(_alone, operation, step, notify), notify)[0]
    return _alone(operation, step, notify)[0]


class _Waiter:
    __slots__ = ("step", "alone", "notify", "done", "lead", "answer", "notified", "error")

    def __init__(self, step: Step, alone: Callable[[], tuple], notify: Callable[[Changes], bool]):
        self.step, self.alone, self.notify = step, alone, notify
        self.done = threading.Event()
        self.lead = False
        self.answer = self.notified = self.error = None


class GroupCommit:
    """Leader/follower group commit of the mutations that cast their change (the API's).

    Every mutation holds the generation row lock from its first statement to
    its COMMIT, so concurrent mutations queue on that lock, each paying a bump,
    a COMMIT (a WAL flush) and a cast, and under eventlet each round trip of
    the lock holder waits behind the other requests' CPU work.  Here the first
    caller leads: it runs every mutation queued by then (at most
    ``max_batch``) as steps of ONE transaction (``_commit_group``: one bump,
    one COMMIT), calls each distinct ``notify`` once with the merged change
    (``rules.merge_changes``: hosts get one cast per generation, as always),
    answers the callers, and hands the lead to the first caller that queued
    meanwhile.  The idea is PostgreSQL's own group commit (``commit_delay``),
    one level up, where the lock is.

    A step's error raised before it wrote (NotFound, DuplicateRule, the
    guards) answers its caller only.  Any other failure rolls the transaction
    back and every step of it runs again alone, so one caller's error never
    undoes another's change.  Only databases whose INSERT .. RETURNING
    answers rows in order (PostgreSQL, SQLite) group: elsewhere a created rule
    is found by its generation, which a group shares.

    Thread-safety: any number of threads or green threads call ``run``.
    """

    def __init__(self, max_batch: int = 64):
        self.max_batch = max_batch
        self._mutex = threading.Lock()
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._leading = False
        # Held by a leader from its COMMIT until its cast has left: the next group's transaction runs during
        # the cast's publisher confirm, and the casts still leave in commit order.
        self._casting = threading.Lock()

    def accepts(self, batchable: bool) -> bool:
        """Whether a call may group (``batchable``: small and without callbacks) on this database."""
        return (batchable and self.max_batch > 1
                and get_engine().dialect.insert_executemany_returning_sort_by_parameter_order)

    def run(self, step: Step, alone: Callable[[], tuple], notify: Callable[[Changes], bool]) -> tuple:
        """Run ``step`` in a group; return (its answer, what ``notify`` said or None); raise its error.

        ``alone()``: the same mutation in a transaction of its own, with its
        own notify, returning (answer, notified): the way out when the group's
        transaction failed.
        """
        waiter = _Waiter(step, alone, notify)
        with self._mutex:
            self._queue.append(waiter)
            lead = not self._leading
            self._leading = True
        if not lead:
            waiter.done.wait()
        if lead or waiter.lead:
            self._lead()
        if waiter.error is not None:
            raise waiter.error
        return waiter.answer, waiter.notified

    def _lead(self) -> None:
        """Commit a batch, hand the lead on, then cast the batch's change (the next group's transaction runs
        meanwhile: its four round trips cover the cast's publisher confirm) and answer the batch's callers."""
        with self._mutex:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        change = None
        try:
            change = self._commit(batch)
        finally:
            self._casting.acquire()        # the previous group's cast has left: casts go out in commit order
            with self._mutex:
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                    successor.done.set()
                else:
                    self._leading = False
            try:
                if change is not None:
                    self._notify(batch, change)
            finally:
                self._casting.release()
                for waiter in batch:
                    if waiter.answer is None and waiter.error is None:
                        waiter.error = exception.ProvfwError("the group commit was interrupted; try again")
                    waiter.done.set()

    def _commit(self, batch: list[_Waiter]) -> Changes | None:
        """Run the batch's steps in one transaction; set each waiter's answer or error; return the change to
        cast (None: nothing changed, or each step ran alone and cast its own)."""
        try:
            outcomes, change = _retried("group_commit", _commit_group, [waiter.step for waiter in batch])
        except Exception as exc:  # noqa: BLE001 - whatever spoiled the group, each mutation gets its own try
            if len(batch) > 1:
                LOG.warning("a group commit of %d mutations failed (%s: %s); running each alone", len(batch),
                            type(exc).__name__, exc)
            with self._casting:            # their casts, too, after the previous group's
                for waiter in batch:
                    try:
                        waiter.answer, waiter.notified = waiter.alone()
                    except Exception as own:  # noqa: BLE001 - handed to its caller
                        waiter.error = own
            return None
        for waiter, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                waiter.error = outcome
            else:
                waiter.answer = outcome
        return change

    @staticmethod
    def _notify(batch: list[_Waiter], change: Changes) -> None:
        """Cast ``change`` once per distinct ``notify`` among the batch's answered waiters; record what it said."""
        answered: list[tuple[Callable, bool]] = []
        for waiter in batch:
            if waiter.error is not None:
                continue
            for notify, said in answered:
                if notify == waiter.notify:
                    waiter.notified = said
                    break
            else:
                try:
                    waiter.notified = waiter.notify(change)
                except Exception:  # noqa: BLE001 - the change committed: its callers get their answers anyway
                    LOG.exception("notifying generation %s failed; workers will pick it up on their next periodic "
                                  "check", change.generation)
                    waiter.notified = False
                answered.append((waiter.notify, waiter.notified))


_GROUP = GroupCommit()


def _live():
    return ProviderFirewallRule.deleted == 0


def _not_expired(now: datetime.datetime):
    return sa.or_(ProviderFirewallRule.expires_at.is_(None), ProviderFirewallRule.expires_at > now)


def _in_force(now: datetime.datetime):
    """Live and not yet expired: what the API shows.  An expired row stays live (deleted = 0) until the purge
    retires it, but no host enforces it from its expiry on, so from then on no listing shows it either."""
    return sa.and_(_live(), _not_expired(now))


MAX_ID = 2**63 - 1


def _storable_id(value) -> bool:
    # SQLite raises OverflowError binding an integer past 64 bits (PostgreSQL and MariaDB find nothing):
    # an id no row can have is simply not found, the same on every database.
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


# --------------------------------------------------------------------------- rules

@dataclasses.dataclass(frozen=True)
class Unblocked(Changes):
    """What ``provider_fw_rule_destroy_by_cidr`` changed, and ``kept``: how many of the CIDR's rules that
    ``source`` let go stay, because another source still wants them (0 when every source lets go).

    ``added`` alone cannot say it: it names only the kept rules whose effective expiry moved.
    """

    kept: int = 0


@dataclasses.dataclass(frozen=True)
class SyncResult:
    """What one add or replace of a source's rules did (or, with ``dry_run``, would do).

    Counts: ``added`` rules created; ``renewed`` live rules whose expiry this
    call moved later; ``duplicate`` live rules whose expiry did not move;
    ``removed`` rules the source let go (replace); ``deleted`` rules that went
    away because no source wants them any more (<= removed, plus expired
    copies retired to make room).  ``changes`` is what hosts are told
    (created and renewed or shortened rules in ``added``, deleted in
    ``removed``); ``generation`` is the new generation, or the current one
    when nothing changed (``changed`` False) or for a dry run.  ``preview``
    names the specs behind added / renewed / removed, at most ``PREVIEW_LIMIT``
    each.  ``unchanged``: wanted specs this source already wanted at least as
    long (the call changed nothing for them), listed in full for calls of at
    most BULK_THRESHOLD specs (larger ones may only count some of them in
    ``duplicate``: ``_held_rules``).  ``rule_ids``: the live rule of every
    wanted spec, for calls of at most BULK_THRESHOLD specs (empty for larger
    ones and for a dry run).
    """

    source: str
    mode: str
    generation: int
    changed: bool
    dry_run: bool
    added: int
    renewed: int
    duplicate: int
    removed: int
    deleted: int
    changes: Changes
    guard: sources_mod.GuardReport | None
    preview: dict[str, list[rules_mod.RuleSpec]]
    unchanged: list[rules_mod.RuleSpec]
    rule_ids: dict[rules_mod.RuleSpec, int]
    # id -> (rule row, [(source, expires_at)]) of the wanted rules, read in the sync's own transaction, for
    # calls of at most READ_BACK_LIMIT specs (an API create answers with them without another session).
    rules: dict[int, tuple] = dataclasses.field(default_factory=dict)
    # What ``notify`` answered for the committed change (None: not called - nothing changed, or no notify).
    notified: bool | None = None

    def counts(self) -> dict[str, int]:
        return {"added": self.added, "renewed": self.renewed, "duplicate": self.duplicate, "removed": self.removed,
                "deleted": self.deleted}


PREVIEW_LIMIT = 1000
READ_BACK_LIMIT = 16
_SMALL = 1000      # an add of at most this many specs looks its rules up by spec, not by source


def provider_fw_rule_create(spec: rules_mod.RuleSpec, description: str | None = None, created_by: str | None = None,
                            expires_at: datetime.datetime | None = None, audit: Audit | None = None,
                            max_rules: int | None = None,
                            source: str = sources_mod.MANUAL) -> tuple[ProviderFirewallRule, int]:
    """Create one rule, or renew it / add ``source`` to it; return (the live rule, generation).

    Raise DuplicateRule when ``source`` already wants the live rule at least as long (nothing changed).
    """
    result = provider_fw_rules_create_many([spec], description, created_by, expires_at, audit, max_rules,
                                           source=source)
    rows = result.added or result.renewed or result.kept
    if not rows:
        raise exception.DuplicateRule(spec)
    return rows[0], result.generation


def provider_fw_rules_create_many(specs: Sequence[rules_mod.RuleSpec], description: str | None = None,
                                  created_by: str | None = None, expires_at: datetime.datetime | None = None,
                                  audit: Audit | None = None, max_rules: int | None = None,
                                  action: str = "rule.create", source: str = sources_mod.MANUAL) -> CreateResult:
    """Make ``source`` want every spec until ``expires_at``, in ONE transaction and ONE generation.

    Specs not live are created; live ones are renewed when the expiry is
    later than the rule's, and gain ``source`` if they lacked it.  When
    nothing changes the transaction is rolled back and the generation stays.
    Small calls (at most BULK_THRESHOLD new rules) return the rows; larger
    ones only count them.  See CreateResult.
    """
    result = provider_fw_rules_sync(source, specs, expires_at=expires_at, description=description,
                                    created_by=created_by, audit=audit, max_rules=max_rules, action=action)
    small = len(result.rule_ids) <= BULK_THRESHOLD
    renewed_ids = {result.rule_ids[s] for s in result.preview["renewed"] if s in result.rule_ids} if small else set()
    unchanged = set(result.unchanged)
    rows = provider_fw_rule_get_many(list(result.rule_ids.values())) if small and result.changed else []
    fresh = {row.id for row in rows if row.created_generation == result.generation}
    return CreateResult(
        generation=result.generation,
        added=[row for row in rows if row.id in fresh],
        duplicates=[s for s in dict.fromkeys(specs) if s in unchanged],
        added_count=result.added,
        retired=[r for r in result.changes.removed],
        renewed=[row for row in rows if row.id in renewed_ids and row.id not in fresh],
        kept=[row for row in rows if row.id not in fresh and row.id not in renewed_ids
              and _spec_of(row) not in unchanged],
        changes=result.changes,
        renewed_count=result.renewed,
    )


def provider_fw_rules_sync(source: str, specs: Sequence[rules_mod.RuleSpec], *, mode: str = "add",
                           expires_at: datetime.datetime | None = None, description: str | None = None,
                           created_by: str | None = None, audit: Audit | None = None, max_rules: int | None = None,
                           action: str = "rule.import", guard: sources_mod.Guard | None = None, force: bool = False,
                           dry_run: bool = False, renew_slack: float = 0.0, audit_detail: dict | None = None,
                           notify: Callable[[Changes], bool] | None = None,
                           _before: Callable[[Session, datetime.datetime], None] | None = None,
                           _after: Callable[[Session, int, sources_mod.Plan], None] | None = None) -> SyncResult:
    """Add ``specs`` to ``source`` (``mode="add"``) or make them its exact list (``mode="replace"``).

    ONE transaction, ONE generation, whatever the size: rules created,
    renewed, released by the source (deleted when no other source wants
    them, their expiry shortened to the latest remaining wish otherwise).
    Other sources' rules are untouched.  ``renew_slack`` (seconds): a live
    rule is renewed only when the new expiry is later by more than this.

    Raises ReplaceGuardTripped (409) when a replace would stop more of the
    source's rules in force than ``guard`` allows, unless ``force`` (a dry
    run reports the guard instead); RuleLimitExceeded (409) past
    ``max_rules``.  With ``dry_run`` nothing is written and the counts say
    what would happen.  When nothing would change the transaction is rolled
    back and the generation stays.

    ``notify(changes) -> bool`` (the compute API's cast): called once the
    change committed, its answer in ``SyncResult.notified``.  A small add
    (at most READ_BACK_LIMIT specs) with ``notify`` goes through the group
    commit (``GroupCommit``): it may share its transaction, generation and
    cast with other mutations made at the same moment, and ``notify`` then
    receives their merged change.

    ``_before(session, now)`` and ``_after(session, generation, plan)``
    run inside the same transaction (the feeds' claim check and state); with
    ``_after`` an unchanged sync still commits what it wrote, the generation
    left as it was.
    """
    if mode not in ("add", "replace"):
        raise exception.InvalidInput("mode", f"{mode!r} is not 'add' or 'replace'")
    call = _SyncCall(source, list(dict.fromkeys(specs)), len(specs), mode, expires_at, description, created_by, audit,
                     max_rules, action, guard, force, dry_run, renew_slack, audit_detail, _before, _after)
    if notify is not None and _GROUP.accepts(call.batchable):
        result, notified = _GROUP.run(_SyncStep(call),
                                      functools.partial(_sync_alone_answer, call, notify), notify)
        return dataclasses.replace(result, notified=notified) if result.changed else result
    return _sync_alone(call, notify)


@dataclasses.dataclass(frozen=True)
class _SyncCall:
    """The arguments of one ``provider_fw_rules_sync`` (``wanted``: the specs without repeats)."""

    source: str
    wanted: list[rules_mod.RuleSpec]
    given: int
    mode: str
    expires_at: datetime.datetime | None
    description: str | None
    created_by: str | None
    audit: Audit | None
    max_rules: int | None
    action: str
    guard: sources_mod.Guard | None
    force: bool
    dry_run: bool
    renew_slack: float
    audit_detail: dict | None
    before: Callable[[Session, datetime.datetime], None] | None
    after: Callable[[Session, int, sources_mod.Plan], None] | None

    @property
    def replace(self) -> bool:
        return self.mode == "replace"

    @property
    def batchable(self) -> bool:
        """A small add (no dry run, no feed callbacks): may share a transaction with other mutations.  Not a
        replace, which removes whatever its source held (a replace with an empty list wipes 120k rules)."""
        return (self.mode == "add" and len(self.wanted) <= READ_BACK_LIMIT and not self.dry_run
                and self.before is None and self.after is None)


@dataclasses.dataclass
class _SyncDone:
    """What ``_sync_in`` did inside the transaction."""

    plan: sources_mod.Plan
    changes: Changes
    ids: dict
    read_back: dict


def _sync_in(session: Session, m: "_Mutation", call: _SyncCall, now: datetime.datetime) -> _SyncDone:
    """Plan and write ``call`` inside the caller's transaction (which holds the generation row lock, ``m``).

    Raises ``_Unchanged`` - before writing anything - for a dry run or when
    nothing changes (unless ``call.after``); ReplaceGuardTripped and
    RuleLimitExceeded, also before writing.
    """
    if call.before is not None:
        call.before(session, now)
    held_rules = _held_rules(session, call.source, call.wanted, call.replace or len(call.wanted) > _SMALL, m.live)
    return _sync_write(session, m, call, now, held_rules, _sync_plan(m, call, now, held_rules))


def _sync_plan(m: "_Mutation", call: _SyncCall, now: datetime.datetime, held_rules: "_HeldRules") -> sources_mod.Plan:
    """``call``'s plan against what ``_held_rules`` read (no statement); raise as ``_sync_in`` does."""
    held, own, planned, settled = held_rules
    plan = sources_mod.plan_sync(call.source, planned, call.expires_at, held, now, call.replace, call.renew_slack,
                                 call.guard, own if own else None, settled)
    if call.replace and plan.guard is not None and plan.guard.tripped and not call.force and not call.dry_run:
        raise exception.ReplaceGuardTripped(call.source, plan.guard.in_force, plan.guard.removing,
                                            plan.guard.max_fraction)
    if call.max_rules is not None and plan.create:
        live = m.live - len(plan.retire) - len(plan.delete)
        if live + len(plan.create) > call.max_rules:
            raise exception.RuleLimitExceeded(
                f"max_rules: {live} live + {len(plan.create)} new exceeds the limit of {call.max_rules}")
    if call.dry_run or not plan.changes_anything and call.after is None:
        raise _Unchanged(plan, held, own)
    return plan


def _sync_write(session: Session, m: "_Mutation", call: _SyncCall, now: datetime.datetime,
                held_rules: "_HeldRules", plan: sources_mod.Plan) -> _SyncDone:
    """Write ``plan`` (``_sync_plan``'s) and say what it did: the second half of ``_sync_in``."""
    source, wanted = call.source, call.wanted
    held, own = held_rules.held, held_rules.own
    new_rows: dict = {}
    generation = m.generation
    if plan.changes_anything:
        m.wrote = m.changed = True
        actor = call.audit.actor if call.audit else call.created_by
        created = _write_plan(session, m, plan, source, now, call.expires_at, call.description, call.created_by,
                              actor, new_rows)
        changes = _plan_changes(plan, held, own, created, generation, call.expires_at)
        _audit(session, call.audit, call.action, generation,
               _sync_detail(plan, source, call.mode, created, call.given - len(wanted), call.force,
                            call.audit_detail))
    else:
        # Nothing for the rules; undo our bump (we still hold the row lock), commit what `after` writes.
        session.execute(update(FirewallGeneration).where(FirewallGeneration.id == 1)
                        .values(generation=FirewallGeneration.generation - 1))
        m.generation = generation = generation - 1
        created, changes = {}, Changes(generation, generation, [], [])
    if call.after is not None:
        m.wrote = True
        call.after(session, generation, plan)
    ids: dict = {}
    if len(wanted) <= BULK_THRESHOLD:
        ids = _rule_ids(wanted, held, own, {h.rule_id for h in plan.retire})
        ids.update(created)
    read_back: dict = {}
    if len(wanted) <= READ_BACK_LIMIT:
        # A rule this call created has one source, this one, with the rule's own expiry (the source row was
        # copied from it); only rules that existed before are read back.
        read_back = {rule_id: (new_rows[rule_id], [(source, new_rows[rule_id].expires_at)])
                     for rule_id in ids.values() if rule_id in new_rows}
        read_back.update(_rules_with_sources(
            session, [rule_id for rule_id in ids.values() if rule_id not in new_rows]))
    return _SyncDone(plan, changes, ids, read_back)


def _unchanged_result(call: _SyncCall, generation: int, unchanged: "_Unchanged") -> SyncResult:
    """The answer of a sync that changed nothing (or a dry run): ``generation`` is the one in force."""
    ids = {} if call.dry_run or len(call.wanted) > BULK_THRESHOLD else \
        _rule_ids(call.wanted, unchanged.held, unchanged.own)
    return _sync_result(call.source, call.mode, generation, False, call.dry_run, unchanged.plan,
                        Changes(generation, generation, [], []), ids)


def _done_result(call: _SyncCall, generation: int, done: _SyncDone) -> SyncResult:
    result = _sync_result(call.source, call.mode, generation, done.plan.changes_anything, False, done.plan,
                          done.changes, done.ids)
    result.rules.update(done.read_back)
    return result


def _sync_step(call: _SyncCall, session: Session, m: "_Mutation") -> tuple[SyncResult, Changes | None]:
    """``provider_fw_rules_sync`` as a step of a group commit: (result, change or None)."""
    try:
        done = _sync_in(session, m, call, _now())
    except _Unchanged as unchanged:
        return _unchanged_result(call, m.generation - 1, unchanged), None
    return _done_result(call, m.generation, done), done.changes if done.plan.changes_anything else None


def _sync_alone_answer(call: _SyncCall, notify: Callable[[Changes], bool]) -> tuple[SyncResult, bool | None]:
    result = _sync_alone(call, notify)
    return result, result.notified


def _sync_alone(call: _SyncCall, notify: Callable[[Changes], bool] | None = None) -> SyncResult:
    """``provider_fw_rules_sync`` in a transaction of its own (then ``notify``, when the change committed)."""
    result = _retried("provider_fw_rules_sync", _sync_once, call)
    if notify is not None and result.changed:
        return dataclasses.replace(result, notified=notify(result.changes))
    return result


def _sync_once(call: _SyncCall) -> SyncResult:
    # A large sync allocates per entry (rows read back, the plan): gcpause says why the collector waits.
    with gcpause.paused() if len(call.wanted) > BULK_THRESHOLD else contextlib.nullcontext():
        now = _now()
        with _session() as session:
            try:
                with session.begin():
                    m = _Mutation(*_bump_generation(session))
                    done = _sync_in(session, m, call, now)
                    _adjust_live_rules(session, m.live_delta)
            except _Unchanged as unchanged:
                return _unchanged_result(call, m.generation - 1, unchanged)
            except sa_exc.IntegrityError as exc:
                # Mutations serialise on the generation row, so only a writer that does not (a previous
                # release during an upgrade) can race us to a live copy; anything else is a server error.
                with _session() as check:
                    raced = _existing_live(check, call.wanted)
                if raced:
                    LOG.debug("sync raced with another writer: %s", exc)
                    raise exception.DuplicateRule(call.wanted[0] if len(call.wanted) == 1 else None) from None
                raise exception.ProvfwError(f"the database refused the change: {exc.orig}") from exc
        return _done_result(call, m.generation, done)


def _sync_detail(plan: sources_mod.Plan, source: str, mode: str, created: dict, repeated: int, force: bool,
                 extra: dict | None) -> dict:
    """The audit record's detail of one sync."""
    detail: dict = {"source": source, "mode": mode, "count": len(created), "renewed": len(plan.renewed)}
    if mode == "replace":
        detail.update(removed=len(plan.removed), deleted=len(plan.delete))
        if force and plan.guard is not None and plan.guard.tripped:
            detail["forced_past_guard"] = plan.guard.as_dict()
    if created and len(created) <= 10:
        detail["rules"] = [{"id": rule_id, **spec.as_dict()} for spec, rule_id in created.items()]
    if plan.duplicates or repeated:
        detail["duplicates"] = plan.duplicates + repeated
    if plan.retire:
        detail["retired_expired"] = len(plan.retire)
    detail.update(extra or {})
    return detail


class _Unchanged(Exception):
    """Roll the transaction back: a dry run, or nothing to change (raised before anything was written)."""

    def __init__(self, plan: sources_mod.Plan, held: dict, own: dict):
        self.plan = plan
        self.held = held
        self.own = own


def _sync_result(source, mode, generation, changed, dry_run, plan: sources_mod.Plan, changes: Changes,
                 ids: dict) -> SyncResult:
    return SyncResult(
        source=source, mode=mode, generation=generation, changed=changed, dry_run=dry_run,
        added=len(plan.create), renewed=len(plan.renewed), duplicate=plan.duplicates, removed=len(plan.removed),
        deleted=len(plan.delete) + len(plan.retire), changes=changes, guard=plan.guard,
        preview={"added": plan.create[:PREVIEW_LIMIT], "renewed": plan.renewed[:PREVIEW_LIMIT],
                 "removed": plan.removed[:PREVIEW_LIMIT]},
        unchanged=list(plan.unchanged), rule_ids=ids)


class _HeldRules(NamedTuple):
    """What ``_held_rules`` read: the planner's ``held`` and ``own``, the wanted specs left to plan, and how
    many wanted specs the source already holds for good (``settled``, see ``sources.plan_sync``)."""

    held: dict
    own: dict
    wanted: list
    settled: int


def _held_rules(session: Session, source: str, wanted: list[rules_mod.RuleSpec], by_source: bool,
                live: int | None = None) -> _HeldRules:
    """What the planner needs to know of the live rules a sync touches (``sources.plan_sync``'s arguments).

    ``by_source``: read every rule ``source`` holds with one indexed query
    (a replace, or a large add that is usually a re-import) into ``own``, as
    the database's rows (``sources.OwnRow``, keyed by their spec's fields),
    then look up only the wanted specs the source does not hold.  Rules that
    may lose the source, and rules found by spec, go into ``held`` with every
    source row.  At 120k rules a replace is mostly this read: the rows are
    Core rows, kept as they come (no Python object per row beyond the key).

    A list of more than BULK_THRESHOLD specs that share one protocol and port
    range (an import: ``importer.template``) is first split by CIDR with set
    operations: the wanted rules the source already holds with neither the
    rule nor the source's wish expiring are ``settled`` (the plan leaves them
    as they are, whatever the new expiry) and stay out of ``wanted`` and
    ``own``.  A replace with 1 % churn then plans the 2 % that change instead
    of 120k entries (``plan_sync`` 0.21 s -> 0.01 s; docs/feeds.md).
    """
    held: dict[rules_mod.RuleSpec, sources_mod.Held] = {}
    own: dict[tuple, tuple] = {}
    make_held = sources_mod.Held
    settled = 0
    leaving_for_good: list[rules_mod.RuleSpec] = []
    if by_source:
        template = _shared_template(wanted) if len(wanted) > _SETTLE_ABOVE else None
        if template is None:
            rows = _all_tuples(session.connection(), _own_rows(source))
        else:
            # One CIDR is one spec here, so sets of CIDRs find the rules that stay as they are.
            for_good, rows = _own_rows_split(session.connection(), source, template)
            wanted_cidrs = set(map(_CIDR, wanted))
            # Set operations over 120k CIDRs cost 20-35 ms each: the few that are not settled come out of one.
            rest = wanted_cidrs.difference(for_good)
            settled = len(wanted_cidrs) - len(rest)
            if settled:
                wanted = list(itertools.compress(wanted, map(rest.__contains__, map(_CIDR, wanted))))
            # The few held for good that leave: their ids come with the look-up below (a spec's live rule
            # is unique).
            leaving_for_good = [rules_mod.RuleSpec(cidr, *template) for cidr in for_good - wanted_cidrs]
        # Keyed by plain tuples: a RuleSpec is a tuple and finds them.
        own = {row[:4]: row for row in rows}
        lookup = [spec for spec in wanted if spec not in own]
    else:
        lookup = wanted
    found = _existing_live(session, leaving_for_good + lookup, live)
    for spec in leaving_for_good:
        hit = found.pop(spec, None)
        if hit is not None:
            own[tuple(spec)] = (*spec, hit[0], None, None)
    # One membership test per key (a set difference in C copies all 120k keys first: slower, measured).
    wanted_set = set(wanted) if own else frozenset()
    leaving = [row for key, row in own.items() if key not in wanted_set]
    full = _source_rows(session, [row[sources_mod.OWN_RULE_ID] for row in leaving]
                        + [rule_id for rule_id, _ in found.values()])
    spec_of = rules_mod.RuleSpec
    for row in leaving:
        rule_id = row[sources_mod.OWN_RULE_ID]
        held[row[:4]] = make_held(rule_id, spec_of(*row[:4]), row[sources_mod.OWN_EXPIRES], full[rule_id])
    for spec, (rule_id, expires) in found.items():
        held[spec] = make_held(rule_id, spec, expires, full.get(rule_id))
    return _HeldRules(held, own, wanted, settled)


#: Lists longer than this are split by CIDR first (``_held_rules``); BULK_THRESHOLD, above which a sync's answer
#: counts what it left unchanged instead of listing it.
_SETTLE_ABOVE = BULK_THRESHOLD
_CIDR = operator.itemgetter(0)


def _own_rows(source: str) -> sa.Select:
    """Every live rule ``source`` holds, as ``sources.OwnRow`` (spec fields, id, expiry, the source's own):
    read with ``_all_tuples`` (row by row costs 6 us a row)."""
    s, r = _SOURCES.c, _RULES.c
    return (select(r.cidr, r.protocol, r.from_port, r.to_port, r.id, r.expires_at, s.expires_at)
            .select_from(_SOURCES.join(_RULES, r.id == s.rule_id))
            .where(s.source == source, r.deleted == 0))


def _own_rows_split(connection: sa.Connection, source: str, template: tuple) -> tuple[set[str], list[tuple]]:
    """(CIDRs of the rules ``source`` holds for good with ``template``'s protocol and ports, ``OwnRow`` of
    the others).  For good: neither the rule nor the source's wish expires.

    On PostgreSQL one aggregate row: the CIDRs held for good as one text and how many others there are, which
    a second query reads only when there are any.  120k rows a source holds then cost no Python object each
    (0.1 s of fetch and dictionary less per replace of 120k entries, measured 2026-12-01), and the database
    runs two aggregates instead of eight (0.13 -> 0.09 s at 120k rules, measured 2026-12-01).  Elsewhere the
    rows with a mark.
    """
    s, r = _SOURCES.c, _RULES.c
    # Never NULL (protocol and ports are NOT NULL), so ~for_good is exactly the other rows.
    for_good = sa.and_(r.expires_at.is_(None), s.expires_at.is_(None), r.protocol == template[0],
                       r.from_port == template[1], r.to_port == template[2])
    if connection.dialect.name == "postgresql":
        statement = (select(func.string_agg(r.cidr, sa.literal("\n", sa.String)).filter(for_good),
                            func.count().filter(~for_good))
                     .select_from(_SOURCES.join(_RULES, r.id == s.rule_id))
                     .where(s.source == source, r.deleted == 0))
        text, others = _all_tuples(connection, statement)[0]
        rows = _all_tuples(connection, _own_rows(source).where(~for_good).order_by(r.id)) if others else []
        return set(text.split("\n")) if text else set(), list(rows)
    rows = _all_tuples(connection, _own_rows(source).add_columns(for_good))
    return {row[0] for row in rows if row[7]}, [row[:7] for row in rows if not row[7]]


_FIELDS = tuple(map(operator.itemgetter, range(1, 4)))


def _shared_template(specs: Sequence[rules_mod.RuleSpec]) -> tuple | None:
    """(protocol, from_port, to_port) when every spec has the same, else None."""
    template = []
    for field in _FIELDS:
        values = set(map(field, specs))
        if len(values) != 1:
            return None
        template.append(values.pop())
    return tuple(template)


def _rule_ids(specs: Iterable[rules_mod.RuleSpec], held: dict, own: dict, skip: set | frozenset = frozenset()) -> dict:
    """spec -> id of the live rule for each of ``specs`` that ``held`` or ``own`` has (not in ``skip``)."""
    ids = {}
    for spec in specs:
        rule = held.get(spec)
        if rule is not None:
            rule_id = rule.rule_id
        else:
            row = own.get(spec)
            if row is None:
                continue
            rule_id = row[sources_mod.OWN_RULE_ID]
        if rule_id not in skip:
            ids[spec] = rule_id
    return ids


def _rules_with_sources(session: Session, rule_ids: Sequence[int]) -> dict[int, tuple]:
    """rule_id -> (rule row, [(source, expires_at)] sorted by source) for a few live rules: one joined SELECT.

    A rule without source rows (from a release before sources) is ``[("manual", its expires_at)]``, as in
    ``provider_fw_rule_sources``.
    """
    if not rule_ids:
        return {}
    rows = session.connection().execute(_RULES_WITH_SOURCES, {"b_ids": list(rule_ids)}).all()
    found: dict[int, tuple] = {}
    for row in rows:
        rule, wants = found.setdefault(row.id, (row, []))
        if row.source_name is not None:
            wants.append((row.source_name, row.source_expires_at))
    for rule_id, (rule, wants) in found.items():
        if not wants:
            wants.append((sources_mod.MANUAL, rule.expires_at))
        wants.sort(key=lambda item: item[0])
    return found


def _source_rows(session: Session, rule_ids: Sequence[int]) -> dict[int, dict[str, datetime.datetime | None]]:
    """rule_id -> {source: expires_at} for the rules in ``rule_ids`` that have source rows."""
    found: dict[int, dict] = {}
    connection = session.connection()
    lists = _lists(connection)
    for start in range(0, len(rule_ids), lists.chunk):
        for rule_id, name, expires in connection.execute(lists.source_rows,
                                                         {"b_ids": list(rule_ids[start:start + lists.chunk])}):
            found.setdefault(rule_id, {})[name] = expires
    return found


def _write_plan(session: Session, m: "_Mutation", plan: sources_mod.Plan, source: str, now: datetime.datetime,
                expires_at, description, created_by, actor,
                new_rows: dict | None = None) -> dict[rules_mod.RuleSpec, int]:
    """Write ``plan`` inside the caller's transaction (``m``: its generation and live-rule count, which say
    whether the insert is large enough to refresh the tables' statistics, ``_worth_analyzing``, and which
    gets the plan's change to the live rules); return spec -> id of the rules created.

    ``new_rows``: filled with id -> the created rule's row as stored (every column), when the insert could
    answer them (at most BULK_THRESHOLD rules, on a database with ordered INSERT .. RETURNING).
    """
    generation, live = m.generation, m.live
    gone = [h.rule_id for h in plan.retire] + [h.rule_id for h in plan.delete]
    if plan.retire:
        _soft_delete(session, [h.rule_id for h in plan.retire], generation, now, "expiry")
    if plan.delete:
        _soft_delete(session, [h.rule_id for h in plan.delete], generation, now, actor)
    s = ProviderFirewallRuleSource.__table__
    deleting = {h.rule_id for h in plan.delete}
    dropped = [{"b_rule_id": rule_id, "b_source": name} for rule_id, name in plan.source_delete
               if rule_id not in deleting]
    if dropped:
        session.connection().execute(
            sa.delete(s).where(s.c.rule_id == sa.bindparam("b_rule_id"), s.c.source == sa.bindparam("b_source")),
            dropped)
    created: dict[rules_mod.RuleSpec, int] = {}
    if plan.create:
        r = ProviderFirewallRule
        mine = (r.created_generation == generation, r.deleted == 0)
        dialect = session.get_bind().dialect
        if len(plan.create) <= BULK_THRESHOLD and dialect.insert_executemany_returning_sort_by_parameter_order:
            values = [dict(cidr=spec.cidr, ip_version=spec.version, protocol=spec.protocol, from_port=spec.from_port,
                           to_port=spec.to_port, description=description, created_by=created_by, created_at=now,
                           expires_at=expires_at, created_generation=generation, deleted=0) for spec in plan.create]
            inserted = _insert_new_rules(session.connection(), values, [(source, actor)] * len(values))
            created.update(zip(plan.create, (row.id for row in inserted)))
            if new_rows is not None:
                new_rows.update((row.id, row) for row in inserted)
        else:
            rows = _RuleRows(plan.create, (description, created_by, now, expires_at, generation, 0))
            _bulk_insert(session, rows, len(plan.create), analyze=_worth_analyzing(len(plan.create), live))
            # Core rows and tuple.__new__ (RuleSpec's own __new__ is Python): this loop runs per new rule.
            new, spec_type = tuple.__new__, rules_mod.RuleSpec
            for rule_id, *spec in session.connection().execute(
                    select(r.id, r.cidr, r.protocol, r.from_port, r.to_port).where(*mine)).all():
                created[new(spec_type, spec)] = rule_id
            # One statement and nothing sent, where sending 120k rows as a COPY took longer than the server's
            # insert.  Alone in its generation: group_commit shares transactions only where RETURNING is used.
            session.connection().execute(_SOURCES_OF_NEW_RULES, {"b_source": source, "b_actor": actor,
                                                                 "b_generation": generation})
        if len(created) > BULK_THRESHOLD and dialect.name == "postgresql" and _worth_analyzing(len(created), live):
            session.connection().exec_driver_sql("ANALYZE provider_fw_rule_sources")   # as _bulk_insert does
    if plan.source_insert:
        inserts = ((rule_id, name, expires, now, actor) for rule_id, name, expires in plan.source_insert)
        _bulk_insert(session, inserts, len(plan.source_insert), ProviderFirewallRuleSource.__table__,
                     _SOURCE_COLUMNS, analyze=_worth_analyzing(len(plan.source_insert), live))
    if plan.source_update:
        session.connection().execute(
            update(s).where(s.c.rule_id == sa.bindparam("b_rule_id"), s.c.source == sa.bindparam("b_source"))
            .values(expires_at=sa.bindparam("b_expires"), updated_at=now),
            [{"b_rule_id": rule_id, "b_source": name, "b_expires": expires}
             for rule_id, name, expires in plan.source_update])
    if plan.rule_expiry:
        t = ProviderFirewallRule.__table__
        session.connection().execute(
            update(t).where(t.c.id == sa.bindparam("b_id"), t.c.deleted == 0)
            .values(expires_at=sa.bindparam("b_expires"), updated_generation=generation, updated_at=now),
            [{"b_id": rule_id, "b_expires": expires} for rule_id, expires in plan.rule_expiry.items()])
    m.live_delta += len(created) - len(gone)
    return created


# A rule row as stored, for rules written later in the transaction (``_defer_new_rules``): what RETURNING * answers.
_StoredRule = collections.namedtuple("_StoredRule", [column.key for column in _RULES.c])
_UNSET_COLUMNS = dict.fromkeys(("updated_at", "deleted_at", "deleted_by", "deleted_generation", "updated_generation"))


def _defer_new_rules(session: Session, values: list[dict], owners: list[tuple[str, str | None]],
                     ids: Iterator[int]) -> list:
    """``_insert_new_rules`` for a group whose rules are written with its COMMIT (PostgreSQL,
    ``_commit_riding``): give each row the next of ``ids`` and return the rows as they will be stored.

    Every column is known here: the values, the id, NULL for the rest (the table has no server defaults).
    No statement of the transaction may read the rules before COMMIT; ``_commit_group`` defers only when
    every step was batched, and a batch's steps touch disjoint CIDRs.
    """
    pending = session.info.setdefault("new_rules", [])
    rows = []
    for value, (source, actor) in zip(values, owners):
        row = {**value, "id": next(ids)}
        rows.append(_StoredRule(**_UNSET_COLUMNS, **row))
        pending.append({**row, "source": source, "actor": actor})
    return rows


def _insert_new_rules(connection: sa.Connection, values: list[dict], owners: list[tuple[str, str | None]]) -> list:
    """Insert the rule rows ``values`` and a source row for each; return the rows as stored, in order.

    ``owners``: (source, actor) of each row; ``values`` hold no spec twice.
    PostgreSQL: one statement (``_NEW_RULES_PG``).  SQLite: one INSERT ..
    RETURNING that answers the rows in the order of the values
    (``sort_by_parameter_order``) and one executemany of the source rows -
    by id, not by generation, since a group commit's other mutations create
    rules of the same generation.
    """
    if connection.dialect.name == "postgresql":
        rows = _json_rows([{**value, "source": source, "actor": actor}
                           for value, (source, actor) in zip(values, owners)])
        by_spec = {(row.cidr, row.protocol, row.from_port, row.to_port): row
                   for row in connection.execute(_NEW_RULES_PG, {"b_rows": rows})}
        return [by_spec[value["cidr"], value["protocol"], value["from_port"], value["to_port"]] for value in values]
    inserted = connection.execute(_INSERT_RULES_RETURNING, values).all()
    connection.execute(_INSERT_SOURCES, [
        {"rule_id": row.id, "source": source, "expires_at": row.expires_at, "created_at": row.created_at,
         "created_by": actor} for row, (source, actor) in zip(inserted, owners)])
    return inserted


def _plan_changes(plan: sources_mod.Plan, held: dict, own: dict, created: dict, generation: int,
                  expires_at) -> Changes:
    """The generation's delta as hosts receive it: rules created or with a new expiry, rules gone."""
    expiring = plan.rule_expiry
    spec_of: dict[int, tuple] = {}
    if expiring:
        spec_of = {h.rule_id: h.spec for h in held.values() if h.rule_id in expiring}
        spec_of.update((row[sources_mod.OWN_RULE_ID], row[:4]) for row in own.values()
                       if row[sources_mod.OWN_RULE_ID] in expiring)
    epoch = _epoch(expires_at)
    added = [rules_mod.Rule(rule_id, spec, epoch) for spec, rule_id in created.items()]
    added += [rules_mod.Rule(rule_id, rules_mod.RuleSpec(*spec_of[rule_id]), _epoch(expires))
              for rule_id, expires in expiring.items()]
    removed = [rules_mod.Rule(h.rule_id, h.spec, _epoch(h.expires_at)) for h in (*plan.retire, *plan.delete)]
    return Changes(generation - 1, generation, added, removed)


_BULK_COLUMNS = ("cidr", "ip_version", "protocol", "from_port", "to_port", "description", "created_by", "created_at",
                 "expires_at", "created_generation", "deleted")
_SOURCE_COLUMNS = ("rule_id", "source", "expires_at", "created_at", "created_by")


def _worth_analyzing(inserted: int, rows: int) -> bool:
    """Whether ``inserted`` new rows into a table of about ``rows`` change its statistics enough to refresh
    them inside the write: by a tenth or more, PostgreSQL's own threshold (``autovacuum_analyze_scale_factor``
    0.1).  Smaller inserts leave it to autovacuum: an ANALYZE of 120k rules costs 0.1 s, a tenth of a 1 %
    churn sync, and changes none of its plans."""
    return inserted * 10 >= rows + inserted


class _RuleRows:
    """The rule rows of a bulk insert, in ``_BULK_COLUMNS`` order: each spec's five columns, then ``tail``, the
    values every row of one insert shares (description, creator, times, generation, ``deleted``).

    Iterated, it gives tuples (the executemany batches); ``csv_chunks`` gives the COPY its CSV text with the
    tail rendered once and each spec's part formatted directly, which needs no quoting: a stored spec is a
    canonical CIDR (hex digits, ``.``, ``:``, ``/``), a protocol name and two integers (``provfw.rules``).
    For 120k rules, 0.09 s against 0.65 s through ``csv.writer`` (measured 2026-12-01), CPU the API process
    spent while PostgreSQL, on the same two cores, took the rows in.
    """

    def __init__(self, specs: Sequence[rules_mod.RuleSpec], tail: tuple):
        self._specs = specs
        self._tail = tail

    def __iter__(self) -> Iterator[tuple]:
        tail = self._tail
        return ((spec.cidr, spec.version, spec.protocol, spec.from_port, spec.to_port, *tail) for spec in self._specs)

    def csv_chunks(self, rows_per_chunk: int) -> Iterator[str]:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(self._tail)
        tail = buffer.getvalue()               # ends with the writer's line terminator
        specs = iter(self._specs)
        while chunk := list(itertools.islice(specs, rows_per_chunk)):
            yield "".join([f"{cidr},{6 if ':' in cidr else 4},{protocol},{from_port},{to_port},{tail}"
                           for cidr, protocol, from_port, to_port in chunk])


def _csv_chunks(rows: Iterable[Sequence], rows_per_chunk: int) -> Iterator[str]:
    """Any rows as CSV text, ``rows_per_chunk`` at a time (``csv.writer``: quoting, ``None`` as NULL)."""
    rows = iter(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    while batch := list(itertools.islice(rows, rows_per_chunk)):
        buffer.seek(0)
        buffer.truncate()
        writer.writerows(batch)
        yield buffer.getvalue()


def _bulk_insert(session: Session, rows: Iterable[Sequence], count: int, table: sa.Table = _RULES,
                 columns: Sequence[str] = _BULK_COLUMNS, analyze: bool = True) -> None:
    """Insert ``count`` rows (tuples in ``columns`` order, or ``_RuleRows``) into ``table`` (default: rule rows)
    without reading them back (ids: select by created_generation).

    PostgreSQL gets one COPY past BULK_THRESHOLD rows (about 4x faster than
    multi-row INSERTs for an import of 120k rules), and with ``analyze`` the
    table's statistics are refreshed afterwards, so the planner keeps using
    the generation indexes for deltas instead of scanning a table it still
    believes empty.  Other databases get Core executemany batches.  Either
    way it runs inside the caller's transaction.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql" and count > BULK_THRESHOLD:
        _copy(connection, table.name, columns, rows)
        if analyze:
            connection.exec_driver_sql(f"ANALYZE {table.name}")
        return
    rows = iter(rows)
    while batch := [dict(zip(columns, row)) for row in itertools.islice(rows, 5000)]:
        session.execute(table.insert(), batch)


class _CsvStream:
    """The file ``copy_expert`` reads: CSV made COPY_CHUNK_ROWS rows at a time, as PostgreSQL asks for more.

    Written whole beforehand, 120k rule rows took 0.4 s of Python before the server saw the first one; made
    as it reads, the Python work overlaps the server's insert, which runs in its own process.  ``None`` is
    written as an empty unquoted field: NULL in COPY's CSV format.  ``_RuleRows`` render their own chunks.
    """

    COPY_CHUNK_ROWS = 4096

    def __init__(self, rows: Iterable[Sequence]):
        render = getattr(rows, "csv_chunks", None)
        self._chunks = render(self.COPY_CHUNK_ROWS) if render else _csv_chunks(rows, self.COPY_CHUNK_ROWS)

    def read(self, _size: int = -1) -> str:
        return next(self._chunks, "")


# psycopg2's wait callback is one for the process: two threads that each set it aside for a COPY and put back
# what they found could leave it unset for good, so they take turns.
_COPY_LOCK = threading.Lock()


def _copy(connection, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    import psycopg2.extensions

    # psycopg2 runs through a wait callback (provfw.cmd.psycopg_wait: under
    # eventlet, and under a threaded WSGI server), and COPY refuses to run with
    # one set.  Under eventlet the COPY then blocks this process for its ~1 s
    # at 120k rows instead of ~5 s of green multi-row INSERTs; other threads'
    # statements meanwhile wait without the callback's time limit.
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        with _COPY_LOCK:
            wait_callback = psycopg2.extensions.get_wait_callback()
            psycopg2.extensions.set_wait_callback(None)
            try:
                cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)",
                                   _CsvStream(rows))
            finally:
                psycopg2.extensions.set_wait_callback(wait_callback)
    finally:
        cursor.close()


def _existing_live(session: Session, specs: Sequence[rules_mod.RuleSpec], live: int | None = None) -> dict:
    """Map each spec in ``specs`` that is live to (id, expires_at).

    ``live``: the live-rule counter, when the caller holds it.  When the table
    has fewer than twice as many live rules as there are specs to look up (a
    first import, an import into a small table), one scan of the live rules
    is cheaper than the look-ups by CIDR in batches of 1,000 (0.7 s for 120k
    specs on PostgreSQL against 0.1 s to scan an empty table; the counter only
    picks the method, the answer is the same either way).
    """
    found: dict = {}
    if not specs:
        return found
    cols = (ProviderFirewallRule.id, ProviderFirewallRule.cidr, ProviderFirewallRule.protocol,
            ProviderFirewallRule.from_port, ProviderFirewallRule.to_port, ProviderFirewallRule.expires_at)
    if live is not None and live < 2 * len(specs) and len(specs) > _SMALL:
        wanted = set(specs)
        for row in session.execute(select(*cols).where(_live())):
            spec = _spec_of(row)
            if spec in wanted:
                found[spec] = (row.id, row.expires_at)
        return found
    by_cidr: dict[str, set] = {}
    for spec in specs:
        by_cidr.setdefault(spec.cidr, set()).add(spec)
    cidrs = list(by_cidr)
    connection = session.connection()
    lists = _lists(connection)
    for start in range(0, len(cidrs), lists.chunk):
        for row in connection.execute(lists.live_by_cidrs, {"b_cidrs": cidrs[start:start + lists.chunk]}):
            spec = _spec_of(row)
            if spec in by_cidr.get(spec.cidr, ()):
                found[spec] = (row.id, row.expires_at)
    return found


def _soft_delete(session: Session, ids: Iterable[int], generation: int, now: datetime.datetime,
                 deleted_by: str | None) -> int:
    """Soft-delete the live rules ``ids`` and forget their sources; return how many were live."""
    ids = list(ids)
    count = 0
    connection = session.connection()
    lists = _lists(connection)
    for start in range(0, len(ids), lists.chunk):
        chunk = ids[start:start + lists.chunk]
        count += connection.execute(lists.soft_delete, {"b_ids": chunk, "b_now": now, "b_generation": generation,
                                                        "b_actor": deleted_by}).rowcount
        connection.execute(lists.forget_sources, {"b_ids": chunk})
    return count


def provider_fw_rule_get(rule_id: int) -> ProviderFirewallRule:
    """Return the live, unexpired rule ``rule_id`` or raise RuleNotFound."""
    if not _storable_id(rule_id):
        raise exception.RuleNotFound(rule_id)
    with _session() as session:
        row = session.scalars(select(ProviderFirewallRule)
                              .where(ProviderFirewallRule.id == rule_id, _in_force(_now()))).first()
    if row is None:
        raise exception.RuleNotFound(rule_id)
    return row


def provider_fw_rule_get_many(rule_ids: Sequence[int]) -> list[ProviderFirewallRule]:
    """The live rules among ``rule_ids``, ordered by id."""
    rows: list[ProviderFirewallRule] = []
    with _session() as session:
        for start in range(0, len(rule_ids), 1000):
            rows += session.scalars(select(ProviderFirewallRule).where(
                ProviderFirewallRule.id.in_(list(rule_ids[start:start + 1000])), _live()))
    return sorted(rows, key=lambda row: row.id)


def _has_source(source: str):
    """Rules ``source`` wants; ``manual`` also matches rules without any source row (older releases)."""
    s = ProviderFirewallRuleSource
    mine = sa.exists().where(s.rule_id == ProviderFirewallRule.id, s.source == source)
    if source == sources_mod.MANUAL:
        return sa.or_(mine, ~sa.exists().where(s.rule_id == ProviderFirewallRule.id))
    return mine


def provider_fw_rule_get_all(cidr: str | None = None, protocol: str | None = None, limit: int | None = None,
                             marker: int | None = None, source: str | None = None,
                             within: rules_mod.Network | None = None) -> list[ProviderFirewallRule]:
    """Live, unexpired rules ordered by id; ``marker`` is the last id of the previous page; ``source`` filters;
    ``within``: only rules whose network lies inside that network, itself included (``_within_v4``; IPv6 is
    tested row by row, ``_first_within``)."""
    query = select(ProviderFirewallRule).where(_in_force(_now())).order_by(ProviderFirewallRule.id)
    if cidr is not None:
        query = query.where(ProviderFirewallRule.cidr == cidr)
    if protocol is not None:
        query = query.where(ProviderFirewallRule.protocol == protocol)
    if source is not None:
        query = query.where(_has_source(source))
    if marker is not None:
        query = query.where(ProviderFirewallRule.id > min(marker, MAX_ID))
    if within is not None and within.version == 6:
        return _first_within(query.where(ProviderFirewallRule.ip_version == 6), within, limit)
    if within is not None:
        query = query.where(_within_v4(within))
    if limit is not None:
        query = query.limit(limit)
    with _session() as session:
        return list(session.scalars(query))


def _supernets(network: rules_mod.Network) -> list[str]:
    """``network`` and every network containing it down to /1, narrowest first, as stored (normalised text)."""
    return [network.supernet(new_prefix=prefix).with_prefixlen for prefix in range(network.prefixlen, 0, -1)]


def _within_v4(network: ipaddress.IPv4Network):
    """One exact condition, the same on every database: the rule's IPv4 network lies inside ``network``.

    CIDRs are stored normalised (``a.b.c.d/len``), so a network inside a /p starts with one of at most 128
    texts: the first p // 8 octets, then each value the next octet takes inside the /p (``10.16.`` ..
    ``10.31.`` for 10.16.0.0/12; a fourth octet is followed by ``/``).  The only other rules that start so
    are wider than /p, and those contain the network: its supernets, at most 31 values, excluded by value.
    ``LIKE`` with a fixed prefix means the same under every collation; a range over the text would not.
    """
    octets = str(network.network_address).split(".")
    full, rest = divmod(network.prefixlen, 8)
    r = ProviderFirewallRule
    if full == 4:
        return r.cidr == network.with_prefixlen
    if rest == 0:
        starts = [".".join(octets[:full]) + "."]
    else:
        first = int(octets[full])
        tail = "." if full < 3 else "/"
        starts = [".".join(octets[:full] + [str(value)]) + tail for value in range(first, first + 2 ** (8 - rest))]
    wider = _supernets(network)[1:]
    return sa.and_(r.ip_version == 4, sa.or_(*(r.cidr.like(start + "%") for start in starts)),
                   r.cidr.not_in(wider))


def _first_within(query, network: ipaddress.IPv6Network, limit: int | None) -> list[ProviderFirewallRule]:
    """The first ``limit`` rows of ``query`` (IPv6 rules in id order) whose network lies inside ``network``.

    Compressed IPv6 text has no usable prefix (``2001:0:0:1:1:1:1:5`` is stored as ``2001::1:1:1:1:5``), so
    the rows are read 1,000 a round trip and tested here until the page is full: linear in the IPv6 rules
    past the marker, a diagnostic's cost (block lists are mostly IPv4), not a hot path.
    """
    found: list[ProviderFirewallRule] = []
    with _session() as session:
        for row in session.scalars(query.execution_options(yield_per=1000)):
            if ipaddress.IPv6Network(row.cidr).subnet_of(network):
                found.append(row)
                if limit is not None and len(found) >= limit:
                    break
    return found


def provider_fw_rule_get_containing(network: rules_mod.Network, protocol: str | None = None,
                                    source: str | None = None,
                                    now: datetime.datetime | None = None) -> list[ProviderFirewallRule]:
    """Live, unexpired rules whose network contains ``network`` (an address is a /32 or /128).

    Most specific first (longest prefix), then by id.  One query on the
    ``cidr`` index: the candidates are the network's supernets, at most 33
    (IPv4) or 129 (IPv6) strings, which works the same on every database
    because CIDRs are stored normalised.
    """
    candidates = _supernets(network)
    # "deleted + 0": an expression no index serves, so every database walks the cidr index (SQLite chose the
    # (deleted, expires_at) index for deleted = 0, which every live rule matches: 30 ms instead of 1 ms).
    query = select(ProviderFirewallRule).where(ProviderFirewallRule.cidr.in_(candidates),
                                               ProviderFirewallRule.deleted + 0 == 0, _not_expired(now or _now()))
    if protocol is not None:
        query = query.where(ProviderFirewallRule.protocol == protocol)
    if source is not None:
        query = query.where(_has_source(source))
    with _session() as session:
        rows = list(session.scalars(query))
    return sorted(rows, key=lambda row: (-int(row.cidr.rsplit("/", 1)[1]), row.id))


def provider_fw_rule_sources(rule_ids: Sequence[int]) -> dict[int, list[tuple[str, datetime.datetime | None]]]:
    """rule_id -> [(source, expires_at)] sorted by source, for live rules among ``rule_ids``.

    A rule without source rows (from a release before sources) is
    ``[("manual", its expires_at)]``.
    """
    ids = list(rule_ids)
    result: dict[int, list] = {}
    with _session() as session:
        found = _source_rows(session, ids)
        missing = [rule_id for rule_id in ids if rule_id not in found]
        legacy: dict[int, datetime.datetime | None] = {}
        for start in range(0, len(missing), 1000):
            legacy.update(session.execute(select(ProviderFirewallRule.id, ProviderFirewallRule.expires_at).where(
                ProviderFirewallRule.id.in_(missing[start:start + 1000]), _live())).all())
    for rule_id in ids:
        if rule_id in found:
            result[rule_id] = sorted(found[rule_id].items(), key=lambda item: item[0])
        elif rule_id in legacy:
            result[rule_id] = [(sources_mod.MANUAL, legacy[rule_id])]
    return result


def provider_fw_source_counts() -> list[tuple[str, int]]:
    """[(source, rules in force it wants)] for every source, sorted by name (older rules count as manual).

    Rules past their expiry are not counted, as no listing shows them (``_in_force``), whether or not the
    conductor's purge has retired them yet.
    """
    s, r = ProviderFirewallRuleSource, ProviderFirewallRule
    now = _now()
    with _session() as session:
        counts = dict(session.execute(select(s.source, func.count()).join(r, r.id == s.rule_id)
                                      .where(_in_force(now)).group_by(s.source)).all())
        legacy = session.execute(select(func.count()).select_from(r).where(
            _in_force(now), ~sa.exists().where(s.rule_id == r.id))).scalar_one()
    if legacy:
        counts[sources_mod.MANUAL] = counts.get(sources_mod.MANUAL, 0) + legacy
    return sorted(counts.items())


def provider_fw_rule_get_all_by_cidr(cidr: str) -> list[ProviderFirewallRule]:
    return provider_fw_rule_get_all(cidr=cidr)


def _release(session: Session, m: "_Mutation", rows: Sequence, source: str | None, now: datetime.datetime,
             actor: str | None) -> tuple[Changes, list[dict]]:
    """``source`` (None: every source) lets go of the live rules ``rows``; return (Changes, audit items)."""
    generation = m.generation
    full = _source_rows(session, [row.id for row in rows]) if source is not None else {}
    delete, shorten, items = [], {}, []
    for row in rows:
        held = sources_mod.Held(row.id, _spec_of(row), row.expires_at, full.get(row.id))
        gone, expires = sources_mod.release(source, held, now)
        if gone:
            delete.append(row)
        else:
            shorten[row.id] = (row, expires)
        items.append({"id": row.id, **_spec_of(row).as_dict(), **({} if gone else {"kept_by_other_sources": True})})
    m.wrote = True
    if delete:
        m.live_delta -= _soft_delete(session, [row.id for row in delete], generation, now, actor)
    if shorten:
        s = ProviderFirewallRuleSource.__table__
        t = ProviderFirewallRule.__table__
        for rule_id, (row, expires) in shorten.items():
            session.execute(sa.delete(s).where(s.c.rule_id == rule_id, s.c.source == source))
            if expires != row.expires_at:
                session.execute(update(t).where(t.c.id == rule_id).values(
                    expires_at=expires, updated_generation=generation, updated_at=now))
    added = [rules_mod.Rule(row.id, _spec_of(row), _epoch(expires)) for row, expires in shorten.values()
             if expires != row.expires_at]
    return Changes(generation - 1, generation, added, [rule_of(row) for row in delete]), items


def provider_fw_rule_destroy(rule_id: int, audit: Audit | None = None, source: str | None = None,
                             notify: Callable[[Changes], bool] | None = None) -> Changes:
    """Delete one live, unexpired rule, or with ``source`` only that source's wish for it; return the change.

    Without ``source`` the rule goes whoever wants it (a feed that still
    lists it adds it again on its next sync).  With ``source`` the rule
    stays while another source wants it (its expiry may become earlier: the
    latest remaining wish).  RuleNotFound if it is not live or has expired
    (already out of force; the purge retires its row); NotFound if it does
    not have ``source``.  ``notify``: as in ``provider_fw_rules_sync`` (the
    call may share a group commit).
    """
    if not _storable_id(rule_id):
        raise exception.RuleNotFound(rule_id)
    return _mutate("provider_fw_rule_destroy", functools.partial(_destroy_step, rule_id, audit, source), notify)


def _destroy_step(rule_id: int, audit: Audit | None, source: str | None, session: Session,
                  m: "_Mutation") -> tuple[Changes, Changes]:
    now = _now()
    row = session.connection().execute(_IN_FORCE_BY_ID, {"b_id": rule_id, "b_now": now}).first()
    if row is None:
        raise exception.RuleNotFound(rule_id)
    changes, items = _release(session, m, [row], source, now, audit.actor if audit else None)
    _audit(session, audit, "rule.delete", m.generation, {"rules": items, **({"source": source} if source else {})})
    m.changed = True
    return changes, changes


def provider_fw_rule_destroy_by_cidr(cidr: str, audit: Audit | None = None, source: str | None = None,
                                     notify: Callable[[Changes], bool] | None = None) -> Changes:
    """Delete every live, unexpired rule of ``cidr`` (with ``source``: that source's wish for each); return the change.

    NotFound when there is none (with ``source``: none that ``source`` wants).  ``notify``: as in
    ``provider_fw_rules_sync`` (the call may share a group commit).
    """
    return _mutate("provider_fw_rule_destroy_by_cidr", _UnblockStep(cidr, audit, source), notify)


def _destroy_by_cidr_step(cidr: str, audit: Audit | None, source: str | None, session: Session,
                          m: "_Mutation") -> tuple[Changes, Changes]:
    now = _now()
    generation = m.generation
    connection = session.connection()
    if source is None and connection.dialect.update_returning:
        # Every source lets go, so every rule found goes: one UPDATE .. RETURNING finds and retires them (on
        # PostgreSQL, and forgets their sources: _forgetting_sources).
        m.wrote = True
        rows = sorted(_retire_cidrs(connection, [cidr], now, generation, audit.actor if audit else None),
                      key=lambda row: row.id)
        if not rows:
            # Nothing was written: the UPDATE matched no row.
            m.wrote = False
            raise exception.NotFound(f"no provider firewall rules for {cidr}")
        m.live_delta -= len(rows)
        changes = Changes(generation - 1, generation, [], [rule_of(row) for row in rows])
        _audit(session, audit, "cidr.unblock", generation,
               {"cidr": cidr, "count": len(rows), "ids": [row.id for row in rows]})
        m.changed = True
        return changes, changes
    if source is None:
        rows = connection.execute(_IN_FORCE_BY_CIDR, {"b_cidr": cidr, "b_now": now}).all()
    else:
        rows = session.execute(select(*_WIRE_COLUMNS).where(ProviderFirewallRule.cidr == cidr, _in_force(now),
                                                            _has_source(source))
                               .order_by(ProviderFirewallRule.id)).all()
    if not rows:
        raise exception.NotFound(f"no provider firewall rules for {cidr}" + (f" from {source}" if source else ""))
    changes, items = _release(session, m, rows, source, now, audit.actor if audit else None)
    kept = len(rows) - len(changes.removed)
    _audit(session, audit, "cidr.unblock", generation,
           {"cidr": cidr, "count": len(changes.removed), "ids": [row.id for row in rows],
            **({"source": source, "kept": kept} if source else {})})
    m.changed = True
    return Unblocked(changes.since, changes.generation, changes.added, changes.removed, kept), changes


@_retry_on_deadlock
def provider_fw_rule_purge_expired(now: datetime.datetime | None = None, older_than: datetime.timedelta | None = None,
                                   audit: Audit | None = None) -> Changes | None:
    """Soft-delete live rules whose expiry has passed; return the change, or None when nothing expired.

    Hosts already stopped enforcing them at expiry; this only tidies the table
    (and tells hosts through the generation that the rows are gone).  Lapsed
    wishes of sources whose rule lives on (another source wants it longer)
    are deleted too; they change nothing hosts see, so they move no generation.
    The rows are chosen under the generation row's lock, so a renewal
    committed meanwhile is never purged.
    """
    now = now or _now()
    cutoff = now - (older_than or datetime.timedelta(0))
    s = ProviderFirewallRuleSource
    with _session() as session, session.begin():
        asked = time.monotonic()
        session.execute(select(FirewallGeneration.generation).where(FirewallGeneration.id == 1).with_for_update())
        _generation_locked(session, asked)
        rows = session.execute(select(*_WIRE_COLUMNS).where(
            _live(), ProviderFirewallRule.expires_at.is_not(None), ProviderFirewallRule.expires_at <= cutoff)).all()
        lapsed = session.execute(sa.delete(s).where(s.expires_at.is_not(None), s.expires_at <= cutoff)
                                 .execution_options(synchronize_session=False)).rowcount
        if not rows:
            if not lapsed:
                session.rollback()
            return None
        generation, _count = _bump_generation(session)
        count = _soft_delete(session, [row.id for row in rows], generation, now, "expiry")
        _adjust_live_rules(session, -count)
        _audit(session, audit or Audit("expiry"), "rule.expire", generation, {"count": count})
    return Changes(generation - 1, generation, [], [rule_of(row) for row in rows])


@dataclasses.dataclass(frozen=True)
class PurgeResult:
    """What ``provider_fw_purge_deleted`` deleted: rule rows and audit records, and ``purged_generation``,
    the generation hosts must have applied to be answered with a delta (0: nothing was ever purged)."""

    rules: int
    audit_records: int
    purged_generation: int


PURGE_BATCH = 1000


def provider_fw_purge_deleted(before: datetime.datetime, audit_records: bool = False, batch: int = PURGE_BATCH,
                              max_rows: int | None = None, audit: Audit | None = None) -> PurgeResult:
    """Delete the rows of rules soft-deleted before ``before`` (naive UTC) and, with ``audit_records``, the
    audit records created before it; return what went.  ``nova-manage db purge --before`` does this for
    Nova's soft-deleted rows.

    Live rules are never touched, nor rules deleted at or after ``before``.
    Each batch of at most ``batch`` rule rows (oldest deletion first) is one
    transaction that holds the generation row's lock - it queues with rule
    mutations for one batch, never for the whole purge - and raises
    ``purged_generation`` to the newest ``deleted_generation`` it deleted.
    ``provider_fw_changes_since`` of an older generation then answers None
    and the conductor sends that host a snapshot: a host far behind never
    misses a removal.  The purge moves no generation (hosts enforce the same
    rules).  The row with the highest id of each table is kept, so no id is
    ever handed out again (SQLite's tables have no AUTOINCREMENT).
    ``max_rows``: stop after that many rows of each table (None: all).
    ``audit``: who purged; when anything went, one ``db.purge`` record says
    what (``count``: rules), written after the audit records were purged.
    """
    rules = audit_count = 0
    purged = 0
    while max_rows is None or rules < max_rows:
        count, purged = _retried("purge_deleted", _purge_rule_batch, before,
                                 batch if max_rows is None else min(batch, max_rows - rules))
        rules += count
        if count < batch:
            break
    while audit_records and (max_rows is None or audit_count < max_rows):
        count = _purge_audit_batch(before, batch if max_rows is None else min(batch, max_rows - audit_count))
        audit_count += count
        if count < batch:
            break
    with _session() as session, session.begin():
        purged = _purged_generation(session)
        if rules or audit_count:
            _audit(session, audit, "db.purge", _current_generation(session),
                   {"before": before.isoformat(timespec="microseconds") + "Z", "count": rules,
                    "audit_records": audit_count, "purged_generation": purged})
    return PurgeResult(rules, audit_count, purged)


def _purge_rule_batch(before: datetime.datetime, limit: int) -> tuple[int, int]:
    """Delete up to ``limit`` rules deleted before ``before``, under the generation row's lock; return
    (rows deleted, purged_generation after)."""
    r = ProviderFirewallRule
    with _session() as session, session.begin():
        asked = time.monotonic()
        purged = session.execute(select(FirewallGeneration.purged_generation)
                                 .where(FirewallGeneration.id == 1).with_for_update()).scalar_one()
        _generation_locked(session, asked)
        # The deleted_generation index (partial: deleted rules only) in generation order, which is the order
        # of deletion: the scan stops after `limit` rows, except in the last batch.
        # Never the row with the highest id: SQLite (whose tables have no AUTOINCREMENT) hands out the highest id
        # + 1, so purging the newest rows would give their ids - which audit records name - to new rules.
        newest_id = select(func.max(r.id)).scalar_subquery()
        rows = session.execute(select(r.id, r.deleted_generation).where(
            r.deleted_generation.is_not(None), r.deleted != 0, r.deleted_at < before, r.id < newest_id)
            .order_by(r.deleted_generation).limit(limit)).all()
        if not rows:
            return 0, purged
        ids = [row.id for row in rows]
        # Their source rows went when they were deleted; a release before sources, or SQLite without
        # foreign keys enforced, may have left some: they go with their rule.
        session.execute(sa.delete(ProviderFirewallRuleSource).where(ProviderFirewallRuleSource.rule_id.in_(ids))
                        .execution_options(synchronize_session=False))
        session.execute(sa.delete(r).where(r.id.in_(ids)).execution_options(synchronize_session=False))
        newest = max(row.deleted_generation for row in rows)
        if newest > purged:
            session.execute(update(FirewallGeneration).where(FirewallGeneration.id == 1)
                            .values(purged_generation=newest))
            purged = newest
        return len(ids), purged


def _purge_audit_batch(before: datetime.datetime, limit: int) -> int:
    """Delete up to ``limit`` audit records created before ``before``, oldest first; return how many."""
    with _session() as session, session.begin():
        newest_id = select(func.max(AuditRecord.id)).scalar_subquery()      # as for rules: ids never reused
        ids = session.execute(select(AuditRecord.id).where(AuditRecord.created_at < before, AuditRecord.id < newest_id)
                              .order_by(AuditRecord.created_at, AuditRecord.id).limit(limit)).scalars().all()
        if ids:
            session.execute(sa.delete(AuditRecord).where(AuditRecord.id.in_(ids))
                            .execution_options(synchronize_session=False))
        return len(ids)


def provider_fw_distinct_cidrs() -> list[tuple[str, int]]:
    """Every CIDR with at least one live, unexpired rule, with its count of such rules."""
    with _session() as session:
        rows = session.execute(select(ProviderFirewallRule.cidr, func.count())
                               .where(_in_force(_now())).group_by(ProviderFirewallRule.cidr)
                               .order_by(ProviderFirewallRule.cidr))
        return [(cidr, count) for cidr, count in rows]


def provider_fw_rule_count() -> int:
    """Live rules (expired ones included until purged), from the counter kept by every mutation."""
    with _session() as session:
        return _live_rules(session)


# --------------------------------------------------------------------------- generation, snapshots, deltas

def _current_generation(session: Session | None = None) -> int:
    if session is None:
        with _session() as own:
            return _current_generation(own)
    return session.execute(select(FirewallGeneration.generation).where(FirewallGeneration.id == 1)).scalar_one()


def _purged_generation(session: Session) -> int:
    """The newest deleted_generation purged (``provider_fw_purge_deleted``): deltas since an older one are not
    answerable."""
    statement = select(FirewallGeneration.purged_generation).where(FirewallGeneration.id == 1)
    return session.execute(statement).scalar_one()


def provider_fw_generation_get() -> int:
    """The generation of the current rule set."""
    return _current_generation()


def ping() -> int:
    """The current generation.

    DatabaseUnavailable when the database cannot be reached or answer; SchemaNotReady when it answers but has no
    provfw tables (SQLite reports a missing table as an OperationalError, PostgreSQL and MariaDB as a
    ProgrammingError, so the table is looked for before blaming the connection).
    """
    try:
        return _current_generation()
    except (sa_exc.OperationalError, sa_exc.ProgrammingError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        if _generation_table_missing():
            raise exception.SchemaNotReady("the database has no provfw schema: run 'provfw-manage db sync'") from exc
        if isinstance(exc, sa_exc.ProgrammingError):
            raise
        # The type names what failed; the driver's text (host, port, user) stays in the caller's log.
        cause = getattr(exc, "orig", None) or exc
        raise exception.DatabaseUnavailable(f"database unreachable ({type(cause).__name__})") from exc


def _generation_table_missing() -> bool:
    """True when the database answers and has no generation table; False when it has one or cannot answer."""
    try:
        return not sa.inspect(get_engine()).has_table(FirewallGeneration.__tablename__)
    except (sa_exc.SQLAlchemyError, exception.DatabaseUnavailable):        # the latter from _unavailable
        return False


def _all_tuples(connection: sa.Connection, statement) -> Sequence[tuple]:
    """Every row of a large SELECT, as plain tuples (index, slice and unpack them; no attribute access).

    On PostgreSQL straight from psycopg2's cursor, in the connection's transaction: SQLAlchemy's Row objects
    cost as much as the query (120k rows of a source: 0.29-0.33 s through ``Connection.execute().all()``,
    0.19 s from the cursor; a 120k-rule snapshot's read 0.15-0.33 s against 0.08 s; measured 2026-12-01).
    Elsewhere through SQLAlchemy, whose result processing SQLite's timestamps need.  Counted in
    ``statement_counts`` either way.
    """
    if connection.dialect.name != "postgresql":
        return [tuple(row) for row in connection.execute(statement)]
    compiled = statement.compile(dialect=connection.dialect)
    cursor = connection.connection.cursor()
    try:
        cursor.execute(compiled.string, compiled.construct_params())
        rows = cursor.fetchall()
    finally:
        cursor.close()
    with _counts_lock:
        _counts["statements"] += 1
        _counts["rows_read"] += len(rows)
    return rows


def _snapshot_rows(now: datetime.datetime | None, attempts: int) -> tuple[int, Sequence[tuple]]:
    """(generation, rows of _WIRE_COLUMNS) of every live, unexpired rule, consistent with that generation."""
    now = now or _now()
    statement = select(*_WIRE_COLUMNS).where(_live(), _not_expired(now))
    for attempt in range(attempts):
        with _session() as session:
            before = _current_generation(session)
            rows = _all_tuples(session.connection(), statement)
            session.rollback()
            after = _current_generation(session)
        if before == after:
            return after, rows
        time.sleep(0.01 * (attempt + 1))
    raise exception.ProvfwError("rules kept changing while reading a snapshot; try again")


def provider_fw_snapshot(now: datetime.datetime | None = None, attempts: int = 5) -> Snapshot:
    """Every live, unexpired rule, consistent with one generation.

    Reads the generation before and after the rules and retries if a mutation
    committed in between, so the result never mixes two generations whatever
    the isolation level.
    """
    generation, rows = _snapshot_rows(now, attempts)
    spec = rules_mod.RuleSpec
    return Snapshot(generation, [rules_mod.Rule(i, spec(c, p, f, t), _epoch(e)) for i, c, p, f, t, e in rows])


def provider_fw_snapshot_wire(now: datetime.datetime | None = None, attempts: int = 5) -> tuple[int, list]:
    """``provider_fw_snapshot`` as (generation, rules in ``Rule``'s wire form, tuples for lists): what the
    conductor sends, without a ``Rule`` built per row only to be taken apart again (120k rules: the objects
    and ``to_wire`` cost 0.4 s, measured 2026-12-01)."""
    generation, rows = _snapshot_rows(now, attempts)
    return generation, [row if row[5] is None else (*row[:5], _epoch(row[5])) for row in rows]


def provider_fw_changes_count_since(generation: int) -> int | None:
    """Rows created, changed (renewed) or deleted after ``generation``: three index-only counts, no rows read.

    An upper bound of ``provider_fw_changes_since``'s size (a row created and
    deleted in the window counts twice), so a caller can choose a snapshot
    without reading a delta it would throw away.  None when rules deleted
    after ``generation`` were purged (``provider_fw_purge_deleted``): no delta
    can answer, only a snapshot.
    """
    counts = []
    with _session() as session:
        if generation < _purged_generation(session):
            return None
        for column in (ProviderFirewallRule.created_generation, ProviderFirewallRule.updated_generation,
                       ProviderFirewallRule.deleted_generation):
            counts.append(session.execute(select(func.count()).select_from(ProviderFirewallRule).where(
                column > generation)).scalar_one())
    return sum(counts)


def provider_fw_changes_since(generation: int, attempts: int = 5) -> Changes | None:
    """The rules added, changed and removed after ``generation`` (indexed by generation columns).

    A rule created and deleted within the window is in neither list; a rule
    deleted in the window is in ``removed`` only if it existed at ``generation``.
    A live rule whose expiry changed in the window (renewed, or shortened when
    a source let go) is in ``added`` with its current expiry: hosts match by
    id and relabel it.  None when rules deleted after ``generation`` were
    purged (``provider_fw_purge_deleted``): only a snapshot can answer.  The
    bound is read after the rows, so a purge that committed before they were
    read is seen (it commits its rows and its bound together).
    """
    for attempt in range(attempts):
        with _session() as session:
            before = _current_generation(session)
            added = session.execute(select(*_WIRE_COLUMNS, ProviderFirewallRule.deleted_generation).where(
                ProviderFirewallRule.created_generation > generation)).all()
            # Two indexed queries rather than one OR, which not every database plans as an index union.
            seen = {row.id for row in added}
            added += [row for row in session.execute(
                select(*_WIRE_COLUMNS, ProviderFirewallRule.deleted_generation).where(
                    ProviderFirewallRule.updated_generation > generation)) if row.id not in seen]
            removed = session.execute(select(*_WIRE_COLUMNS, ProviderFirewallRule.created_generation).where(
                ProviderFirewallRule.deleted_generation > generation)).all()
            session.rollback()
            after = _current_generation(session)
            if generation < _purged_generation(session):
                return None
        if before != after:
            time.sleep(0.01 * (attempt + 1))
            continue
        add = [rules_mod.Rule(i, rules_mod.RuleSpec(c, p, f, t), _epoch(e))
               for i, c, p, f, t, e, dg in added if dg is None]
        rem = [rules_mod.Rule(i, rules_mod.RuleSpec(c, p, f, t), _epoch(e))
               for i, c, p, f, t, e, cg in removed if cg <= generation]
        return Changes(generation, after, add, rem)
    raise exception.ProvfwError("rules kept changing while reading a delta; try again")


@dataclasses.dataclass(frozen=True)
class MetricsRead:
    """What the conductor exports on a scrape: the generation, live unexpired rules by protocol, and every
    worker's (host, applied generation or None, last heartbeat as naive UTC or None)."""

    generation: int
    active_rules: dict[str, int]
    services: list[tuple[str, int | None, datetime.datetime | None]]


def provider_fw_metrics_read(binary: str = "provfw-compute", now: datetime.datetime | None = None) -> MetricsRead:
    """The generation, rule counts and service states in ONE statement (a UNION ALL), for a metrics scrape."""
    now = now or _now()
    at_null = sa.null().cast(sa.DateTime)
    statement = sa.union_all(
        select(sa.literal("g", sa.String).label("kind"), sa.null().cast(sa.String).label("key"),
               FirewallGeneration.generation.label("n"), at_null.label("at")).where(FirewallGeneration.id == 1),
        select(sa.literal("r", sa.String), ProviderFirewallRule.protocol, func.count(), at_null)
        .where(_live(), _not_expired(now)).group_by(ProviderFirewallRule.protocol),
        select(sa.literal("s", sa.String), Service.host, Service.applied_generation, Service.heartbeat_at)
        .where(Service.binary == binary))
    generation, active, services = 0, {}, []
    with _session() as session:
        for kind, key, number, at in session.execute(statement):
            if kind == "g":
                generation = int(number)
            elif kind == "r":
                active[key] = int(number)
            else:
                services.append((key, None if number is None else int(number), at))
    return MetricsRead(generation, active, services)


# --------------------------------------------------------------------------- services

@_retry_on_deadlock
def service_update(host: str, binary: str = "provfw-compute", **values) -> None:
    """Create or update the Service row of ``host``; ``heartbeat=True`` stamps the heartbeat."""
    now = _now()
    if values.pop("heartbeat", False):
        values["heartbeat_at"] = now
    allowed = set(SERVICE_REPORT_FIELDS)
    unknown = set(values) - allowed
    if unknown:
        raise TypeError(f"unknown service fields: {sorted(unknown)}")
    for attempt in range(3):
        try:
            with _session() as session, session.begin():
                row = session.scalars(select(Service).where(Service.host == host, Service.binary == binary)).first()
                if row is None:
                    session.add(Service(host=host, binary=binary, created_at=now, **values))
                else:
                    for key, value in values.items():
                        setattr(row, key, value)
            return
        except sa_exc.IntegrityError:
            # Two threads of one worker created the row at once; the second updates it.
            if attempt == 2:
                raise


SERVICE_REPORT_FIELDS = ("driver", "heartbeat_at", "applied_generation", "applied_at", "rule_count", "last_error",
                         "quarantine", "bus_user")


@_retry_on_deadlock
def service_update_many(reports: dict[str, dict], binary: str = "provfw-compute") -> int:
    """Write many hosts' state reports in ONE transaction; return the rows written.

    ``reports`` maps host -> values with exactly ``SERVICE_REPORT_FIELDS``
    (the conductor's batched reports).  Existing rows are updated - on
    PostgreSQL with ONE prebuilt ``UPDATE ... FROM unnest(...) RETURNING
    host`` whatever the number of hosts (``_UPDATE_SERVICES_PG``), so a change
    applied by a whole fleet costs the same statement at 10 hosts as at 1,000;
    elsewhere with one executemany, which the drivers send as one statement
    per host after a look-up of the rows that exist.  New hosts are inserted;
    a row another conductor inserted concurrently is retried as an update.
    Rows are written in host order, so two conductors flushing at once lock
    them in the same order.
    """
    if not reports:
        return 0
    now = _now()
    for attempt in range(3):
        try:
            with _session() as session, session.begin():
                hosts = sorted(reports)
                if session.get_bind().dialect.name == "postgresql":
                    _upsert_services_pg(session.connection(), binary, hosts, reports, now)
                    return len(reports)
                existing = set()
                for start in range(0, len(hosts), 1000):
                    existing.update(session.scalars(select(Service.host).where(
                        Service.binary == binary, Service.host.in_(hosts[start:start + 1000]))))
                updates = [{"b_host": host, **{k: reports[host][k] for k in SERVICE_REPORT_FIELDS}, "updated_at": now}
                           for host in hosts if host in existing]
                if updates:
                    _update_services(session.connection(), binary, updates)
                inserts = [{"host": host, "binary": binary, "created_at": now,
                            **{k: reports[host][k] for k in SERVICE_REPORT_FIELDS}}
                           for host in hosts if host not in existing]
                if inserts:
                    session.execute(sa.insert(Service.__table__), inserts)
            return len(reports)
        except sa_exc.IntegrityError:
            if attempt == 2:
                raise
    return 0


def _update_services(connection: sa.Connection, binary: str, updates: list[dict]) -> None:
    """UPDATE the Service rows named by each dict's ``b_host`` with its other keys (one transaction; SQLite and
    MariaDB: PostgreSQL has ``_upsert_services_pg``)."""
    table = Service.__table__
    fields = (*SERVICE_REPORT_FIELDS, "updated_at")
    connection.execute(update(table).where(table.c.host == sa.bindparam("b_host"), table.c.binary == binary)
                       .values({k: sa.bindparam(k) for k in fields}), updates)


# PostgreSQL: a batch of state reports as ONE statement of fixed text, whatever the number of hosts: one array per
# column (psycopg2 adapts a list in C; an all-NULL array keeps its type through the CAST), the rows joined by host.
# It replaced a look-up of the existing rows plus an ``UPDATE .. FROM (VALUES ..)`` that SQLAlchemy compiled anew
# for every batch size: a third of the conductor's CPU while three hosts reported every change (py-spy, 2026-12-01).
# Not ``INSERT .. ON CONFLICT DO UPDATE``: that draws a sequence value per row even when it updates, and
# heartbeats of 1,000 hosts would use up an integer id space in months.
_SERVICE_ARRAYS = (("host", "VARCHAR"), ("driver", "VARCHAR"), ("heartbeat_at", "TIMESTAMP"),
                   ("applied_generation", "BIGINT"), ("applied_at", "TIMESTAMP"), ("rule_count", "INTEGER"),
                   ("last_error", "TEXT"), ("quarantine", "TEXT"), ("bus_user", "VARCHAR"))
_UPDATE_SERVICES_PG = sa.text(
    "UPDATE services SET " + ", ".join(f"{name} = r.{name}" for name, _ in _SERVICE_ARRAYS[1:])
    + ", updated_at = :b_now FROM (SELECT * FROM unnest("
    + ", ".join(f"CAST(:b_{name} AS {kind}[])" for name, kind in _SERVICE_ARRAYS)
    + ") AS d(" + ", ".join(name for name, _ in _SERVICE_ARRAYS) + ") ORDER BY host) AS r "
    "WHERE services.host = r.host AND services.\"binary\" = :b_binary RETURNING services.host")


def _upsert_services_pg(connection: sa.Connection, binary: str, hosts: list[str], reports: dict[str, dict],
                        now: datetime.datetime) -> None:
    """Write ``reports`` of the sorted ``hosts``: one UPDATE of the rows that exist, one INSERT of the others."""
    arrays = {f"b_{name}": [reports[host][name] for host in hosts] for name, _ in _SERVICE_ARRAYS[1:]}
    arrays.update(b_host=hosts, b_now=now, b_binary=binary)
    updated = set(connection.execute(_UPDATE_SERVICES_PG, arrays).scalars())
    inserts = [{"host": host, "binary": binary, "created_at": now,
                **{k: reports[host][k] for k in SERVICE_REPORT_FIELDS}} for host in hosts if host not in updated]
    if inserts:
        connection.execute(sa.insert(Service.__table__), inserts)


def service_get_all(binary: str = "provfw-compute") -> list[Service]:
    with _session() as session:
        return list(session.scalars(select(Service).where(Service.binary == binary).order_by(Service.host)))


def service_get(host: str, binary: str = "provfw-compute") -> Service | None:
    with _session() as session:
        return session.scalars(select(Service).where(Service.host == host, Service.binary == binary)).first()


@_retry_on_deadlock
def service_destroy(host: str, binary: str = "provfw-compute") -> bool:
    with _session() as session, session.begin():
        return session.execute(sa.delete(Service).where(Service.host == host, Service.binary == binary)).rowcount > 0


# --------------------------------------------------------------------------- feeds

FEED_SETTINGS = ("url", "format", "csv_column", "protocol", "from_port", "to_port", "interval_seconds", "ttl_seconds",
                 "enabled", "allow_non_global", "description")
FEED_STATE = ("etag", "last_modified", "content_sha256", "last_attempt_at", "last_success_at", "last_applied_at",
              "last_status", "last_error", "last_counts", "last_generation", "next_sync_at", "force_next")
FEED_COMMIT_LEASE = 300.0   # seconds a claim is extended by while its sync commits


def feed_source(name: str) -> str:
    return f"feed:{name}"


@_retry_on_deadlock
def feed_create(name: str, settings: dict, audit: Audit | None = None, shown: dict | None = None) -> Feed:
    """Create feed ``name`` (due at once when enabled); Conflict if the name is taken.

    ``settings`` holds FEED_SETTINGS (validated by the caller).  The audit
    record carries ``shown`` (default: the settings; the API passes them
    with the URL's password hidden), ``allow_non_global`` included.
    """
    unknown = set(settings) - set(FEED_SETTINGS)
    if unknown:
        raise TypeError(f"unknown feed settings: {sorted(unknown)}")
    now = _now()
    row = Feed(name=name, created_at=now, created_by=audit.actor if audit else None, force_next=False,
               next_sync_at=now if settings.get("enabled", True) else None, **settings)
    try:
        with _session() as session, session.begin():
            session.add(row)
            session.flush()
            _audit(session, audit, "feed.create", None, {"feed": name, **(shown or settings)})
    except sa_exc.IntegrityError:
        raise exception.Conflict(f"name: a feed named {name!r} already exists") from None
    return row


def feed_get(name: str) -> Feed:
    """The feed ``name``; NotFound otherwise."""
    with _session() as session:
        row = session.scalars(select(Feed).where(Feed.name == name)).first()
    if row is None:
        raise exception.NotFound(f"no feed named {name!r}")
    return row


def feed_get_all() -> list[Feed]:
    with _session() as session:
        return list(session.scalars(select(Feed).order_by(Feed.name)))


@_retry_on_deadlock
def feed_update(name: str, settings: dict, audit: Audit | None = None, shown: dict | None = None) -> Feed:
    """Change some of a feed's settings; return the feed.  Enabling makes it due at once, disabling unschedules
    it (its rules stay).  NotFound when there is no such feed."""
    unknown = set(settings) - set(FEED_SETTINGS)
    if unknown:
        raise TypeError(f"unknown feed settings: {sorted(unknown)}")
    now = _now()
    with _session() as session, session.begin():
        row = session.scalars(select(Feed).where(Feed.name == name).with_for_update()).first()
        if row is None:
            raise exception.NotFound(f"no feed named {name!r}")
        was_enabled = row.enabled
        for key, value in settings.items():
            setattr(row, key, value)
        row.updated_at = now
        if not row.enabled:
            row.next_sync_at = None
        elif not was_enabled or any(key != "description" for key in settings):
            row.next_sync_at = now           # what it fetches or how it reads it changed: sync soon
            row.etag = row.last_modified = row.content_sha256 = None
        _audit(session, audit, "feed.update", None, {"feed": name, **(shown or settings)})
    return row


@_retry_on_deadlock
def feed_request_sync(name: str, force: bool = False, audit: Audit | None = None) -> Feed:
    """Make feed ``name`` due now (the next conductor poll syncs it, unconditionally); ``force`` lets that sync
    pass the replace guard once.  NotFound when there is no such feed; Conflict when it is disabled."""
    now = _now()
    with _session() as session, session.begin():
        row = session.scalars(select(Feed).where(Feed.name == name).with_for_update()).first()
        if row is None:
            raise exception.NotFound(f"no feed named {name!r}")
        if not row.enabled:
            raise exception.Conflict(f"feed {name!r} is disabled; enable it first")
        row.next_sync_at = now
        # A sync an admin asks for downloads the list even if the server says it did not change.
        row.etag = row.last_modified = row.content_sha256 = None
        row.force_next = bool(force or row.force_next)
        _audit(session, audit, "feed.sync", None, {"feed": name, "force": bool(force)})
    return row


def feed_destroy(name: str, audit: Audit | None = None) -> SyncResult:
    """Delete feed ``name`` and its source from every rule, in ONE transaction and ONE generation.

    Rules no other source wants are deleted; the others stay.  Returns the
    release as a SyncResult (``removed``, ``deleted``, ``changes`` to cast).
    NotFound when there is no such feed.
    """
    feed_get(name)
    state: dict = {}

    def before(session: Session, now: datetime.datetime) -> None:
        row = session.scalars(select(Feed).where(Feed.name == name).with_for_update()).first()
        if row is None:
            raise exception.NotFound(f"no feed named {name!r}")
        state["id"] = row.id

    def after(session: Session, generation: int, plan: sources_mod.Plan) -> None:
        session.execute(sa.delete(Feed).where(Feed.id == state["id"]))
        if not plan.changes_anything:
            _audit(session, audit, "feed.delete", None, {"feed": name, "removed": 0})

    return provider_fw_rules_sync(feed_source(name), [], mode="replace", audit=audit, action="feed.delete",
                                  force=True, audit_detail={"feed": name}, _before=before, _after=after)


@dataclasses.dataclass(frozen=True)
class FeedClaim:
    """A conductor's lease on one due feed: sync it, then record the outcome with ``token``."""

    feed: Feed
    token: str


def feed_claim_due(claimant: str, lease: float, now: datetime.datetime | None = None,
                   limit: int = 10) -> list[FeedClaim]:
    """Claim up to ``limit`` enabled feeds that are due and not held by a live lease, for ``lease`` seconds.

    Each claim is a compare-and-set (an UPDATE whose WHERE re-checks that the
    feed is due and unclaimed), so of several conductors exactly one gets a
    feed, on every database.  ``claimant`` is logged only.
    """
    now = now or _now()
    due = sa.and_(Feed.enabled.is_(True), Feed.next_sync_at.is_not(None), Feed.next_sync_at <= now,
                  sa.or_(Feed.claimed_until.is_(None), Feed.claimed_until < now))
    with _session() as session:
        ids = list(session.scalars(select(Feed.id).where(due).order_by(Feed.next_sync_at).limit(limit)))
    claims = []
    for feed_id in ids:
        token = str(uuid.uuid4())
        with _session() as session, session.begin():
            won = session.execute(update(Feed).where(Feed.id == feed_id, due)
                                  .values(claim_token=token, claimed_until=now + datetime.timedelta(seconds=lease),
                                          last_attempt_at=now)
                                  .execution_options(synchronize_session=False)).rowcount == 1
            row = session.scalars(select(Feed).where(Feed.id == feed_id)).first() if won else None
        if row is not None:
            LOG.debug("%s claimed feed %s until %s", claimant, row.name, row.claimed_until)
            claims.append(FeedClaim(row, token))
    return claims


def _hold_claim(session: Session, feed_id: int, token: str, now: datetime.datetime) -> None:
    """Check, inside a transaction, that ``token`` still holds the feed, and lock its row until commit."""
    held = session.execute(update(Feed).where(Feed.id == feed_id, Feed.claim_token == token)
                           .values(claimed_until=now + datetime.timedelta(seconds=FEED_COMMIT_LEASE))
                           .execution_options(synchronize_session=False)).rowcount
    if held != 1:
        raise exception.FeedClaimLost(f"feed {feed_id}: another conductor holds it now")


# What a sync asked for (feed_request_sync) or made necessary (feed_set) while another sync held the feed sets:
# the finished sync's outcome must not overwrite it.
_ASKED_WHILE_CLAIMED = ("next_sync_at", "force_next", "etag", "last_modified", "content_sha256")


def _release_claim(session: Session, feed_id: int, token: str, state: dict) -> None:
    """Write ``state`` and release the claim (in the caller's transaction, which ``_hold_claim`` made hold the
    row).  A sync requested while this one ran - the feed's ``next_sync_at`` moved past the claim's
    ``last_attempt_at`` - stands: the feed stays due, with the request's ``force`` and without validators, so
    the next poll downloads it again (this sync may have fetched the list before the request; found by the
    CLI's ``feed add`` then ``feed sync``, whose sync was answered by the first one and then lost)."""
    unknown = set(state) - set(FEED_STATE)
    if unknown:
        raise TypeError(f"unknown feed state: {sorted(unknown)}")
    due, attempted = session.execute(select(Feed.next_sync_at, Feed.last_attempt_at).where(Feed.id == feed_id)).one()
    if due is not None and attempted is not None and due > attempted:
        state = {key: value for key, value in state.items() if key not in _ASKED_WHILE_CLAIMED}
    session.execute(update(Feed).where(Feed.id == feed_id, Feed.claim_token == token)
                    .values(claim_token=None, claimed_until=None, **state)
                    .execution_options(synchronize_session=False))


@_retry_on_deadlock
def feed_record(claim: FeedClaim, state: dict) -> bool:
    """Write a sync's outcome (FEED_STATE fields) and release the claim; False when the claim was lost."""
    now = _now()
    try:
        with _session() as session, session.begin():
            _hold_claim(session, claim.feed.id, claim.token, now)
            _release_claim(session, claim.feed.id, claim.token, state)
    except exception.FeedClaimLost:
        return False
    return True


def feed_sync(claim: FeedClaim, specs: Sequence[rules_mod.RuleSpec], state: dict, *,
              expires_at: datetime.datetime | None, guard: sources_mod.Guard | None, force: bool,
              renew_slack: float, max_rules: int | None = None, audit_detail: dict | None = None,
              counts: dict | None = None) -> SyncResult:
    """Replace-sync the feed's source with ``specs`` and record ``state``, in ONE transaction.

    Only while ``claim`` still holds the feed (FeedClaimLost otherwise, and
    nothing changes); the claim is released with the state written.
    ``last_generation`` is filled in, and ``last_counts`` is ``counts`` with
    the sync's own (added, renewed, duplicate, removed, deleted), as JSON.
    Other errors (the guard, max_rules) change nothing and keep the claim:
    record them with ``feed_record``.
    """
    feed = claim.feed

    def before(session: Session, now: datetime.datetime) -> None:
        _hold_claim(session, feed.id, claim.token, now)

    def after(session: Session, generation: int, plan: sources_mod.Plan) -> None:
        done = {"added": len(plan.create), "renewed": len(plan.renewed), "duplicate": plan.duplicates,
                "removed": len(plan.removed), "deleted": len(plan.delete) + len(plan.retire)}
        _release_claim(session, feed.id, claim.token, {
            **state, "last_generation": generation,
            "last_counts": json.dumps({**(counts or {}), **done}, sort_keys=True)})

    return provider_fw_rules_sync(
        feed_source(feed.name), specs, mode="replace", expires_at=expires_at, created_by=feed_source(feed.name),
        audit=Audit(feed_source(feed.name)), max_rules=max_rules, action="feed.sync", guard=guard, force=force,
        renew_slack=renew_slack, audit_detail={"feed": feed.name, **(audit_detail or {})}, _before=before,
        _after=after)


def feed_rule_counts() -> dict[str, int]:
    """feed name -> live rules its source wants."""
    return {source.split(":", 1)[1]: count for source, count in provider_fw_source_counts()
            if source.startswith("feed:")}


# --------------------------------------------------------------------------- tokens and audit

def _hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


TOKEN_PREFIX = "pfw_"


def new_token_secret() -> str:
    """A fresh token secret: ``pfw_`` and 256 random bits, URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@_retry_on_deadlock
def api_token_create(name: str, role: str, secret: str | None = None) -> str:
    """Create a token; return its secret (shown once; only its hash is stored).

    ``secret`` (from ``new_token_secret``) stores a secret the caller already holds, e.g. one written to a
    file first so that a crash between the two steps loses nothing.  Raises Conflict if ``name`` is taken.
    """
    if role not in ("admin", "reader"):
        raise exception.InvalidInput("role", "must be 'admin' or 'reader'")
    if not name or len(name) > 255:
        raise exception.InvalidInput("name", "must be 1-255 characters")
    if secret is not None and (not secret.startswith(TOKEN_PREFIX) or not 36 <= len(secret) <= 512
                               or not secret.isascii() or not secret.isprintable() or " " in secret):
        raise exception.InvalidInput("secret", "must be a secret made by new_token_secret()")
    secret = secret or new_token_secret()
    try:
        with _session() as session, session.begin():
            session.add(ApiToken(name=name, role=role, token_hash=_hash_token(secret)))
    except sa_exc.IntegrityError:
        raise exception.Conflict(f"name: a token named {name!r} already exists") from None
    return secret


def api_token_get_by_secret(secret: str, include_revoked: bool = False) -> ApiToken | None:
    """The active token whose secret is ``secret`` (or, with ``include_revoked``, any token it ever was)."""
    query = select(ApiToken).where(ApiToken.token_hash == _hash_token(secret))
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    with _session() as session:
        return session.scalars(query).first()


def api_token_get_all() -> list[ApiToken]:
    with _session() as session:
        return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


@_retry_on_deadlock
def api_token_revoke(name: str) -> None:
    with _session() as session, session.begin():
        count = session.execute(update(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
                                .values(revoked_at=_now())).rowcount
    if not count:
        raise exception.NotFound(f"no active token named {name!r}")


def audit_get_all(limit: int = 100) -> list[AuditRecord]:
    with _session() as session:
        return list(session.scalars(select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)))
