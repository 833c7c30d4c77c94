"""ConductorManager's caches and counters on a real PostgreSQL (127.0.0.1:5432), without the bus.

The manager's handlers are called directly, as its server would call them,
so a test can count what one request, or a thousand, cost the database.
"""

from __future__ import annotations

import threading
import time

import pytest

from provfw import rpc
from provfw.conductor import manager as conductor_manager
from provfw.conductor import service as conductor_service
from provfw.db import api as db
from provfw.rules import make_spec
from tests.lib.netns import wait_until

pytestmark = pytest.mark.functional


def kind_and_generation(reply: rpc.Reply) -> tuple[str, int]:
    payload = rpc.decode_reply(reply.body)
    return payload["kind"], payload["generation"]


def test_hosts_catching_up_on_a_bulk_import_cost_one_count_and_one_snapshot_read(conf, pg_db):
    conf.set_override("max_delta_rules", 10, group="conductor")
    manager = conductor_manager.ConductorManager(conf)
    _, before = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    imported = db.provider_fw_rules_create_many([make_spec(f"198.51.100.{i}") for i in range(1, 51)])
    statements = db.statement_counts()["statements"]

    # 300 hosts at the old generation, told of the new one by the import's cast, asking at once.
    received = time.monotonic()
    replies = [manager.get_provider_fw_rules(before, imported.generation, received) for _ in range(300)]

    assert {kind_and_generation(reply) for reply in replies} == {("snapshot", imported.generation)}
    assert len({id(reply) for reply in replies}) == 1, "one encoded snapshot, sent to every host"
    # The delta is counted, found too large and never read; the verdict is cached for the other 299.
    assert (manager.stats["delta_reads"], manager.stats["snapshot_reads"]) == (0, 1)
    assert manager.stats["delta_too_large_hits"] == 299
    # a generation read, the count (2 statements), the snapshot (3): nothing per host
    assert db.statement_counts()["statements"] - statements <= 10


def test_a_small_delta_is_read_once_for_every_host_that_asks(conf, pg_db):
    manager = conductor_manager.ConductorManager(conf)
    _, before = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    _, after = db.provider_fw_rule_create(make_spec("203.0.113.6"))

    replies = [manager.get_provider_fw_rules(before, after) for _ in range(50)]

    assert {kind_and_generation(reply) for reply in replies} == {("delta", after)}
    assert (manager.stats["delta_reads"], manager.stats["delta_hits"], manager.stats["snapshot_reads"]) == (1, 49, 0)


def test_a_host_behind_a_purge_gets_a_snapshot_and_one_after_it_a_delta(conf, pg_db):
    """Rules deleted long ago and purged (provfw-manage db purge) cannot be sent as a delta's removals."""
    import datetime

    import sqlalchemy as sa

    from provfw.db.sqlalchemy import models

    manager = conductor_manager.ConductorManager(conf)
    gone, behind = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    purged = db.provider_fw_rule_destroy(gone.id).generation
    _, current = db.provider_fw_rule_create(make_spec("203.0.113.6"))
    with db.get_engine().begin() as conn:
        conn.execute(sa.update(models.ProviderFirewallRule.__table__).values(
            deleted_at=models.utcnow() - datetime.timedelta(days=30)).where(models.ProviderFirewallRule.deleted != 0))
    assert db.provider_fw_purge_deleted(models.utcnow() - datetime.timedelta(days=7)).purged_generation == purged

    snapshot = rpc.decode_reply(manager.get_provider_fw_rules(behind, current).body)
    delta = rpc.decode_reply(manager.get_provider_fw_rules(purged, current).body)

    assert (snapshot["kind"], snapshot["generation"], [rule[1] for rule in snapshot["rules"]]) == (
        "snapshot", current, ["203.0.113.6/32"])
    assert (delta["kind"], [rule[1] for rule in delta["added"]], delta["removed"]) == (
        "delta", ["203.0.113.6/32"], [])


def test_a_fresh_request_is_not_answered_unchanged_from_a_cached_generation(conf, pg_db):
    """A worker whose consumer just (re)connected may have missed a cast younger than the cache's TTL."""
    conf.set_override("generation_cache_ttl", 60.0, group="conductor")
    manager = conductor_manager.ConductorManager(conf)
    _, before = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    assert kind_and_generation(manager.get_provider_fw_rules(before)) == ("delta", before)   # caches `before`
    received = time.monotonic()
    _, after = db.provider_fw_rule_create(make_spec("203.0.113.6"))     # the cast the worker did not hear

    cached = rpc.decode_reply(manager.get_provider_fw_rules(before, None, received).body)
    fresh = manager.handle(rpc.Incoming("get_provider_fw_rules",
                                        {"host": "hv-1", "since_generation": before, "fresh": True},
                                        "guest", "reply-queue", "c-1", received_at=received))

    assert (cached["generation"], cached["added"]) == (before, []), "a periodic check may use the cache"
    payload = rpc.decode_reply(fresh.body)
    assert (payload["kind"], payload["since"], payload["generation"]) == ("delta", before, after)
    assert [rule[1] for rule in payload["added"]] == ["203.0.113.6/32"]


def test_a_malformed_fresh_flag_is_refused(conf, pg_db):
    manager = conductor_manager.ConductorManager(conf)
    reply = manager.handle(rpc.Incoming("get_provider_fw_rules", {"host": "hv-1", "since_generation": 1,
                                                                  "fresh": "yes"}, "guest", "reply-queue", "c-1"))
    assert "fresh a boolean" in reply["error"]


def test_counters_include_what_the_process_asked_of_the_database(conf, pg_db):
    manager = conductor_manager.ConductorManager(conf)
    db.provider_fw_rule_create(make_spec("203.0.113.5"))
    first = manager.counters()

    reply = manager.handle(rpc.Incoming("get_provider_fw_rules", {"host": "hv-1", "since_generation": None},
                                        "guest", "reply-queue", "c-1"))

    second = manager.counters()
    assert (second["requests"], second["snapshot_reads"], second["reply_bytes"]) == (1, 1, len(reply.body))
    # the current generation; then the snapshot: generation, rules, generation again
    assert second["db_statements"] - first["db_statements"] == 4
    assert second["db_rows_read"] - first["db_rows_read"] == 1 + 1 + 1 + 1


def _report(generation: int) -> dict:
    return {"applied_generation": generation, "rule_count": 1, "driver": "libvirt/ipset", "last_error": None}


def test_reports_of_a_fleet_applying_one_change_are_written_together(conf, pg_db):
    """Hosts report a new generation milliseconds apart; the conductor writes them in a transaction or two."""
    conf.set_override("report_flush_interval", 5.0, group="conductor")
    service = conductor_service.ConductorService(conf, host="conductor-test")
    flusher = threading.Thread(target=service._flush_loop, daemon=True)
    flusher.start()
    try:
        for index in range(30):
            service.manager.record_report(f"hv-{index:02d}", None, _report(7))
            time.sleep(0.001)
        assert wait_until(lambda: len(db.service_get_all()) == 30, 10) is not None

        assert service.manager.stats["report_flushes"] <= 2
        assert {row.applied_generation for row in db.service_get_all()} == {7}
    finally:
        service._stop.set()
        service.manager.flush_now.set()
        flusher.join(10)
