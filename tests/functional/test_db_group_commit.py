"""The group commit (``provfw.db.sqlalchemy.api.GroupCommit``) on real databases.

Each test holds the generation row lock from another connection, as a long
mutation would: the first provfw mutation then leads and waits on the lock
with a group of one, while the next ones queue behind it.  When the lock is
released the leader commits, and the queued mutations must commit as ONE
group: one generation, one COMMIT, one notify with their merged change, each
caller answered with its own result or its own error.
"""

from __future__ import annotations

import datetime
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from provfw import exception, rules
from provfw.db import api as db
from provfw.db.sqlalchemy import api as db_impl
from provfw.rules import make_spec
from tests.conftest import _empty

pytestmark = pytest.mark.functional


@pytest.fixture(params=["postgresql", "sqlite"])
def grouping_db(request, _session_databases):
    """The databases that group (ordered INSERT .. RETURNING); MariaDB commits each mutation alone."""
    yield _empty(_session_databases, request.param)


class Recorder:
    """A notify callback: records every change it is given and says it was cast."""

    def __init__(self):
        self.changes: list[rules.Changes] = []

    def __call__(self, changes: rules.Changes) -> bool:
        self.changes.append(changes)
        return True


class GenerationLock:
    """Hold the generation row's lock from a connection of our own until ``release``."""

    def __init__(self, database):
        self.database = database
        if database.kind == "sqlite":
            self.conn = sqlite3.connect(sa.engine.make_url(database.url).database, isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("UPDATE provider_fw_generation SET live_rules = live_rules WHERE id = 1")
        else:
            self.engine = sa.create_engine(database.url, poolclass=sa.pool.NullPool)
            self.conn = self.engine.connect()
            self.conn.exec_driver_sql("SELECT generation FROM provider_fw_generation WHERE id = 1 FOR UPDATE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()
        if self.database.kind != "sqlite":
            self.engine.dispose()


def in_thread(outcomes: dict, name: str, call, *args, **kwargs) -> threading.Thread:
    def run():
        try:
            outcomes[name] = call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcomes[name] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def leader_waiting_and_queued(count: int):
    group = db_impl._GROUP
    return lambda: group._leading and len(group._queue) == count


def queued_behind_the_lock(database, leader: tuple, queued: list[tuple]) -> dict:
    """Hold the generation lock; start ``leader`` (name, call, *args), wait until it leads, then start each of
    ``queued`` in order, each waiting until queued; release the lock; return every call's answer or error."""
    outcomes: dict = {}
    threads = []
    lock = GenerationLock(database)
    try:
        threads.append(in_thread(outcomes, *leader))
        wait_for(leader_waiting_and_queued(0), "the leader to take its group")
        for name, *call in queued:
            threads.append(in_thread(outcomes, name, *call))
            wait_for(leader_waiting_and_queued(len(threads) - 1), f"{name} to queue")
    finally:
        lock.release()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def block(cidr: str, notify) -> db.SyncResult:
    return db.provider_fw_rules_sync("manual", rules.external_block_specs(cidr), action="cidr.block",
                                     audit=db.Audit("group-test"), notify=notify)


def unblock(cidr: str, notify) -> rules.Changes:
    return db.provider_fw_rule_destroy_by_cidr(cidr, audit=db.Audit("group-test"), notify=notify)


def as_state(snapshot) -> dict:
    return {rule.id: (rule.spec, rule.expires_at) for rule in snapshot.rules}


def applied(state: dict, change: rules.Changes) -> dict:
    """What a host holds after applying ``change`` to ``state`` (removals by id, then additions)."""
    after = {rule_id: value for rule_id, value in state.items() if rule_id not in {r.id for r in change.removed}}
    after.update((rule.id, (rule.spec, rule.expires_at)) for rule in change.added)
    return after


def test_mutations_queued_behind_the_lock_commit_as_one_group_with_one_merged_cast(grouping_db):
    block("192.0.2.0/24", None)
    start = db.provider_fw_generation_get()
    recorder = Recorder()
    before = as_state(db.provider_fw_snapshot())
    outcomes = queued_behind_the_lock(grouping_db, ("leader", block, "198.51.100.1/32", recorder), [
        ("new", block, "198.51.100.2/32", recorder), ("unblock", unblock, "192.0.2.0/24", recorder),
        ("missing", unblock, "203.0.113.0/24", recorder), ("again", block, "198.51.100.2/32", recorder)])

    # The leader went alone (start+1); the four queued behind it share start+2.
    assert outcomes["leader"].generation == start + 1 and outcomes["leader"].notified is True
    assert outcomes["new"].generation == start + 2 and outcomes["new"].added == 3
    assert isinstance(outcomes["unblock"], rules.Changes) and len(outcomes["unblock"].removed) == 3
    assert outcomes["unblock"].generation == start + 2
    assert isinstance(outcomes["missing"], exception.NotFound)
    assert outcomes["again"].changed is False and outcomes["again"].duplicate == 3
    assert db.provider_fw_generation_get() == start + 2

    # One notify per generation; the group's is the merge of its changes and takes a host from one
    # snapshot to the next.
    assert [(c.since, c.generation) for c in recorder.changes] == [(start, start + 1), (start + 1, start + 2)]
    group = recorder.changes[1]
    assert sorted(r.id for r in group.added) == sorted(r.id for r in outcomes["new"].changes.added)
    assert sorted(r.id for r in group.removed) == sorted(r.id for r in outcomes["unblock"].removed)
    after_leader = applied(before, recorder.changes[0])
    assert applied(after_leader, group) == as_state(db.provider_fw_snapshot())

    # Every mutation that changed something has its own audit row, with the generation it committed in.
    audited = [(row.action, row.generation) for row in db.audit_get_all() if row.actor == "group-test"]
    assert sorted(audited) == sorted([("cidr.block", start), ("cidr.block", start + 1), ("cidr.block", start + 2),
                                      ("cidr.unblock", start + 2)])
    assert db.provider_fw_rule_count() == 6


def test_a_cidr_blocked_and_unblocked_in_one_group_is_only_removed_in_the_cast(grouping_db):
    start = db.provider_fw_generation_get()
    recorder = Recorder()
    outcomes = queued_behind_the_lock(grouping_db, ("leader", block, "198.51.100.1/32", recorder), [
        ("block", block, "203.0.113.9/32", recorder), ("unblock", unblock, "203.0.113.9/32", recorder)])

    created = {rule.id for rule in outcomes["block"].changes.added}
    assert {rule.id for rule in outcomes["unblock"].removed} == created and len(created) == 3
    group = recorder.changes[-1]
    assert (group.since, group.generation) == (start + 1, start + 2)
    assert not {rule.id for rule in group.added} & created
    assert {rule.id for rule in group.removed} == created
    assert db.provider_fw_rule_get_all(cidr="203.0.113.9/32") == []


def test_a_step_that_fails_after_writing_spoils_no_other_mutation(grouping_db):
    """A failure that leaves the transaction unusable rolls the group back; each mutation then runs alone."""
    recorder = Recorder()

    def spoiling_step(session, m):
        m.wrote = True
        session.connection().execute(sa.insert(db_impl.AuditRecord.__table__).values(
            actor="spoiler", action="test", detail="{}"))
        raise exception.ProvfwError("failed after writing")

    def spoiling_alone():
        raise exception.ProvfwError("failed alone too")

    outcomes = queued_behind_the_lock(grouping_db, ("leader", block, "198.51.100.1/32", recorder), [
        ("block", block, "198.51.100.2/32", recorder),
        ("spoiler", db_impl._GROUP.run, spoiling_step, spoiling_alone, recorder)])

    assert str(outcomes["spoiler"]) == "failed alone too"
    assert outcomes["block"].added == 3 and outcomes["block"].notified is True
    assert [rule.cidr for rule in db.provider_fw_rule_get_all()] == ["198.51.100.1/32"] * 3 + ["198.51.100.2/32"] * 3
    assert not [row for row in db.audit_get_all() if row.actor == "spoiler"]
    # The block ran alone after the group failed: its own generation and its own cast.
    assert [(c.generation, len(c.added)) for c in recorder.changes][-1] == (outcomes["block"].generation, 3)
    assert not db_impl._GROUP._leading and not db_impl._GROUP._queue


def replace(cidr: str, notify) -> db.SyncResult:
    return db.provider_fw_rules_sync(f"import:{cidr.replace('/', '_')}", [make_spec(cidr)], mode="replace",
                                     notify=notify)


@pytest.mark.parametrize("call, notify", [(block, None), (replace, Recorder())], ids=["no-notify", "replace"])
def test_callers_without_notify_and_replaces_never_group(grouping_db, call, notify):
    """Callers that cast their own change (the conductor, provfw-manage) get a generation of their own, and so
    does a replace, whose short list may still remove a whole source."""
    outcomes, threads = {}, []
    lock = GenerationLock(grouping_db)
    try:
        for index in range(3):
            threads.append(in_thread(outcomes, str(index), call, f"198.51.100.{index}/32", notify))
        time.sleep(0.3)
        assert not db_impl._GROUP._queue
    finally:
        lock.release()
    for thread in threads:
        thread.join(30)
    assert sorted(result.generation for result in outcomes.values()) == [1, 2, 3]


def test_a_notify_that_raises_costs_no_caller_its_answer(grouping_db):
    """The change committed before notify ran: every caller of the group gets its result, notified False."""
    def broken(changes):
        raise RuntimeError("bus exploded")

    outcomes = queued_behind_the_lock(grouping_db, ("leader", block, "198.51.100.1/32", broken), [
        ("one", block, "198.51.100.2/32", broken), ("two", block, "198.51.100.3/32", broken)])
    assert [(outcomes[name].added, outcomes[name].notified) for name in ("leader", "one", "two")] == [
        (3, False), (3, False), (3, False)]
    assert outcomes["one"].generation == outcomes["two"].generation == outcomes["leader"].generation + 1
    assert not db_impl._GROUP._leading and not db_impl._GROUP._queue


def round_trips(database, run) -> int:
    """How many times provfw's engine sent a statement to the database while ``run()`` ran."""
    sent = []

    def count(*_args):
        sent.append(1)

    engine = db_impl.get_engine()
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        run()
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    return len(sent)


def test_a_groups_blocks_and_unblocks_cost_the_same_round_trips_whatever_its_size(grouping_db):
    """Blocks of new CIDRs and unblocks by every source are written together (``_run_batched``): a group of 16
    sends what a group of 4 sends, and every caller still gets its own answer."""
    recorder = Recorder()
    sent, answers = {}, {}
    for size, net in ((2, 10), (8, 20)):
        for index in range(size):
            block(f"198.51.{net}.{index}/32", None)
        queued = ([(f"block{index}", block, f"203.0.{net}.{index}/32", recorder) for index in range(size)]
                  + [(f"unblock{index}", unblock, f"198.51.{net}.{index}/32", recorder) for index in range(size)])

        def run(queued=queued, net=net):
            answers[net] = queued_behind_the_lock(grouping_db, ("leader", block, f"192.0.{net}.1/32", recorder),
                                                  queued)
        sent[size] = round_trips(grouping_db, run)
        outcomes = answers[net]
        generation = outcomes["leader"].generation + 1
        for index in range(size):
            assert outcomes[f"block{index}"].added == 3 and outcomes[f"block{index}"].generation == generation
            assert sorted(rule.cidr for rule, _ in outcomes[f"block{index}"].rules.values()) == [
                f"203.0.{net}.{index}/32"] * 3
            assert [r.spec.cidr for r in outcomes[f"unblock{index}"].removed] == [f"198.51.{net}.{index}/32"] * 3
            assert db.provider_fw_rule_get_all(cidr=f"198.51.{net}.{index}/32") == []
            assert len(db.provider_fw_rule_get_all(cidr=f"203.0.{net}.{index}/32")) == 3
        group = recorder.changes[-1]
        assert (len(group.added), len(group.removed)) == (3 * size, 3 * size)
        assert db.provider_fw_generation_get() == generation
    # SQLite's INSERT .. RETURNING answers rows in order only one row per execution (SQLAlchemy's
    # insertmanyvalues): 3 more calls per block there, in-process calls rather than round trips.
    assert sent[8] - sent[2] == (3 * (8 - 2) if grouping_db.kind == "sqlite" else 0)
    # Each rule has its source row, and each mutation its audit row.
    assert all(wants == [("manual", None)] for wants in db.provider_fw_rule_sources(
        [rule.id for rule in db.provider_fw_rule_get_all()]).values())
    audited = [row.action for row in db.audit_get_all(limit=1000) if row.generation == generation]
    assert sorted(audited) == ["cidr.block"] * 8 + ["cidr.unblock"] * 8


class HeldFirstCast(Recorder):
    """A notify whose first cast waits (a slow publisher confirm) until ``let_go`` is set."""

    def __init__(self):
        super().__init__()
        self.first_cast_started = threading.Event()
        self.let_go = threading.Event()

    def __call__(self, changes: rules.Changes) -> bool:
        first = not self.first_cast_started.is_set()
        self.first_cast_started.set()
        if first:
            assert self.let_go.wait(30)
        return super().__call__(changes)


def test_the_next_group_commits_during_a_cast_and_the_casts_still_leave_in_commit_order(grouping_db):
    # A leader hands the lead on at its COMMIT, before its cast: the next group's transaction runs while the
    # cast waits for the broker's confirm.  Its own cast waits for the one before it, so hosts get them in
    # generation order (a gap would cost each host a round trip to the conductor).
    start = db.provider_fw_generation_get()
    notify = HeldFirstCast()
    outcomes = {}
    leader = in_thread(outcomes, "leader", block, "198.51.100.1/32", notify)
    assert notify.first_cast_started.wait(15)
    nexts = [in_thread(outcomes, f"next{index}", block, f"198.51.100.{10 + index}/32", notify) for index in range(3)]
    try:
        wait_for(lambda: db.provider_fw_generation_get() > start + 1, "a next group to commit during the cast")
        time.sleep(0.2)
        assert notify.changes == []                  # committed, but its cast waits behind the first
    finally:
        notify.let_go.set()
    for thread in (leader, *nexts):
        thread.join(30)
    generations = [change.generation for change in notify.changes]
    assert generations == sorted(generations) and generations[0] == start + 1
    assert generations[-1] == db.provider_fw_generation_get()
    assert [change.since for change in notify.changes] == [start, *generations[:-1]]
    assert all(outcomes[name].notified is True for name in ("leader", "next0", "next1", "next2"))


def test_a_batched_group_answers_each_kind_of_add_and_unblock_as_alone(grouping_db):
    """Renewals, duplicates, the rule limit, a missing CIDR, two actors and a source-scoped unblock in one group
    of batched steps: each caller gets what it would have got alone."""
    recorder = Recorder()
    soon, later = (db_impl._now() + datetime.timedelta(hours=hours) for hours in (1, 24))
    db.provider_fw_rules_sync("manual", rules.external_block_specs("198.51.100.1/32"), expires_at=soon)  # to renew
    block("198.51.100.2/32", None)                     # to add again: duplicate
    block("198.51.100.3/32", None)                     # unblocked by "alice"
    block("198.51.100.4/32", None)                     # unblocked by "bob"
    db.provider_fw_rules_sync("feed:x", [make_spec("198.51.100.5/32")], action="rule.import")  # by source
    live = db.provider_fw_rule_count()

    def limited(cidr, notify):
        # The leader adds 3; the group's batched unblocks run before its adds and free 6 (alice, bob): room
        # for one more block of 3 under this limit, not two.
        return db.provider_fw_rules_sync("manual", rules.external_block_specs(cidr), action="cidr.block",
                                         max_rules=live, notify=notify)

    def unblock_as(actor):
        return lambda cidr, notify: db.provider_fw_rule_destroy_by_cidr(cidr, audit=db.Audit(actor), notify=notify)

    def renew(cidr, notify):
        return db.provider_fw_rules_sync("manual", rules.external_block_specs(cidr), expires_at=later,
                                         action="cidr.block", notify=notify)

    outcomes = queued_behind_the_lock(grouping_db, ("leader", block, "192.0.2.1/32", recorder), [
        ("renew", renew, "198.51.100.1/32", recorder),
        ("duplicate", block, "198.51.100.2/32", recorder),
        ("fits", limited, "203.0.113.1/32", recorder),
        ("over", limited, "203.0.113.2/32", recorder),
        ("alice", unblock_as("alice"), "198.51.100.3/32", recorder),
        ("bob", unblock_as("bob"), "198.51.100.4/32", recorder),
        ("missing", unblock, "203.0.113.99/32", recorder),
        ("by_source", lambda cidr, notify: db.provider_fw_rule_destroy_by_cidr(cidr, source="feed:x", notify=notify),
         "198.51.100.5/32", recorder)])

    generation = outcomes["leader"].generation + 1
    assert outcomes["renew"].renewed == 3 and outcomes["renew"].added == 0
    assert {wants[0][1] for _, wants in outcomes["renew"].rules.values()} == {later}
    assert outcomes["duplicate"].changed is False and outcomes["duplicate"].duplicate == 3
    assert outcomes["fits"].added == 3
    assert isinstance(outcomes["over"], exception.RuleLimitExceeded)
    assert db.provider_fw_rule_get_all(cidr="203.0.113.2/32") == []
    assert isinstance(outcomes["missing"], exception.NotFound)
    assert len(outcomes["by_source"].removed) == 1
    with db_impl._session() as session:
        deleted_by = dict(session.execute(sa.select(db_impl.ProviderFirewallRule.cidr,
                                                    db_impl.ProviderFirewallRule.deleted_by)
                                          .where(db_impl.ProviderFirewallRule.deleted != 0)).all())
    assert deleted_by["198.51.100.3/32"] == "alice" and deleted_by["198.51.100.4/32"] == "bob"
    for name in ("renew", "fits", "alice", "bob", "by_source"):
        assert outcomes[name].generation == generation
    assert db.provider_fw_rule_count() == live + 3 + 3 - 3 - 3 - 1      # leader, fits; alice, bob, by_source
    group = recorder.changes[-1]
    assert {rule.spec.cidr for rule in group.added} == {"198.51.100.1/32", "203.0.113.1/32"}
    assert {rule.spec.cidr for rule in group.removed} == {"198.51.100.3/32", "198.51.100.4/32", "198.51.100.5/32"}


@pytest.fixture
def wire_db(pg_db):
    """provfw's engine connected to ``pg_db`` through a TCP proxy that logs every query sent (``QueryLog``)."""
    from tests.lib.pgwire import QueryLog
    from tests.lib.tcpproxy import TcpProxy

    url = sa.engine.make_url(pg_db.url)
    log = QueryLog()
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432, on_client_data=log.feed) as proxy:
        db.configure(url.set(host=proxy.listen_host, port=proxy.port).render_as_string(hide_password=False),
                     pool_size=1)
        try:
            yield log
        finally:
            db.dispose()
            db.configure(pg_db.url)


def test_begin_and_commit_ride_on_a_creates_first_and_last_statements_on_the_wire(wire_db):
    """Counted at the wire, psycopg2's own BEGIN and COMMIT included: a one-rule create is two round trips
    (six before they rode on the bump and on the audit row, four before the look-up rode on the bump and the
    new rule on the audit row), and every way a transaction ends leaves the connection as psycopg2 would:
    autocommit off, no transaction open on the server."""
    recorder = Recorder()

    def create(cidr, actor="group-test"):
        return db.provider_fw_rules_sync("manual", [make_spec(cidr)], action="rule.create",
                                         audit=db.Audit(actor), notify=recorder)

    def pooled_connection_is_clean():
        with db_impl.get_engine().connect() as conn:
            raw = conn.connection.dbapi_connection
            return raw.autocommit is False and raw.info.transaction_status == db_impl._PG_IDLE

    create("192.0.2.1/32")                                           # warm: the pool, the statement caches
    wire_db.take()
    create("192.0.2.2/32")
    sent = wire_db.take()
    assert len(sent) == 2, sent
    assert sent[0].startswith("BEGIN; UPDATE provider_fw_generation") and sent[-1].endswith("; COMMIT")
    assert "cidr = ANY(CAST(ARRAY['192.0.2.2/32'] AS VARCHAR[]))" in sent[0]           # the look-up rode on it
    assert not any(query.strip().upper() in ("BEGIN", "COMMIT", "ROLLBACK") for query in sent)
    assert pooled_connection_is_clean()

    # Nothing changed (the rule exists): the bump is rolled back, by a ROLLBACK of our own.
    wire_db.take()
    assert create("192.0.2.2/32").changed is False
    assert wire_db.take()[-1] == "ROLLBACK" and pooled_connection_is_clean()

    # The audit row cannot be written (actor is VARCHAR(255)): the riding COMMIT never runs.
    with pytest.raises(sa.exc.DBAPIError):
        create("192.0.2.3/32", actor="x" * 300)
    assert wire_db.take()[-1] == "ROLLBACK" and pooled_connection_is_clean()

    create("192.0.2.4/32")
    assert len(wire_db.take()) == 2
    assert sorted(rule.cidr for rule in db.provider_fw_rule_get_all()) == [
        "192.0.2.1/32", "192.0.2.2/32", "192.0.2.4/32"]
    assert [row.action for row in db.audit_get_all()] == ["rule.create"] * 3
    assert [len(change.added) for change in recorder.changes] == [1, 1, 1]


def test_a_one_rule_create_is_two_statements_on_postgresql(grouping_db):
    """The +1 CIDR path under the generation row lock: the bump with the look-up and the new rule's id (one
    query on PostgreSQL), then the rule with its source row, the audit row and the live-rule counter (one on
    PostgreSQL); BEGIN and COMMIT are the driver's own."""
    recorder = Recorder()

    def create(cidr):
        # As the API's create calls it: its answer comes from the sync's own transaction.
        return db.provider_fw_rules_sync("manual", [make_spec(cidr)], action="rule.create",
                                         audit=db.Audit("group-test"), notify=recorder)

    create("192.0.2.1/32")                                           # warm: the statement caches
    sent = round_trips(grouping_db, lambda: create("192.0.2.2/32"))
    # SQLite: BEGIN IMMEDIATE is a statement of its own, and the bump, the look-up, the rule with its
    # source row and the audit row with the counter are one or two each.
    assert sent == (2 if grouping_db.kind == "postgresql" else 7)
    assert db.provider_fw_rule_count() == 2
    assert [row.action for row in db.audit_get_all()] == ["rule.create", "rule.create"]
    assert [len(change.added) for change in recorder.changes] == [1, 1]


def test_an_unblock_retires_its_rules_and_forgets_their_sources_in_one_statement_on_postgresql(pg_db, wire_db):
    """Under the generation row lock an unblock is the bump with the retire of its rules and the deletion of
    their source rows (a data-modifying WITH after the bump, in the same query), and the audit row with
    COMMIT: two round trips (four before the retire and the deletion were one, three before they rode on the
    bump), alone and for a group; the sources are gone all the same."""
    recorder = Recorder()
    for index in range(5):
        block(f"198.51.100.{index}/32", recorder)
    ids = [rule.id for rule in db.provider_fw_rule_get_all(cidr="198.51.100.0/32")]
    wire_db.take()
    unblock("198.51.100.0/32", recorder)
    sent = [" ".join(query.split()) for query in wire_db.take()]
    assert len(sent) == 2, sent
    assert sent[0].startswith("BEGIN; UPDATE provider_fw_generation") and "retired AS (UPDATE provider_fw_rules" \
        in sent[0] and "DELETE FROM provider_fw_rule_sources" in sent[0]
    assert db.provider_fw_rule_sources(ids) == {}
    assert [rule.id for rule in recorder.changes[-1].removed] == sorted(ids)

    # A group of unblocks by one actor: the same two, whatever its size.
    queued = [(f"unblock{index}", unblock, f"198.51.100.{index}/32", recorder) for index in range(2, 5)]
    wire_db.take()
    outcomes = queued_behind_the_lock(pg_db, ("leader", unblock, "198.51.100.1/32", recorder), queued)
    sent = [" ".join(query.split()) for query in wire_db.take()]
    assert [len(outcomes[f"unblock{index}"].removed) for index in range(2, 5)] == [3, 3, 3]
    assert len(sent) == 4 and sum("retired AS (UPDATE provider_fw_rules" in query for query in sent) == 2, sent
    assert not any(query.startswith("DELETE FROM provider_fw_rule_sources") for query in sent), sent
    assert db.provider_fw_rule_get_all() == [] and db.provider_fw_rule_sources(
        [rule.id for change in recorder.changes for rule in change.removed]) == {}


def test_a_group_of_blocks_and_unblocks_is_two_round_trips_on_postgresql(pg_db, wire_db):
    """A group's unblocks (one actor) are retired, its blocks' CIDRs looked up and ids taken for their rules in
    the query that bumps the generation (``_bump_and_read``), so the group is that query and one more: the
    new rules with their source rows, the audit rows and COMMIT.  A block whose CIDR holds an expired live
    copy is answered from the same look-up as alone: the copy retired, a new rule in its place."""
    recorder = Recorder()
    for index in range(3):
        block(f"198.51.100.{index}/32", recorder)
    expired = db.provider_fw_rules_sync("manual", [make_spec("192.0.2.7/32")],
                                        expires_at=db_impl._now() - datetime.timedelta(seconds=1))
    queued = ([(f"unblock{index}", unblock, f"198.51.100.{index}/32", recorder) for index in range(1, 3)]
              + [(f"block{index}", block, f"203.0.113.{index}/32", recorder) for index in range(3)]
              + [("renewing", lambda cidr, notify: db.provider_fw_rules_sync(
                  "manual", [make_spec(cidr)], action="rule.create", audit=db.Audit("group-test"), notify=notify),
                  "192.0.2.7/32", recorder)])
    wire_db.take()
    outcomes = queued_behind_the_lock(pg_db, ("leader", unblock, "198.51.100.0/32", recorder), queued)
    sent = [" ".join(query.split()) for query in wire_db.take()]
    # The leader's group of one (two round trips), then the group of eight: the bump with the retire, the
    # look-up and the ids, the source rows of the live copy, its own writes (_sync_write: retire, forget its
    # sources, the new rule with its source row), then the blocks' new rules with the audit rows and COMMIT.
    first = sent[2]
    assert first.startswith("BEGIN; UPDATE provider_fw_generation") and "retired AS (UPDATE provider_fw_rules" \
        in first and "'203.0.113.0/32'" in first and "'192.0.2.7/32'" in first, first
    assert sent[-1].endswith("; COMMIT") and len(sent) == 2 + 6, sent
    assert sent[-1].startswith("WITH data AS (SELECT * FROM json_to_recordset")
    assert not any(query.startswith("WITH retired") for query in sent), sent
    generation = outcomes["block0"].generation
    assert [len(outcomes[f"unblock{index}"].removed) for index in (1, 2)] == [3, 3]
    assert [outcomes[f"block{index}"].added for index in range(3)] == [3, 3, 3]
    assert outcomes["renewing"].added == 1 and outcomes["renewing"].deleted == 1
    assert outcomes["renewing"].generation == generation
    (old_id,) = expired.rule_ids.values()
    (new_id,) = outcomes["renewing"].rule_ids.values()
    assert new_id != old_id and [rule.id for rule in db.provider_fw_rule_get_all(cidr="192.0.2.7/32")] == [new_id]
    assert db.provider_fw_rule_get_all(cidr="198.51.100.1/32") == []
    group = recorder.changes[-1]
    assert group.generation == generation
    assert len(group.added) == 3 * 3 + 1 and len(group.removed) == 3 * 2 + 1
    audited = sorted(row.action for row in db.audit_get_all(limit=100) if row.generation == generation)
    assert audited == ["cidr.block"] * 3 + ["cidr.unblock"] * 2 + ["rule.create"]

    # Without the live copy the same group is two round trips.
    queued = ([(f"unblock{index}", unblock, f"203.0.113.{index}/32", recorder) for index in range(1, 3)]
              + [(f"block{index}", block, f"203.0.113.{10 + index}/32", recorder) for index in range(3)])
    wire_db.take()
    outcomes = queued_behind_the_lock(pg_db, ("leader", unblock, "203.0.113.0/32", recorder), queued)
    sent = [" ".join(query.split()) for query in wire_db.take()]
    assert len(sent) == 2 + 2, sent
    assert [outcomes[f"block{index}"].added for index in range(3)] == [3, 3, 3]
    assert [len(outcomes[f"unblock{index}"].removed) for index in (1, 2)] == [3, 3]


def test_a_new_rule_the_database_refuses_at_commit_spoils_no_other_mutation(grouping_db):
    """On PostgreSQL a batched group's new rules are written with its COMMIT (``_defer_new_rules``): a row the
    database refuses there (a description past VARCHAR(255)) rolls the group back, each mutation runs alone,
    and only the refused one fails."""
    recorder = Recorder()

    def long_description(cidr, notify):
        return db.provider_fw_rules_sync("manual", rules.external_block_specs(cidr), description="x" * 300,
                                         action="cidr.block", audit=db.Audit("group-test"), notify=notify)

    outcomes = queued_behind_the_lock(grouping_db, ("leader", block, "198.51.100.1/32", recorder), [
        ("block", block, "198.51.100.2/32", recorder), ("refused", long_description, "198.51.100.3/32", recorder),
        ("unblock", unblock, "198.51.100.1/32", recorder)])
    assert outcomes["block"].added == 3 and outcomes["block"].notified is True
    assert len(outcomes["unblock"].removed) == 3
    if grouping_db.kind == "postgresql":
        assert isinstance(outcomes["refused"], sa.exc.DBAPIError), outcomes["refused"]
    assert [rule.cidr for rule in db.provider_fw_rule_get_all()] == ["198.51.100.2/32"] * 3 + (
        [] if grouping_db.kind == "postgresql" else ["198.51.100.3/32"] * 3)
    assert not db_impl._GROUP._leading and not db_impl._GROUP._queue
