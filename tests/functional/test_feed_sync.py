"""The conductor's feed syncer end to end: a real HTTP server serving list files from tests/data, real
databases (SQLite, PostgreSQL, MariaDB), casts over the in-process bus to a real consumer."""

from __future__ import annotations

import datetime
import json
import queue
import secrets
import threading

import pytest
import sqlalchemy as sa

from provfw import rpc
from provfw.compute import api as compute_api
from provfw.conductor import feeds as conductor_feeds
from provfw.db import api as db
from provfw.db.sqlalchemy import models
from provfw.rules import make_spec
from tests.lib import bus
from tests.lib.httpserver import FeedServer, data_file

pytestmark = pytest.mark.functional

DAY1 = data_file("feeds", "sync", "daily-1.txt")
DAY2 = data_file("feeds", "sync", "daily-2.txt")
TRUNCATED = data_file("feeds", "sync", "daily-truncated.txt")


class Rig:
    """A FeedSyncer wired to the test database, a feed server and a real cast consumer."""

    def __init__(self, conf):
        self.conf = conf
        self.server = FeedServer()
        self.compute = compute_api.ComputeAPI(conf)
        self.casts: queue.Queue = queue.Queue()
        with rpc.connection(conf) as conn:      # the conductor's job in a deployment: workers bind passively
            rpc.fanout_exchange(conf)(conn.channel()).declare()
        self.consumer = rpc.FanoutConsumer(lambda method, args: self.casts.put(args), "feed-test", conf)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.thread.start()
        assert self.consumer.connected.wait(5)
        self.syncer = conductor_feeds.FeedSyncer(conf, self.compute, host="conductor-a")

    def add(self, name, path, body, **settings):
        self.server.publish(path, body)
        values = dict(url=self.server.url(path), format="auto", csv_column=None, protocol="all", from_port=None,
                      to_port=None, interval_seconds=3600, ttl_seconds=None, enabled=True, allow_non_global=False,
                      description=None)
        values.update(settings)
        return db.feed_create(name, values, audit=db.Audit("ops"))

    def run(self, name=None):
        """Make the feed(s) due now and sync what this conductor claims."""
        for feed in db.feed_get_all():
            if name is None or feed.name == name:
                _due_now(feed.name)
        return {o.feed: o for o in self.syncer.run_due()}

    def drain(self, timeout=0.3):
        return bus.drain(self.casts, timeout)

    def close(self):
        self.consumer.stop()
        self.thread.join(5)
        self.server.close()


def _due_now(name):
    """Move a feed's schedule to now without dropping its validators (what the scheduler does at its time)."""
    with db.get_engine().begin() as conn:
        conn.execute(sa.update(models.Feed).where(models.Feed.name == name)
                     .values(next_sync_at=models.utcnow() - datetime.timedelta(seconds=1)))


@pytest.fixture
def rig(conf, any_db):
    conf.set_override("control_exchange", "feed-test-" + secrets.token_hex(4))
    rig = Rig(conf)
    yield rig
    rig.close()


def cidrs(source=None):
    return sorted(r.cidr for r in db.provider_fw_rule_get_all(source=source))


def state(name):
    feed = db.feed_get(name)
    return feed, json.loads(feed.last_counts) if feed.last_counts else None


def test_a_spamhaus_drop_feed_blocks_its_four_networks(rig):
    rig.add("drop", "/drop.txt", data_file("feeds", "spamhaus-drop.txt"))
    outcome = rig.run()["drop"]
    assert outcome.status == "ok"
    assert cidrs("feed:drop") == ["192.0.2.0/24", "198.51.100.0/25", "198.51.100.128/26", "203.0.113.0/24"]
    feed, counts = state("drop")
    assert (feed.last_status, feed.last_error, feed.claim_token) == ("ok", None, None)
    assert (counts["format"], counts["lines"], counts["added"], counts["refused"]) == ("spamhaus", 8, 4, 0)
    assert feed.next_sync_at > feed.last_success_at
    (cast,) = rig.drain()
    assert cast["generation"] == feed.last_generation and len(cast["added"]) == 4
    assert db.audit_get_all(2)[1].action == "feed.create" and db.audit_get_all(1)[0].action == "feed.sync"


def test_an_unchanged_list_is_a_conditional_request_and_moves_no_generation(rig):
    rig.add("daily", "/daily.txt", DAY1)
    rig.run()
    rig.drain()
    generation = db.provider_fw_generation_get()
    assert rig.run()["daily"].status == "not_modified"
    assert rig.server.answered("/daily.txt") == [200, 304]
    assert db.provider_fw_generation_get() == generation and rig.drain() == []
    assert state("daily")[0].last_status == "not_modified"


def test_a_changed_list_is_replace_synced_in_one_generation_and_one_cast(rig):
    rig.add("daily", "/daily.txt", DAY1)
    db.provider_fw_rule_create(make_spec("203.0.113.200"))
    rig.run()
    rig.drain()
    before = cidrs()
    rig.server.lists["/daily.txt"].set(DAY2)
    generation = db.provider_fw_generation_get()
    outcome = rig.run()["daily"]
    assert outcome.status == "ok" and outcome.generation == generation + 1
    assert (outcome.counts["added"], outcome.counts["removed"], outcome.counts["deleted"]) == (3, 3, 3)
    after = cidrs()
    assert set(before) - set(after) == {"198.51.100.1/32", "198.51.100.2/32", "198.51.100.3/32"}
    assert set(after) - set(before) == {"198.18.0.1/32", "198.18.0.2/32", "2001:db8:66::/48"}
    assert "203.0.113.200/32" in after                                   # the manual block is untouched
    (cast,) = rig.drain()
    assert (cast["previous_generation"], len(cast["added"]), len(cast["removed"])) == (generation, 3, 3)


def test_a_truncated_download_trips_the_guard_and_keeps_the_last_good_list(rig):
    rig.add("daily", "/daily.txt", DAY1)
    rig.run()
    rig.drain()
    good, generation = cidrs(), db.provider_fw_generation_get()
    rig.server.lists["/daily.txt"].set(TRUNCATED)
    outcome = rig.run()["daily"]
    assert outcome.status == "refused" and "guard" in outcome.error and "--force" in outcome.error
    assert cidrs() == good and db.provider_fw_generation_get() == generation and rig.drain() == []
    feed, counts = state("daily")
    assert feed.last_status == "refused" and "32 of the 40" in feed.last_error
    assert counts["added"] == 40                                # the counts are still those of the good list
    assert feed.next_sync_at <= datetime.datetime.utcnow() + datetime.timedelta(seconds=300)
    # The operator looked: the list really shrank.  A forced sync applies it once.
    db.feed_request_sync("daily", force=True, audit=db.Audit("ops", reason="the feed dropped its old entries"))
    assert db.feed_get("daily").force_next
    outcome = rig.run()["daily"]
    assert outcome.status == "ok" and len(cidrs("feed:daily")) == 8 and not db.feed_get("daily").force_next
    assert json.loads(db.audit_get_all(1)[0].detail)["forced_past_guard"]["removing"] == 32


def test_a_failed_download_or_an_error_page_keeps_the_last_good_list(rig):
    rig.add("daily", "/daily.txt", DAY1)
    rig.run()
    good = cidrs()
    rig.server.lists["/daily.txt"].status = 503
    outcome = rig.run()["daily"]
    assert outcome.status == "fetch_error" and "HTTP 503" in outcome.error and cidrs() == good
    rig.server.lists["/daily.txt"].status = 200
    rig.server.lists["/daily.txt"].set(data_file("feeds", "sync", "error-page.html"))
    outcome = rig.run()["daily"]
    assert outcome.status == "refused" and "no usable entry" in outcome.error and cidrs() == good
    feed = db.feed_get("daily")
    assert (feed.last_status, feed.content_sha256) == ("refused", state("daily")[0].content_sha256)
    # Recovery: the publisher is back, the next sync applies and clears the error.
    rig.server.lists["/daily.txt"].set(DAY2)
    assert rig.run()["daily"].status == "ok" and db.feed_get("daily").last_error is None


@pytest.mark.parametrize("outcome", ["ok", "not_modified", "failed"])
def test_a_sync_asked_for_while_another_runs_is_not_lost_when_that_one_finishes(rig, outcome):
    """`provfw feed add` then `provfw feed sync`: the conductor had claimed the new feed before the request
    came, and the finished sync wrote its next time (an hour away) over the request - the CLI waited for a
    sync that never came (a suite run, 2026-12-03).  The request stands, with its force, and downloads again."""
    rig.add("daily", "/daily.txt", DAY1)
    if outcome != "ok":
        rig.run()
    if outcome == "failed":
        rig.server.publish("/daily.txt", b"", status=500)
    _due_now("daily")
    (claim,) = db.feed_claim_due("conductor-a", 60)
    db.feed_request_sync("daily", force=True, audit=db.Audit("ops"))       # while conductor-a syncs it

    first = rig.syncer.sync(claim)

    feed = db.feed_get("daily")
    assert (first.status == outcome) if outcome != "failed" else (first.status not in ("ok", "not_modified"))
    assert feed.next_sync_at <= models.utcnow() and feed.force_next and feed.etag is None, "the request stands"
    assert feed.claim_token is None
    if outcome == "failed":
        rig.server.publish("/daily.txt", DAY1)
    (second,) = rig.syncer.run_due()                                        # no _due_now: it is due already
    assert second.status == "ok" and rig.server.answered("/daily.txt")[-1] == 200
    feed = db.feed_get("daily")
    assert feed.next_sync_at > models.utcnow() and not feed.force_next, "answered: due again in an hour"
    assert rig.syncer.run_due() == []


def test_firehol_level1_as_published_blocks_no_private_or_special_range(rig):
    rig.add("level1", "/level1.netset", data_file("feeds", "firehol-level1.netset"))
    outcome = rig.run()["level1"]
    blocked = cidrs()
    for reserved in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                     "192.168.0.0/16", "224.0.0.0/3"):
        assert reserved not in blocked
    refused = outcome.counts["refused_lines"]
    reasons = {r["value"]: r["reason"] for r in refused}
    assert "metadata service" in reasons["169.254.0.0/16"] and "RFC 1918" in reasons["10.0.0.0/8"]
    assert "protected network" in reasons["127.0.0.0/8"]      # protected networks: the stronger refusal
    assert blocked and all(not c.startswith(("10.", "127.", "169.254.", "192.168.")) for c in blocked)


def test_a_feed_that_opts_in_blocks_non_global_ranges_and_the_audit_says_so(rig):
    rig.add("level1", "/level1.netset", data_file("feeds", "firehol-level1.netset"), allow_non_global=True)
    rig.run()
    blocked = cidrs()
    assert "10.0.0.0/8" in blocked and "169.254.0.0/16" in blocked
    assert "127.0.0.0/8" not in blocked                       # protected networks stay on top
    detail = json.loads(db.audit_get_all(1)[0].detail)
    assert {"cidr": "10.0.0.0/8", "range": "10.0.0.0/8"}.items() <= detail["non_global_allowed"][1].items()
    create = [r for r in db.audit_get_all(5) if r.action == "feed.create"][0]
    assert json.loads(create.detail)["allow_non_global"] is True


def test_of_two_conductors_only_one_downloads_a_due_feed(rig):
    rig.add("daily", "/daily.txt", DAY1)
    other = conductor_feeds.FeedSyncer(rig.conf, rig.compute, host="conductor-b")
    barrier = threading.Barrier(2)
    outcomes: list = []

    def run(syncer):
        barrier.wait()
        outcomes.extend(syncer.run_due())

    threads = [threading.Thread(target=run, args=(s,)) for s in (rig.syncer, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [o.status for o in outcomes] == ["ok"] and rig.server.answered("/daily.txt") == [200]


def test_a_feed_with_a_ttl_gives_its_rules_that_lifetime_and_downloads_to_renew(rig):
    rig.add("daily", "/daily.txt", DAY1, ttl_seconds=86400)
    rig.run()
    expiries = {r.expires_at for r in db.provider_fw_rule_get_all()}
    assert len(expiries) == 1 and (next(iter(expiries)) - datetime.datetime.utcnow()).total_seconds() > 86000
    assert rig.run()["daily"].status == "not_modified"             # a quarter TTL has not passed: conditional
    with db.get_engine().begin() as conn:                          # a quarter of a day later
        conn.execute(sa.update(models.Feed).values(last_applied_at=models.utcnow() - datetime.timedelta(hours=7)))
    outcome = rig.run()["daily"]
    assert outcome.status == "ok" and rig.server.answered("/daily.txt") == [200, 304, 200]
    assert outcome.counts["renewed"] == 0                          # within half a TTL: no rule touched


def test_csv_feeds_read_the_named_column_and_protocol_applies_to_every_rule(rig):
    rig.add("siem", "/export.csv", data_file("feeds", "siem-export.csv"), format="csv", csv_column="src_ip",
            protocol="tcp", from_port=22, to_port=22)
    outcome = rig.run()["siem"]
    assert outcome.status == "ok" and outcome.counts["format"] == "csv"
    rules = db.provider_fw_rule_get_all(source="feed:siem")
    assert rules and {(r.protocol, r.from_port, r.to_port) for r in rules} == {("tcp", 22, 22)}


def test_syncs_are_counted_in_prometheus_and_each_feed_is_exported_on_scrape(rig):
    from prometheus_client import CollectorRegistry

    from provfw import metrics
    from provfw.conductor import manager as conductor_manager
    from provfw.conductor import metrics as conductor_metrics

    def synced(status):
        return metrics.CONDUCTOR.get_sample_value("provfw_feed_syncs_total", {"feed": "drop", "status": status}) or 0

    before_ok, before_failed = synced("ok"), synced("fetch_error")
    rig.add("drop", "/drop.txt", data_file("feeds", "spamhaus-drop.txt"))
    rig.run()
    rig.server.lists["/drop.txt"].status = 500
    rig.run()
    assert (synced("ok") - before_ok, synced("fetch_error") - before_failed) == (1, 1)
    registry = CollectorRegistry()
    registry.register(conductor_metrics.ConductorCollector(conductor_manager.ConductorManager(rig.conf), 30))
    assert registry.get_sample_value("provfw_feed_ok", {"feed": "drop"}) == 0            # the last sync failed
    assert registry.get_sample_value("provfw_feed_entries", {"feed": "drop"}) == 4     # the last good list
    assert registry.get_sample_value("provfw_feed_last_success_timestamp_seconds", {"feed": "drop"}) > 0


def test_an_observer_hears_every_outcome(rig):
    heard = []
    conductor_feeds.SYNC_OBSERVERS.append(lambda name, outcome: heard.append((name, outcome.status)))
    try:
        rig.add("drop", "/drop.txt", data_file("feeds", "spamhaus-drop.txt"))
        rig.run()
        rig.server.lists["/drop.txt"].status = 500
        rig.run()
    finally:
        conductor_feeds.SYNC_OBSERVERS.clear()
    assert heard == [("drop", "ok"), ("drop", "fetch_error")]
    assert rig.syncer.stats["feed_ok"] == 1 and rig.syncer.stats["feed_fetch_error"] == 1
