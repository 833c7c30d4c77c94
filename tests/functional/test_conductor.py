"""ConductorManager's caches and counters on a real PostgreSQL (127.0.0.1:5432), without the bus.

The manager's handlers are called directly, as its server would call them,
so a test can count what one request, or a thousand, cost the database.
"""

from __future__ import annotations

import pytest

from provfw import rpc
from provfw.conductor import manager as conductor_manager
from provfw.db import api as db
from provfw.rules import make_spec

pytestmark = pytest.mark.functional


def kind_and_generation(reply: rpc.Reply) -> tuple[str, int]:
    payload = rpc.decode_reply(reply.body)
    return payload["kind"], payload["generation"]


def test_hosts_catching_up_on_a_bulk_import_cost_one_delta_read_and_one_snapshot_read(conf, pg_db):
    conf.set_override("max_delta_rules", 10, group="conductor")
    manager = conductor_manager.ConductorManager(conf)
    _, before = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    imported = db.provider_fw_rules_create_many([make_spec(f"198.51.100.{i}") for i in range(1, 51)])
    statements = db.statement_counts()["statements"]

    # 300 hosts at the old generation, told of the new one by the import's cast.
    replies = [manager.get_provider_fw_rules(before, imported.generation) for _ in range(300)]

    assert {kind_and_generation(reply) for reply in replies} == {("snapshot", imported.generation)}
    assert len({id(reply) for reply in replies}) == 1, "one encoded snapshot, sent to every host"
    assert (manager.stats["delta_reads"], manager.stats["snapshot_reads"]) == (1, 1)
    assert manager.stats["delta_too_large_hits"] == 299
    # a generation read, the delta (4 statements), the snapshot (3): nothing per host
    assert db.statement_counts()["statements"] - statements <= 10


def test_a_small_delta_is_read_once_for_every_host_that_asks(conf, pg_db):
    manager = conductor_manager.ConductorManager(conf)
    _, before = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    _, after = db.provider_fw_rule_create(make_spec("203.0.113.6"))

    replies = [manager.get_provider_fw_rules(before, after) for _ in range(50)]

    assert {kind_and_generation(reply) for reply in replies} == {("delta", after)}
    assert (manager.stats["delta_reads"], manager.stats["delta_hits"], manager.stats["snapshot_reads"]) == (1, 49, 0)


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
