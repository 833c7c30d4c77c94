"""Rule sources, renewals, replace-sync, "why" and feed claims on real SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import datetime
import gc
import ipaddress
import json
import random
import threading
import time

import pytest
import sqlalchemy as sa

from provfw import exception
from provfw.db import api as db
from provfw.db import migration
from provfw.db.sqlalchemy import models
from provfw.rules import make_spec
from provfw.sources import Guard

pytestmark = pytest.mark.functional

WHO = db.Audit("ops", request_id="req-7")


def now() -> datetime.datetime:
    return models.utcnow()


def later(seconds: float) -> datetime.datetime:
    return now() + datetime.timedelta(seconds=seconds)


def specs(n: int, prefix: str = "198.51.100") -> list:
    return [make_spec(f"{prefix}.{i}") for i in range(1, n + 1)]


def live() -> dict:
    """cidr -> (id, expires_at, [sources]) of every live rule."""
    rows = db.provider_fw_rule_get_all()
    sources = db.provider_fw_rule_sources([r.id for r in rows])
    return {r.cidr: (r.id, r.expires_at, [name for name, _ in sources[r.id]]) for r in rows}


def epoch(value: datetime.datetime | None) -> float | None:
    return None if value is None else value.replace(tzinfo=datetime.timezone.utc).timestamp()


# --------------------------------------------------------------------------- renewals

def test_reblocking_permanently_while_a_60_second_block_exists_makes_it_permanent(any_db):
    spec = make_spec("192.0.2.50")
    rule, first = db.provider_fw_rule_create(spec, expires_at=later(60))
    again, generation = db.provider_fw_rule_create(spec, expires_at=None, audit=WHO)
    assert again.id == rule.id and again.expires_at is None and generation == first + 1
    # Hosts learn it: the delta since the first block carries the same id with no expiry.
    (changed,) = db.provider_fw_changes_since(first).added
    assert (changed.id, changed.expires_at) == (rule.id, None)
    assert db.provider_fw_snapshot().rules[0].expires_at is None


def test_an_earlier_expiry_never_shortens_a_rule_and_moves_no_generation(any_db):
    spec = make_spec("192.0.2.51")
    rule, generation = db.provider_fw_rule_create(spec, expires_at=later(3600))
    with pytest.raises(exception.DuplicateRule):
        db.provider_fw_rule_create(spec, expires_at=later(60))
    with pytest.raises(exception.DuplicateRule):
        db.provider_fw_rule_create(spec, expires_at=later(3600) - datetime.timedelta(seconds=1))
    assert db.provider_fw_generation_get() == generation
    assert abs((db.provider_fw_rule_get(rule.id).expires_at - later(3600)).total_seconds()) < 5


def test_reimporting_a_list_with_a_day_ttl_over_a_minute_ttl_renews_every_entry(any_db):
    listed = specs(30)
    db.provider_fw_rules_sync("import:daily", listed, expires_at=later(60))
    before = db.provider_fw_generation_get()
    result = db.provider_fw_rules_sync("import:daily", listed, expires_at=later(86400))
    assert (result.added, result.renewed, result.duplicate) == (0, 30, 0)
    assert result.generation == before + 1 and len(result.changes.added) == 30
    assert all(expires > later(86000) for _, expires, _ in live().values())
    delta = db.provider_fw_changes_since(before)
    assert {r.id for r in delta.added} == {rule_id for rule_id, _, _ in live().values()} and not delta.removed


# --------------------------------------------------------------------------- sources

def test_a_rule_wanted_by_several_sources_stays_until_the_last_one_lets_go(any_db):
    spec = make_spec("203.0.113.9")
    rule, _ = db.provider_fw_rule_create(spec, expires_at=later(60))                 # manual, one minute
    db.provider_fw_rules_sync("import:abuse", [spec], mode="replace")                # + import, forever
    db.provider_fw_rules_sync("feed:drop", [spec], mode="replace", expires_at=later(7200))
    assert live()[spec.cidr] == (rule.id, None, ["feed:drop", "import:abuse", "manual"])

    release = db.provider_fw_rules_sync("import:abuse", [], mode="replace")
    assert (release.removed, release.deleted) == (1, 0)
    rule_id, expires, names = live()[spec.cidr]
    assert (rule_id, names) == (rule.id, ["feed:drop", "manual"])
    assert abs((expires - later(7200)).total_seconds()) < 5           # shortened to the latest wish left
    assert [(r.id, r.expires_at) for r in release.changes.added] == [(rule.id, epoch(expires))]

    kept = db.provider_fw_rule_destroy(rule.id, source="feed:drop", audit=WHO)
    assert kept.removed == [] and [r.id for r in kept.added] == [rule.id]       # now expires within the minute
    assert live()[spec.cidr][2] == ["manual"] and kept.added[0].expires_at < epoch(later(61))
    gone = db.provider_fw_rule_destroy(rule.id, source="manual")
    assert [r.id for r in gone.removed] == [rule.id] and live() == {}


def test_listing_filters_by_source_and_rules_of_older_releases_count_as_manual(any_db):
    a, b, c = specs(3)
    db.provider_fw_rule_create(a)
    db.provider_fw_rules_sync("import:x", [b, c])
    db.provider_fw_rules_sync("feed:y", [c], mode="replace")
    legacy, _ = db.provider_fw_rule_create(make_spec("192.0.2.77"))
    with db.get_engine().begin() as conn:           # as a release before sources would have written it
        conn.execute(sa.delete(models.ProviderFirewallRuleSource).where(
            models.ProviderFirewallRuleSource.rule_id == legacy.id))
    by = {name: sorted(r.cidr for r in db.provider_fw_rule_get_all(source=name))
          for name in ("manual", "import:x", "feed:y", "feed:none")}
    assert by == {"manual": ["192.0.2.77/32", a.cidr], "import:x": [b.cidr, c.cidr], "feed:y": [c.cidr],
                  "feed:none": []}
    assert db.provider_fw_rule_sources([legacy.id]) == {legacy.id: [("manual", None)]}
    assert db.provider_fw_source_counts() == [("feed:y", 1), ("import:x", 2), ("manual", 2)]
    # Touched by another source, the older rule gets its manual row written down.
    db.provider_fw_rules_sync("import:x", [make_spec("192.0.2.77")])
    assert [name for name, _ in db.provider_fw_rule_sources([legacy.id])[legacy.id]] == ["import:x", "manual"]


def test_unblock_with_a_source_keeps_rules_other_sources_want(any_db):
    for spec in (make_spec("203.0.113.0/24", "tcp"), make_spec("203.0.113.0/24", "udp")):
        db.provider_fw_rule_create(spec)
    db.provider_fw_rules_sync("import:x", [make_spec("203.0.113.0/24", "tcp")])
    changes = db.provider_fw_rule_destroy_by_cidr("203.0.113.0/24", source="manual")
    assert [r.spec.protocol for r in changes.removed] == ["udp"]
    assert [(r.protocol, names) for r in db.provider_fw_rule_get_all()
            for names in [[n for n, _ in db.provider_fw_rule_sources([r.id])[r.id]]]] == [("tcp", ["import:x"])]
    with pytest.raises(exception.NotFound):
        db.provider_fw_rule_destroy_by_cidr("203.0.113.0/24", source="manual")


# --------------------------------------------------------------------------- replace-sync

def test_source_counts_leave_out_expired_rules_before_the_purge_as_every_listing_does(any_db):
    # Found by a newcomer: `provfw sources` said 2500 for a list whose rules had expired half an hour
    # before, while `provfw rules --source` showed none (no conductor had purged them yet).
    db.provider_fw_rules_sync("import:short", specs(3), expires_at=later(1))
    db.provider_fw_rules_sync("import:long", specs(2, "203.0.113"), expires_at=later(3600))
    assert db.provider_fw_source_counts() == [("import:long", 2), ("import:short", 3)]
    time.sleep(1.5)
    assert db.provider_fw_source_counts() == [("import:long", 2)]
    assert db.provider_fw_rule_get_all(source="import:short") == []


def test_replace_makes_a_source_exactly_the_new_list_in_one_generation(any_db):
    old, new = specs(40), specs(40)[4:] + specs(4, "192.0.2")
    other = make_spec("203.0.113.1")
    db.provider_fw_rule_create(other)
    db.provider_fw_rules_sync("feed:f", old, mode="replace")
    before = db.provider_fw_generation_get()
    result = db.provider_fw_rules_sync("feed:f", new, mode="replace", audit=WHO)
    assert (result.added, result.removed, result.deleted, result.duplicate) == (4, 4, 4, 36)
    assert result.generation == before + 1
    assert sorted(r.spec.cidr for r in result.changes.removed) == sorted(s.cidr for s in old[:4])
    assert sorted(r.spec.cidr for r in result.changes.added) == sorted(s.cidr for s in new[-4:])
    assert sorted(r.cidr for r in db.provider_fw_rule_get_all(source="feed:f")) == sorted(s.cidr for s in new)
    assert other.cidr in live()                                    # another source's rule is untouched
    delta = db.provider_fw_changes_since(before)
    assert (len(delta.added), len(delta.removed)) == (4, 4)
    record = db.audit_get_all(1)[0]
    assert (record.action, record.generation) == ("rule.import", result.generation)
    detail = json.loads(record.detail)
    assert {k: detail[k] for k in ("source", "mode", "count", "removed", "deleted")} == {
        "source": "feed:f", "mode": "replace", "count": 4, "removed": 4, "deleted": 4}


def test_the_guard_refuses_a_truncated_list_and_force_or_dry_run_behave(any_db):
    full = specs(100)
    db.provider_fw_rules_sync("feed:f", full, mode="replace")
    before = (db.provider_fw_generation_get(), sorted(live()))
    guard = Guard(max_fraction=0.5, min_rules=10)
    with pytest.raises(exception.ReplaceGuardTripped) as info:
        db.provider_fw_rules_sync("feed:f", full[:30], mode="replace", guard=guard)
    assert (info.value.in_force, info.value.removing) == (100, 70) and "force" in info.value.message
    assert (db.provider_fw_generation_get(), sorted(live())) == before

    preview = db.provider_fw_rules_sync("feed:f", full[:30] + specs(2, "192.0.2"), mode="replace", guard=guard,
                                        dry_run=True)
    assert (preview.added, preview.removed, preview.duplicate, preview.changed) == (2, 70, 30, False)
    assert preview.guard.tripped and len(preview.preview["removed"]) == 70
    assert (db.provider_fw_generation_get(), sorted(live())) == before

    forced = db.provider_fw_rules_sync("feed:f", full[:30], mode="replace", guard=guard, force=True, audit=WHO)
    assert forced.removed == 70 and len(live()) == 30
    assert json.loads(db.audit_get_all(1)[0].detail)["forced_past_guard"]["removing"] == 70


def test_feed_sync_renews_only_when_past_the_slack(any_db):
    listed = specs(5)
    db.provider_fw_rules_sync("feed:f", listed, mode="replace", expires_at=later(86400))
    generation = db.provider_fw_generation_get()
    again = db.provider_fw_rules_sync("feed:f", listed, mode="replace", expires_at=later(86400 + 3600),
                                      renew_slack=43200)
    assert (again.changed, again.renewed, again.duplicate) == (False, 0, 5)
    assert db.provider_fw_generation_get() == generation


def test_one_transaction_means_a_failed_replace_changes_nothing(any_db):
    db.provider_fw_rules_sync("feed:f", specs(10), mode="replace")
    before = (db.provider_fw_generation_get(), sorted(live()), db.provider_fw_rule_count())
    with pytest.raises(exception.RuleLimitExceeded):
        db.provider_fw_rules_sync("feed:f", specs(5) + specs(20, "192.0.2"), mode="replace", max_rules=20)
    assert (db.provider_fw_generation_get(), sorted(live()), db.provider_fw_rule_count()) == before


def test_a_large_replace_reads_back_ids_for_the_cast(any_db):
    big = [make_spec(f"10.{i // 250}.{i % 250}.0/24") for i in range(3000)]
    first = db.provider_fw_rules_sync("feed:big", big, mode="replace")
    assert first.added == 3000 and len(first.changes.added) == 3000
    result = db.provider_fw_rules_sync("feed:big", big[30:] + specs(30), mode="replace")
    assert (result.added, result.removed) == (30, 30)
    assert {r.spec for r in result.changes.added} == set(specs(30))
    assert db.provider_fw_rule_count() == 3000 == len(db.provider_fw_rule_get_all(source="feed:big"))
    assert gc.isenabled()       # a large sync pauses the collector (provfw.gcpause) and only while it runs


@pytest.mark.parametrize("held_elsewhere", [600, 4000], ids=["scan-of-live-rules", "lookup-by-cidr"])
def test_a_large_add_finds_every_rule_another_source_holds_whichever_way_it_looks(any_db, held_elsewhere):
    # 1,500 specs to add, of which 500 are live under another source.  With 600 live rules the sync scans
    # the live rules (fewer than twice the look-ups); with 4,000 it looks them up by CIDR.  Both must find
    # the 500, share them (no second live copy, no IntegrityError) and create only the other 1,000.
    other = [make_spec(f"10.{i // 250}.{i % 250}.0/24") for i in range(held_elsewhere)]
    db.provider_fw_rules_sync("feed:other", other, mode="replace")
    wanted = other[:500] + [make_spec(f"172.16.{i // 250}.{i % 250}") for i in range(1000)]
    before = {r.cidr: r.id for r in db.provider_fw_rule_get_all()}
    result = db.provider_fw_rules_sync("import:mine", wanted)
    assert (result.added, result.renewed) == (1000, 0)
    assert db.provider_fw_rule_count() == held_elsewhere + 1000
    after = live()
    assert all(after[spec.cidr][0] == before[spec.cidr] for spec in other[:500])
    assert all(after[spec.cidr][2] == ["feed:other", "import:mine"] for spec in other[:500])
    assert {r.spec for r in result.changes.added} == set(wanted[500:])


def test_concurrent_replaces_of_one_source_serialise(any_db):
    lists = [specs(20)[i:] for i in range(4)]
    errors = []

    def run(listed):
        try:
            db.provider_fw_rules_sync("feed:f", listed, mode="replace", force=True)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(listed,)) for listed in lists]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    rules = db.provider_fw_rule_get_all(source="feed:f")
    assert {r.cidr for r in rules} in [{s.cidr for s in listed} for listed in lists]
    assert db.provider_fw_rule_count() == len(rules)


# --------------------------------------------------------------------------- purge

def test_purge_forgets_lapsed_wishes_without_moving_the_generation(any_db):
    spec = make_spec("192.0.2.60")
    db.provider_fw_rule_create(spec, expires_at=later(0.5))
    db.provider_fw_rules_sync("feed:f", [spec], mode="replace")
    generation = db.provider_fw_generation_get()
    assert db.provider_fw_rule_purge_expired(now=later(5)) is None
    assert db.provider_fw_generation_get() == generation
    rule = db.provider_fw_rule_get_all()[0]
    assert db.provider_fw_rule_sources([rule.id])[rule.id] == [("feed:f", None)]


def test_purge_does_not_delete_a_rule_renewed_after_it_expired(any_db):
    spec = make_spec("192.0.2.61")
    rule, _ = db.provider_fw_rule_create(spec, expires_at=later(60))
    db.provider_fw_rule_create(spec, expires_at=later(3600))
    assert db.provider_fw_rule_purge_expired(now=later(120)) is None
    assert db.provider_fw_rule_get(rule.id).expires_at > later(3000)


# --------------------------------------------------------------------------- why

def test_rules_containing_an_address_come_most_specific_first(any_db):
    for cidr in ("198.51.100.0/24", "198.51.0.0/16", "198.51.100.7", "198.51.100.8", "2001:db8::/32"):
        db.provider_fw_rule_create(make_spec(cidr))
    db.provider_fw_rule_create(make_spec("198.51.100.0/24", "tcp", 22))
    db.provider_fw_rule_create(make_spec("198.51.100.0/25"), expires_at=now() + datetime.timedelta(seconds=0.2))
    time.sleep(0.3)                                  # the /25 expires: no host enforces it any more
    found = db.provider_fw_rule_get_containing(ipaddress.ip_network("198.51.100.7"))
    assert [(r.cidr, r.protocol) for r in found] == [("198.51.100.7/32", "all"), ("198.51.100.0/24", "all"),
                                                     ("198.51.100.0/24", "tcp"), ("198.51.0.0/16", "all")]
    assert [r.cidr for r in db.provider_fw_rule_get_containing(ipaddress.ip_network("2001:db8::5"))] == \
        ["2001:db8::/32"]
    assert db.provider_fw_rule_get_containing(ipaddress.ip_network("203.0.113.1")) == []
    assert [r.protocol for r in db.provider_fw_rule_get_containing(ipaddress.ip_network("198.51.100.7"),
                                                                   protocol="tcp")] == ["tcp"]


def test_rules_within_a_network_are_exactly_those_ipaddress_calls_its_subnets(any_db):
    # 'why <network>' lists what blocks parts of a network: the IPv4 condition is text (LIKE on the stored,
    # normalised CIDR, minus the supernets) on every database; IPv6 is tested row by row. Checked against
    # ipaddress for networks of every prefix length around octet boundaries, with a seeded generator.
    rng = random.Random(7)
    cidrs = {"10.0.0.0/8", "10.16.0.0/12", "10.31.255.255/32", "10.32.0.0/11", "1.2.3.4/32", "100.2.3.4/32",
             "10.1.2.128/25", "10.1.2.127/32", "10.1.20.0/24", "10.1.2.0/23", "2001:db8::/32",
             "2001:0:0:1:1:1:1:5/128", "2001:db8:0:1::/64", "2001:db9::1/128"}
    while len(cidrs) < 160:
        prefix = rng.choice([8, 11, 12, 15, 16, 20, 23, 24, 25, 28, 31, 32, 32, 32])
        address = ipaddress.IPv4Address(rng.choice([10 << 24, (10 << 24) | (1 << 16), 100 << 24]) |
                                        rng.getrandbits(17))
        cidrs.add(str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)))
    db.provider_fw_rules_create_many([make_spec(cidr) for cidr in sorted(cidrs)])
    stored = {ipaddress.ip_network(cidr) for cidr in cidrs}
    probes = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.0.0.0/9", "10.16.0.0/12", "10.1.2.0/24",
                                                "10.1.2.128/25", "10.1.2.127/32", "1.0.0.0/8", "0.0.0.0/1",
                                                "2001:db8::/32", "2001::/16", "2001:0:0:1::/64", "::/1")]
    probes += [ipaddress.ip_network(f"{rng.choice(sorted(stored, key=str)).network_address}/{prefix}", strict=False)
               for prefix in range(1, 33) for _ in range(2)]
    for network in probes:
        if network.version == 6 and network.prefixlen > 64:
            continue
        expected = sorted(str(n) for n in stored if n.version == network.version and n.subnet_of(network))
        found = db.provider_fw_rule_get_all(within=network)
        assert sorted(r.cidr for r in found) == expected, network
        assert [r.id for r in found] == sorted(r.id for r in found)
    page = db.provider_fw_rule_get_all(within=ipaddress.ip_network("10.0.0.0/8"), limit=3)
    rest = db.provider_fw_rule_get_all(within=ipaddress.ip_network("10.0.0.0/8"), marker=page[-1].id)
    assert len(page) == 3 and [r.cidr for r in page + rest] == [r.cidr for r in db.provider_fw_rule_get_all(
        within=ipaddress.ip_network("10.0.0.0/8"))]
    v6 = db.provider_fw_rule_get_all(within=ipaddress.ip_network("2001::/16"))
    second_page = db.provider_fw_rule_get_all(within=ipaddress.ip_network("2001::/16"), limit=2, marker=v6[0].id)
    assert len(v6) == 4 and [r.id for r in second_page] == [r.id for r in v6[1:3]]


# --------------------------------------------------------------------------- feeds

SETTINGS = dict(url="http://127.0.0.1:9/list.txt", format="auto", csv_column=None, protocol="all", from_port=None,
                to_port=None, interval_seconds=3600, ttl_seconds=None, enabled=True, allow_non_global=False,
                description=None)


def test_of_two_conductors_exactly_one_claims_a_due_feed(any_db):
    db.feed_create("drop", SETTINGS, audit=WHO)
    results: list = []
    barrier = threading.Barrier(6)

    def claim(i):
        barrier.wait()
        results.append(db.feed_claim_due(f"conductor-{i}", lease=60))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    claims = [c for found in results for c in found]
    assert len(claims) == 1 and claims[0].feed.name == "drop"
    assert db.feed_claim_due("late", lease=60) == []                 # held by a live lease


def test_a_sync_whose_claim_was_taken_over_changes_nothing(any_db):
    db.feed_create("drop", SETTINGS)
    (stale,) = db.feed_claim_due("slow", lease=0.01)
    (fresh,) = db.feed_claim_due("fast", lease=60, now=later(1))    # the slow one's lease ran out
    with pytest.raises(exception.FeedClaimLost):
        db.feed_sync(stale, specs(3), {"last_status": "ok"}, expires_at=None, guard=None, force=False,
                     renew_slack=0)
    assert live() == {} and db.feed_record(stale, {"last_status": "fetch_error"}) is False
    result = db.feed_sync(fresh, specs(3), {"last_status": "ok", "next_sync_at": later(3600)}, expires_at=None,
                          guard=None, force=False, renew_slack=0)
    feed = db.feed_get("drop")
    assert (feed.last_status, feed.claim_token, feed.last_generation) == ("ok", None, result.generation)
    assert db.feed_rule_counts() == {"drop": 3}


def test_an_unchanged_feed_sync_records_its_state_without_a_generation(any_db):
    db.feed_create("drop", SETTINGS)
    (claim,) = db.feed_claim_due("c", lease=60)
    db.feed_sync(claim, specs(3), {"last_status": "ok", "next_sync_at": now()}, expires_at=None, guard=None,
                 force=False, renew_slack=0)
    generation = db.provider_fw_generation_get()
    (claim,) = db.feed_claim_due("c", lease=60)
    result = db.feed_sync(claim, specs(3), {"last_status": "unchanged", "next_sync_at": later(60)},
                          expires_at=None, guard=None, force=False, renew_slack=0)
    assert not result.changed and db.provider_fw_generation_get() == generation
    assert db.feed_get("drop").last_status == "unchanged" and db.feed_get("drop").claim_token is None


def test_deleting_a_feed_releases_its_rules_in_one_generation(any_db):
    db.feed_create("drop", SETTINGS)
    (claim,) = db.feed_claim_due("c", lease=60)
    db.feed_sync(claim, specs(5), {"last_status": "ok"}, expires_at=None, guard=None, force=False, renew_slack=0)
    db.provider_fw_rule_create(specs(1)[0])                         # also a manual block
    before = db.provider_fw_generation_get()
    result = db.feed_destroy("drop", audit=WHO)
    assert (result.removed, result.deleted, result.generation) == (5, 4, before + 1)
    assert list(live()) == [specs(1)[0].cidr]
    with pytest.raises(exception.NotFound):
        db.feed_get("drop")
    assert db.audit_get_all(1)[0].action == "feed.delete"
    empty = db.feed_create("empty", SETTINGS)
    assert empty.name == "empty" and db.feed_destroy("empty").removed == 0
    assert db.audit_get_all(1)[0].action == "feed.delete"


# --------------------------------------------------------------------------- migration

@pytest.mark.parametrize("fresh_db", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_upgrading_from_0003_gives_every_live_rule_a_manual_source(fresh_db):
    from alembic import command

    command.downgrade(migration.alembic_config(fresh_db.url), "0003")      # the previous release's schema
    assert migration.db_version(fresh_db.url) == "0003"
    db.configure(fresh_db.url)
    engine = db.get_engine()
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM provider_fw_generation"))
        conn.execute(sa.text("INSERT INTO provider_fw_generation (id, generation, live_rules) VALUES (1, 2, 1)"))
        conn.execute(sa.text(
            "INSERT INTO provider_fw_rules (id, cidr, ip_version, protocol, from_port, to_port, created_at, deleted, "
            "created_generation, expires_at) VALUES (1, '192.0.2.0/24', 4, 'all', -1, -1, :t, 0, 1, NULL), "
            "(2, '192.0.2.9/32', 4, 'all', -1, -1, :t, 2, 1, NULL)"), {"t": now()})
    migration.db_sync(fresh_db.url)
    assert db.provider_fw_rule_sources([1, 2]) == {1: [("manual", None)]}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM provider_fw_rule_sources")).scalar_one() == 1


@pytest.mark.parametrize("settle", [True, False], ids=["split-by-cidr", "planned-entry-by-entry"])
def test_a_large_replace_plans_the_same_whether_or_not_it_first_sets_aside_what_stays(any_db, monkeypatch, settle):
    # Above BULK_THRESHOLD entries of one protocol and port range, _held_rules sets aside by CIDR the rules the
    # source holds for good (neither the rule nor its wish expires) and plans only the rest.  Every kind of
    # rule a source can hold must come out of the replace as it does when each entry is planned.
    if not settle:
        monkeypatch.setattr("provfw.db.sqlalchemy.api._SETTLE_ABOVE", 10 ** 9)
    net = iter(ipaddress.ip_network("100.0.0.0/8").subnets(new_prefix=32))
    group = {name: [make_spec(str(next(net))) for _ in range(n)] for name, n in [
        ("for_good", 1200), ("timed", 100), ("dropped", 50), ("also_manual", 20), ("held_elsewhere", 40),
        ("new", 60), ("also_timed_elsewhere", 10), ("lapsed", 5)]}
    group["tcp"] = [make_spec(str(next(net)), "tcp") for _ in range(30)]
    source = "import:big"
    db.provider_fw_rules_sync(source, group["for_good"] + group["dropped"] + group["also_manual"]
                              + group["also_timed_elsewhere"] + group["tcp"])
    db.provider_fw_rules_sync(source, group["timed"], expires_at=later(3600))
    db.provider_fw_rules_sync(source, group["lapsed"], expires_at=later(1))
    db.provider_fw_rules_create_many(group["also_manual"])
    db.provider_fw_rules_sync("feed:other", group["held_elsewhere"])
    db.provider_fw_rules_sync("feed:other", group["also_timed_elsewhere"], expires_at=later(600))
    ids = {r.cidr: r.id for r in db.provider_fw_rule_get_all()}
    time.sleep(1.2)                                     # the lapsed rules expire (not purged: still rows)
    wanted = [spec for name in ("for_good", "timed", "held_elsewhere", "new", "also_timed_elsewhere", "lapsed")
              for spec in group[name]]

    preview = db.provider_fw_rules_sync(source, wanted, mode="replace", dry_run=True)
    result = db.provider_fw_rules_sync(source, wanted, mode="replace")

    for answer in (preview, result):
        assert (answer.added, answer.renewed, answer.duplicate, answer.removed, answer.deleted) == (
            60 + 5, 100, 1200 + 40 + 10, 50 + 20 + 30, 50 + 30 + 5)
        assert (answer.guard.in_force, answer.guard.removing) == (1200 + 100 + 50 + 20 + 30 + 10, 100)
    # Split by CIDR, the rules that stay as they are are counted, not listed (SyncResult.unchanged).
    assert len(result.unchanged) == (0 if settle else 1210)
    assert {r.spec for r in result.changes.added} == set(group["new"] + group["lapsed"] + group["timed"])
    assert {r.spec for r in result.changes.removed} == set(group["dropped"] + group["tcp"] + group["lapsed"])
    after = live()
    assert {(r.cidr, r.protocol, r.from_port, r.to_port) for r in db.provider_fw_rule_get_all(source=source)} \
        == set(map(tuple, wanted))
    for spec in group["for_good"] + group["timed"] + group["held_elsewhere"] + group["also_timed_elsewhere"]:
        assert after[spec.cidr][0] == ids[spec.cidr] and after[spec.cidr][1] is None
    for spec in group["lapsed"]:
        assert after[spec.cidr][0] != ids[spec.cidr] and after[spec.cidr][1] is None
    assert all(after[s.cidr][2] == ["feed:other", source] for s in group["held_elsewhere"])
    assert all(after[s.cidr][2] == ["feed:other", source] for s in group["also_timed_elsewhere"])
    assert all(after[s.cidr][2] == ["manual"] for s in group["also_manual"])
    assert not any(s.cidr in after for s in group["dropped"] + group["tcp"])


def test_a_large_reimport_of_rules_held_for_good_changes_nothing_and_counts_them(any_db):
    big = specs(250, "198.51.100") + specs(250, "203.0.113") + specs(250, "192.0.2") + specs(250, "198.18.0") \
        + specs(250, "198.18.1")
    first = db.provider_fw_rules_sync("import:big", big)
    again = db.provider_fw_rules_sync("import:big", big, expires_at=later(60))    # never shortens
    assert (again.changed, again.generation, again.added, again.duplicate) == (False, first.generation, 0, 1250)


def test_a_bulk_write_stores_every_value_as_given(any_db):
    # Past BULK_THRESHOLD PostgreSQL gets a COPY streamed as CSV (_CsvStream), the others executemany batches: a
    # description with the CSV's own separators, a NULL and a set expiry, and the source rows of a second source
    # (the bulk source-row path) must come back as they went in.
    from provfw.db.sqlalchemy.api import BULK_THRESHOLD
    net = iter(ipaddress.ip_network("100.64.0.0/10").subnets(new_prefix=32))
    specs = [make_spec(str(next(net))) for _ in range(BULK_THRESHOLD + 50)]
    description = 'a "quoted", comma\nand a newline, \\N and  spaces '
    until = later(3600).replace(microsecond=123456)
    first = db.provider_fw_rules_sync("import:csv", specs, description=description, expires_at=until,
                                      created_by="ops, \"night\"")
    assert first.added == len(specs)
    stored = db.provider_fw_rule_get_all(limit=len(specs) + 1)
    assert sorted(r.cidr for r in stored) == sorted(s.cidr for s in specs)
    assert {(r.description, r.created_by, r.expires_at.replace(tzinfo=None), r.protocol, r.from_port, r.to_port,
             r.ip_version) for r in stored} == {(description, 'ops, "night"', until.replace(tzinfo=None), "all", -1,
                                                 -1, 4)}
    second = db.provider_fw_rules_sync("import:other", specs[: BULK_THRESHOLD + 10])
    assert second.added == 0
    wants = db.provider_fw_rule_sources([r.id for r in stored])
    by_cidr = {r.cidr: wants[r.id] for r in stored}
    naive = [(name, expires and expires.replace(tzinfo=None)) for name, expires in by_cidr[specs[0].cidr]]
    assert naive == [("import:csv", until.replace(tzinfo=None)), ("import:other", None)]
    assert [name for name, _ in by_cidr[specs[-1].cidr]] == ["import:csv"]
    untimed = db.provider_fw_rules_sync("import:untimed",
                                        [make_spec(str(next(net))) for _ in range(BULK_THRESHOLD + 1)])
    assert all(r.expires_at is None and r.description is None for r in db.provider_fw_rule_get_all(
        source="import:untimed"))
    assert untimed.added == BULK_THRESHOLD + 1
