"""The generation row lock's metrics on real databases: how long a mutation waited for it, how long it held it.

Every mutation serialises on the generation row, so these two histograms are
what an operator reads to tell a lock-bound API (``rate()`` of the held
``_sum`` near 1) from a slow one, and contention between processes (the
wait).  Each test provokes the case it measures: another connection holds
the lock for a known time, a mutation that changes nothing rolls back, the
expiry purge locks the row before it bumps it.
"""

from __future__ import annotations

import datetime
import threading
import time

import pytest

from provfw import metrics, rules
from provfw.db import api as db
from provfw.db.sqlalchemy import api as db_impl
from tests.conftest import _empty
from tests.functional.test_db_group_commit import GenerationLock, Recorder, block, wait_for

pytestmark = pytest.mark.functional

HOLD = 0.5


@pytest.fixture(params=["postgresql", "mariadb", "sqlite"])
def any_db(request, _session_databases):
    yield _empty(_session_databases, request.param)


@pytest.fixture(params=["postgresql", "sqlite"])
def grouping_db(request, _session_databases):
    """The databases that group (ordered INSERT .. RETURNING); MariaDB commits each mutation alone."""
    yield _empty(_session_databases, request.param)


def sample(name: str, suffix: str) -> float:
    return metrics.CONTROL.get_sample_value(f"provfw_db_generation_lock_{name}_seconds_{suffix}") or 0.0


class Seen:
    """The two histograms' counts and sums when made; ``moved()`` says by how much each moved since."""

    def __init__(self):
        self.before = self._read()

    @staticmethod
    def _read() -> dict:
        return {(name, suffix): sample(name, suffix) for name in ("wait", "held") for suffix in ("count", "sum")}

    def moved(self) -> dict:
        return {key: value - self.before[key] for key, value in self._read().items()}


@pytest.mark.parametrize("notify", [None, Recorder()], ids=["alone", "group-commit"])
def test_a_mutation_kept_waiting_by_another_holder_reports_the_wait_and_its_own_hold(any_db, notify):
    seen = Seen()
    outcome: dict = {}
    lock = GenerationLock(any_db)
    try:
        thread = threading.Thread(target=lambda: outcome.setdefault("result", block("198.51.100.7/32", notify)))
        thread.start()
        time.sleep(HOLD)
    finally:
        released = time.monotonic()
        lock.release()
    thread.join(30)
    assert outcome["result"].added == 3
    moved = seen.moved()
    assert moved["wait", "count"] == 1 and moved["held", "count"] == 1
    # The mutation asked for the lock shortly after the thread started, so it waited most of HOLD (an
    # uncontended take is one round trip, about a millisecond).
    assert HOLD / 2 <= moved["wait", "sum"] < HOLD + 10
    # The hold is the mutation's own transaction, which began after the other holder let go.
    assert 0 < moved["held", "sum"] <= time.monotonic() - released


def test_a_mutation_that_changes_nothing_still_reports_its_hold_once(any_db):
    block("198.51.100.8/32", None)
    seen = Seen()
    again = block("198.51.100.8/32", None)
    assert again.changed is False
    moved = seen.moved()
    assert moved["wait", "count"] == 1 and moved["held", "count"] == 1


def test_the_expiry_purge_locks_then_bumps_and_is_one_hold(any_db):
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    db.provider_fw_rules_sync("manual", rules.external_block_specs("198.51.100.9/32"), action="cidr.block",
                              audit=db.Audit("lock-test"), expires_at=now + datetime.timedelta(hours=1))
    seen = Seen()
    change = db.provider_fw_rule_purge_expired(now=now + datetime.timedelta(hours=2))
    assert change is not None and len(change.removed) == 3
    moved = seen.moved()
    assert moved["wait", "count"] == 1 and moved["held", "count"] == 1


def test_a_group_of_mutations_is_one_hold(grouping_db):
    seen = Seen()
    lock = GenerationLock(grouping_db)
    outcomes: dict = {}
    recorder = Recorder()
    threads = []
    try:
        for index in range(4):
            cidr = f"203.0.113.{index}/32"
            threads.append(threading.Thread(target=lambda c=cidr: outcomes.setdefault(c, block(c, recorder))))
            threads[-1].start()
        wait_for(lambda: db_impl._GROUP._leading and len(db_impl._GROUP._queue) == 3, "three to queue")
    finally:
        lock.release()
    for thread in threads:
        thread.join(30)
    assert sorted(result.added for result in outcomes.values()) == [3, 3, 3, 3]
    moved = seen.moved()
    # The leader alone, then the three queued behind it as one transaction.
    assert moved["held", "count"] == 2 and moved["wait", "count"] == 2
