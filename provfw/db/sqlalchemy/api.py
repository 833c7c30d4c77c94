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

Thread-safety: the engine and sessionmaker are process-wide and thread-safe;
each function opens its own session.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import logging
import secrets
import threading
import time
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from provfw import exception, metrics, rules as rules_mod
from provfw.db.sqlalchemy import models
from provfw.db.sqlalchemy.models import ApiToken, AuditRecord, FirewallGeneration, ProviderFirewallRule, Service
from provfw.retrying import retrying

LOG = logging.getLogger(__name__)
AUDIT_LOG = logging.getLogger("provfw.audit")

DEADLOCK_ATTEMPTS = 5
# SQLSTATEs of a transaction the server rolled back for losing a lock race (PostgreSQL, psycopg2 and psycopg 3).
_PG_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
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


def _retry_on_deadlock(func):
    """Run the whole of ``func`` (one transaction) again when the database rolled it back for a deadlock."""
    operation = func.__name__

    def attempt(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except sa_exc.DBAPIError as exc:
            if not is_deadlock(exc):
                raise
            metrics.DB_DEADLOCKS.labels(operation).inc()
            raise exception.DBDeadlock(f"{operation}: the database kept rolling the transaction back "
                                       f"({type(exc.orig).__name__}); try again") from exc

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return retrying(f"database transaction {operation}", exception.DBDeadlock, attempts=DEADLOCK_ATTEMPTS,
                        initial=0.05, maximum=1.0, log=LOG)(attempt, *args, **kwargs)
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


def create_engine(url: str, pool_size: int = 5) -> sa.Engine:
    """Create an engine with the settings provfw needs on each backend."""
    kwargs: dict = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
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
    return engine


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


@event.listens_for(Session, "after_commit")
def _log_audit_lines(session: Session) -> None:
    for line in session.info.pop("audit_lines", ()):
        AUDIT_LOG.info(line)


@event.listens_for(Session, "after_rollback")
def _drop_audit_lines(session: Session) -> None:
    session.info.pop("audit_lines", None)


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

    ``retired`` are live but expired copies of the created specs that the same
    transaction soft-deleted to make room (hosts had already stopped enforcing them).
    """

    generation: int
    added: list[ProviderFirewallRule]
    duplicates: list[rules_mod.RuleSpec]
    added_count: int = 0
    retired: list[rules_mod.Rule] = dataclasses.field(default_factory=list)


# The values the db layer returns are the ones the hosts use (provfw.rules).
Snapshot = rules_mod.Snapshot
Changes = rules_mod.Changes


def _now() -> datetime.datetime:
    return models.utcnow()


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


def _bump_generation(session: Session) -> tuple[int, int]:
    """Take the generation row lock; return (new generation, live rules).

    The first statement of every mutation: from here to COMMIT the row lock
    serialises mutations, so everything after it runs as few statements as
    possible (Core statements, RETURNING where the database has it).
    """
    statement = (update(_GENERATION).where(_GENERATION.c.id == 1)
                 .values(generation=_GENERATION.c.generation + 1, updated_at=_now()))
    if session.get_bind().dialect.update_returning:          # PostgreSQL, SQLite; not MariaDB
        row = session.execute(statement.returning(_GENERATION.c.generation, _GENERATION.c.live_rules)).first()
    else:
        row = None if session.execute(statement).rowcount != 1 else session.execute(
            select(_GENERATION.c.generation, _GENERATION.c.live_rules).where(_GENERATION.c.id == 1)).first()
    if row is None:
        raise exception.ProvfwError("provider_fw_generation row missing: run 'provfw-manage db sync'")
    return row[0], row[1]


def _adjust_live_rules(session: Session, delta: int) -> None:
    """Move the live-rule counter by ``delta`` (same transaction and row lock as the mutation)."""
    if delta:
        session.execute(update(_GENERATION).where(_GENERATION.c.id == 1)
                        .values(live_rules=_GENERATION.c.live_rules + delta))


def _live_rules(session: Session) -> int:
    return session.execute(select(_GENERATION.c.live_rules).where(_GENERATION.c.id == 1)).scalar_one()


def _audit(session: Session, audit: Audit | None, action: str, generation: int | None, detail: dict) -> None:
    if audit is None:
        return
    if audit.reason:
        detail = {**detail, "reason": audit.reason}
    session.execute(sa.insert(AuditRecord.__table__).values(
        actor=audit.actor, request_id=audit.request_id, action=action, generation=generation,
        detail=json.dumps(detail, default=str, sort_keys=True)))
    # Logged by _log_audit_lines once the transaction committed.
    session.info.setdefault("audit_lines", []).append(
        json.dumps({"actor": audit.actor, "request_id": audit.request_id, "action": action,
                    "generation": generation, **detail}, default=str, sort_keys=True))


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

def provider_fw_rule_create(spec: rules_mod.RuleSpec, description: str | None = None, created_by: str | None = None,
                            expires_at: datetime.datetime | None = None, audit: Audit | None = None,
                            max_rules: int | None = None) -> tuple[ProviderFirewallRule, int]:
    """Create one rule; return (rule, generation).  Raise DuplicateRule if it is already live."""
    result = provider_fw_rules_create_many([spec], description, created_by, expires_at, audit, max_rules)
    if not result.added:
        raise exception.DuplicateRule(spec)
    return result.added[0], result.generation


@_retry_on_deadlock
def provider_fw_rules_create_many(specs: Sequence[rules_mod.RuleSpec], description: str | None = None,
                                  created_by: str | None = None, expires_at: datetime.datetime | None = None,
                                  audit: Audit | None = None, max_rules: int | None = None,
                                  action: str = "rule.create") -> CreateResult:
    """Create every spec that is not already live, in ONE transaction and ONE generation.

    Specs already live (or repeated in ``specs``) are returned as duplicates.
    When nothing is added the transaction is rolled back and the generation
    stays as it was.
    """
    unique_specs = list(dict.fromkeys(specs))
    repeated = len(specs) - len(unique_specs)
    now = _now()
    with _session() as session:
        try:
            with session.begin():
                generation, live = _bump_generation(session)
                existing = _existing_live(session, unique_specs)
                # A live but expired copy is gone as far as enforcement goes:
                # retire it so the new rule can take its place.
                retired = [rules_mod.Rule(rid, spec, _epoch(exp)) for spec, (rid, exp) in existing.items()
                           if exp is not None and exp <= now]
                if retired:
                    expired_ids = [rule.id for rule in retired]
                    gone = _soft_delete(session, expired_ids, generation, now, "expiry")
                    _adjust_live_rules(session, -gone)
                    live -= gone
                    existing = {k: v for k, v in existing.items() if k not in {r.spec for r in retired}}
                new_specs = [s for s in unique_specs if s not in existing]
                duplicates = [s for s in unique_specs if s in existing]
                if not new_specs:
                    raise _NothingAdded(generation - 1, duplicates)
                if max_rules is not None:
                    if live + len(new_specs) > max_rules:
                        raise exception.RuleLimitExceeded(
                            f"max_rules: {live} live + {len(new_specs)} new exceeds the limit of {max_rules}")
                values = [dict(cidr=s.cidr, ip_version=s.version, protocol=s.protocol, from_port=s.from_port,
                               to_port=s.to_port, description=description, created_by=created_by, created_at=now,
                               expires_at=expires_at, created_generation=generation, deleted=0) for s in new_specs]
                added_count = len(values)
                if added_count > BULK_THRESHOLD:
                    _bulk_insert(session, values)
                    rows = []
                elif session.get_bind().dialect.insert_executemany_returning_sort_by_parameter_order:
                    # One INSERT .. RETURNING (Core): the ORM's unit of work costs more than the INSERT,
                    # and this runs under the generation row lock.  The rows answer like model objects.
                    rows = list(session.execute(
                        sa.insert(_RULES).returning(*_RULES.c, sort_by_parameter_order=True), values))
                else:
                    rows = [ProviderFirewallRule(**v) for v in values]
                    session.add_all(rows)
                    session.flush()
                _adjust_live_rules(session, added_count)
                detail: dict = {"count": added_count}
                if rows and len(rows) <= 10:
                    detail["rules"] = [{"id": r.id, **_spec_of(r).as_dict()} for r in rows]
                if duplicates or repeated:
                    detail["duplicates"] = len(duplicates) + repeated
                _audit(session, audit, action, generation, detail)
        except _NothingAdded as nothing:
            # Rolled back: the generation bump is undone, nothing changed.
            return CreateResult(nothing.generation, [], nothing.duplicates, 0)
        except sa_exc.IntegrityError as exc:
            # Only a live copy written by a concurrent request makes this a duplicate;
            # any other constraint failure is a server error, not the client's 409.
            with _session() as check:
                raced = _existing_live(check, unique_specs)
            if raced:
                LOG.debug("create raced with another writer: %s", exc)
                raise exception.DuplicateRule(unique_specs[0] if len(unique_specs) == 1 else None) from None
            raise exception.ProvfwError(f"the database refused the change: {exc.orig}") from exc
    return CreateResult(generation, rows, duplicates, added_count, retired)


_BULK_COLUMNS = ("cidr", "ip_version", "protocol", "from_port", "to_port", "description", "created_by", "created_at",
                 "expires_at", "created_generation", "deleted")


def _bulk_insert(session: Session, values: list[dict]) -> None:
    """Insert many rule rows without reading them back.

    PostgreSQL gets one COPY (about 4x faster than multi-row INSERTs for an
    import of 120k rules); other databases get Core executemany batches.
    Either way it runs inside the caller's transaction.  The table's
    statistics are refreshed afterwards on PostgreSQL, so the planner keeps
    using the generation indexes for deltas instead of scanning the table.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for row in values:
            writer.writerow(["" if row[c] is None else row[c] for c in _BULK_COLUMNS])
        buffer.seek(0)
        import psycopg2.extensions

        # Under eventlet psycopg2 runs green through a wait callback, and COPY
        # refuses to run with one set.  The COPY then blocks this process for its
        # ~2 s at 120k rows instead of ~5 s of green multi-row INSERTs.
        wait_callback = psycopg2.extensions.get_wait_callback()
        cursor = connection.connection.dbapi_connection.cursor()
        try:
            psycopg2.extensions.set_wait_callback(None)
            cursor.copy_expert(f"COPY provider_fw_rules ({', '.join(_BULK_COLUMNS)}) FROM STDIN WITH (FORMAT csv)",
                               buffer)
        finally:
            psycopg2.extensions.set_wait_callback(wait_callback)
            cursor.close()
        connection.exec_driver_sql("ANALYZE provider_fw_rules")
        return
    for start in range(0, len(values), 5000):
        session.execute(ProviderFirewallRule.__table__.insert(), values[start:start + 5000])


class _NothingAdded(Exception):
    def __init__(self, generation: int, duplicates: list):
        self.generation = generation
        self.duplicates = duplicates


def _existing_live(session: Session, specs: Sequence[rules_mod.RuleSpec]) -> dict:
    """Map each spec in ``specs`` that is live to (id, expires_at)."""
    found: dict = {}
    if not specs:
        return found
    by_cidr: dict[str, set] = {}
    for spec in specs:
        by_cidr.setdefault(spec.cidr, set()).add(spec)
    cidrs = list(by_cidr)
    cols = (ProviderFirewallRule.id, ProviderFirewallRule.cidr, ProviderFirewallRule.protocol,
            ProviderFirewallRule.from_port, ProviderFirewallRule.to_port, ProviderFirewallRule.expires_at)
    for start in range(0, len(cidrs), 1000):
        chunk = cidrs[start:start + 1000]
        for row in session.execute(select(*cols).where(_live(), ProviderFirewallRule.cidr.in_(chunk))):
            spec = _spec_of(row)
            if spec in by_cidr.get(spec.cidr, ()):
                found[spec] = (row.id, row.expires_at)
    return found


def _soft_delete(session: Session, ids: Iterable[int], generation: int, now: datetime.datetime,
                 deleted_by: str | None) -> int:
    ids = list(ids)
    count = 0
    for start in range(0, len(ids), 1000):
        # A Core statement: the ORM's bulk-update machinery costs more than the UPDATE, under the row lock.
        count += session.execute(
            update(_RULES)
            .where(_RULES.c.id.in_(ids[start:start + 1000]), _RULES.c.deleted == 0)
            .values(deleted=_RULES.c.id, deleted_at=now, deleted_generation=generation,
                    deleted_by=deleted_by, updated_at=now)).rowcount
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


def provider_fw_rule_get_all(cidr: str | None = None, protocol: str | None = None, limit: int | None = None,
                             marker: int | None = None) -> list[ProviderFirewallRule]:
    """Live, unexpired rules ordered by id; ``marker`` is the last id of the previous page."""
    query = select(ProviderFirewallRule).where(_in_force(_now())).order_by(ProviderFirewallRule.id)
    if cidr is not None:
        query = query.where(ProviderFirewallRule.cidr == cidr)
    if protocol is not None:
        query = query.where(ProviderFirewallRule.protocol == protocol)
    if marker is not None:
        query = query.where(ProviderFirewallRule.id > min(marker, MAX_ID))
    if limit is not None:
        query = query.limit(limit)
    with _session() as session:
        return list(session.scalars(query))


def provider_fw_rule_get_all_by_cidr(cidr: str) -> list[ProviderFirewallRule]:
    return provider_fw_rule_get_all(cidr=cidr)


_RULE_COLUMNS = (ProviderFirewallRule.id, ProviderFirewallRule.cidr, ProviderFirewallRule.protocol,
                 ProviderFirewallRule.from_port, ProviderFirewallRule.to_port, ProviderFirewallRule.expires_at)


@_retry_on_deadlock
def provider_fw_rule_destroy(rule_id: int, audit: Audit | None = None) -> Changes:
    """Soft-delete one live rule; return the change (one removed rule).  Raise RuleNotFound if it is not live or
    has expired (an expired rule is already out of force; the purge retires its row)."""
    now = _now()
    if not _storable_id(rule_id):
        raise exception.RuleNotFound(rule_id)
    with _session() as session, session.begin():
        generation, _count = _bump_generation(session)
        row = session.execute(select(*_RULE_COLUMNS).where(ProviderFirewallRule.id == rule_id, _in_force(now))).first()
        if row is None:
            raise exception.RuleNotFound(rule_id)
        _adjust_live_rules(session, -_soft_delete(session, [rule_id], generation, now, audit.actor if audit else None))
        _audit(session, audit, "rule.delete", generation, {"rules": [{"id": rule_id, **_spec_of(row).as_dict()}]})
    return Changes(generation - 1, generation, [], [rule_of(row)])


@_retry_on_deadlock
def provider_fw_rule_destroy_by_cidr(cidr: str, audit: Audit | None = None) -> Changes:
    """Soft-delete every live, unexpired rule for ``cidr``; return the change.  NotFound when there is none."""
    now = _now()
    with _session() as session, session.begin():
        generation, _count = _bump_generation(session)
        rows = session.execute(select(*_RULE_COLUMNS).where(ProviderFirewallRule.cidr == cidr, _in_force(now))
                               .order_by(ProviderFirewallRule.id)).all()
        if not rows:
            raise exception.NotFound(f"no provider firewall rules for {cidr}")
        ids = [row.id for row in rows]
        count = _soft_delete(session, ids, generation, now, audit.actor if audit else None)
        _adjust_live_rules(session, -count)
        _audit(session, audit, "cidr.unblock", generation, {"cidr": cidr, "count": count, "ids": ids})
    return Changes(generation - 1, generation, [], [rule_of(row) for row in rows])


@_retry_on_deadlock
def provider_fw_rule_purge_expired(now: datetime.datetime | None = None, older_than: datetime.timedelta | None = None,
                                   audit: Audit | None = None) -> Changes | None:
    """Soft-delete live rules whose expiry has passed; return the change, or None when nothing expired.

    Hosts already stopped enforcing them at expiry; this only tidies the table
    (and tells hosts through the generation that the rows are gone).
    """
    now = now or _now()
    cutoff = now - (older_than or datetime.timedelta(0))
    with _session() as session, session.begin():
        rows = session.execute(select(*_RULE_COLUMNS).where(
            _live(), ProviderFirewallRule.expires_at.is_not(None), ProviderFirewallRule.expires_at <= cutoff)).all()
        if not rows:
            return None
        generation, _count = _bump_generation(session)
        count = _soft_delete(session, [row.id for row in rows], generation, now, "expiry")
        _adjust_live_rules(session, -count)
        _audit(session, audit or Audit("expiry"), "rule.expire", generation, {"count": count})
    return Changes(generation - 1, generation, [], [rule_of(row) for row in rows])


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


def provider_fw_generation_get() -> int:
    """The generation of the current rule set."""
    return _current_generation()


def ping() -> int:
    """The current generation; DatabaseUnavailable when the database cannot be reached or answer."""
    try:
        return _current_generation()
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        # The type names what failed; the driver's text (host, port, user) stays in the caller's log.
        cause = getattr(exc, "orig", None) or exc
        raise exception.DatabaseUnavailable(f"database unreachable ({type(cause).__name__})") from exc


def provider_fw_snapshot(now: datetime.datetime | None = None, attempts: int = 5) -> Snapshot:
    """Every live, unexpired rule, consistent with one generation.

    Reads the generation before and after the rules and retries if a mutation
    committed in between, so the result never mixes two generations whatever
    the isolation level.
    """
    now = now or _now()
    for attempt in range(attempts):
        with _session() as session:
            before = _current_generation(session)
            rows = session.execute(select(*_RULE_COLUMNS).where(_live(), _not_expired(now))).all()
            session.rollback()
            after = _current_generation(session)
        if before == after:
            return Snapshot(after, [rules_mod.Rule(i, rules_mod.RuleSpec(c, p, f, t), _epoch(e))
                                    for i, c, p, f, t, e in rows])
        time.sleep(0.01 * (attempt + 1))
    raise exception.ProvfwError("rules kept changing while reading a snapshot; try again")


def provider_fw_changes_count_since(generation: int) -> int:
    """Rows created or deleted after ``generation``: two index-only counts, no rows read.

    An upper bound of ``provider_fw_changes_since``'s size (a row created and
    deleted in the window counts twice), so a caller can choose a snapshot
    without reading a delta it would throw away.
    """
    with _session() as session:
        created = session.execute(select(func.count()).select_from(ProviderFirewallRule).where(
            ProviderFirewallRule.created_generation > generation)).scalar_one()
        deleted = session.execute(select(func.count()).select_from(ProviderFirewallRule).where(
            ProviderFirewallRule.deleted_generation > generation)).scalar_one()
    return created + deleted


def provider_fw_changes_since(generation: int, attempts: int = 5) -> Changes:
    """The rules added and removed after ``generation`` (indexed by generation columns).

    A rule created and deleted within the window is in neither list; a rule
    deleted in the window is in ``removed`` only if it existed at ``generation``.
    """
    for attempt in range(attempts):
        with _session() as session:
            before = _current_generation(session)
            added = session.execute(select(*_RULE_COLUMNS, ProviderFirewallRule.deleted_generation).where(
                ProviderFirewallRule.created_generation > generation)).all()
            removed = session.execute(select(*_RULE_COLUMNS, ProviderFirewallRule.created_generation).where(
                ProviderFirewallRule.deleted_generation > generation)).all()
            session.rollback()
            after = _current_generation(session)
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
    PostgreSQL with one ``UPDATE ... FROM (VALUES ...)`` per 1,000 hosts, so a
    change applied by a whole fleet costs the same few statements at 10 hosts
    as at 1,000; elsewhere with one executemany, which the drivers send as one
    statement per host.  New hosts are inserted; a row another conductor
    inserted concurrently is retried as an update.  Rows are written in host
    order, so two conductors flushing at once lock them in the same order.
    """
    if not reports:
        return 0
    now = _now()
    for attempt in range(3):
        try:
            with _session() as session, session.begin():
                hosts = sorted(reports)
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
    """UPDATE the Service rows named by each dict's ``b_host`` with its other keys (one transaction)."""
    table = Service.__table__
    fields = (*SERVICE_REPORT_FIELDS, "updated_at")
    if connection.dialect.name != "postgresql":
        # SQLite and MariaDB cannot name the columns of a VALUES list (AS v (a, b)).
        connection.execute(update(table).where(table.c.host == sa.bindparam("b_host"), table.c.binary == binary)
                           .values({k: sa.bindparam(k) for k in fields}), updates)
        return
    for start in range(0, len(updates), 1000):
        chunk = updates[start:start + 1000]
        rows = sa.values(sa.column("b_host", table.c.host.type), *(sa.column(k, table.c[k].type) for k in fields),
                         name="reports").data([(u["b_host"], *(u[k] for k in fields)) for u in chunk])
        # A column that is NULL in every row of the list is typed text by PostgreSQL: cast each one back.
        connection.execute(update(table).where(table.c.host == rows.c.b_host, table.c.binary == binary)
                           .values({k: sa.cast(rows.c[k], table.c[k].type) for k in fields}))


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
