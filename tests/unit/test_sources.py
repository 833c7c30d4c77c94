"""Rule sources: names, expiry arithmetic and the sync planner (pure; no database)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provfw import exception, sources
from provfw.rules import make_spec
from provfw.sources import Guard, Held, plan_sync

NOW = datetime.datetime(2026, 11, 30, 12, 0, 0)
MINUTE = NOW + datetime.timedelta(seconds=60)
DAY = NOW + datetime.timedelta(days=1)
PAST = NOW - datetime.timedelta(seconds=1)
A, B, C, D = (make_spec(f"192.0.2.{i}") for i in (1, 2, 3, 4))


def held(rule_id, spec, expires, **wishes):
    return Held(rule_id, spec, expires, {k.replace("__", ":"): v for k, v in wishes.items()})


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("given,kind,expected", [
    ("manual", "manual", "manual"),
    ("ticket-42", "manual", "manual:ticket-42"),
    ("manual:ticket-42", "import", "manual:ticket-42"),
    ("spamhaus", "import", "import:spamhaus"),
    ("import:drop.v4", "manual", "import:drop.v4"),
])
def test_a_bare_name_gets_the_kind_of_the_call(given, kind, expected):
    assert sources.parse_source(given, kind) == expected


@pytest.mark.parametrize("given", ["", "import:", "import:-x", "x" * 65, "import:a b", "bogus:x", 7, "manual:ü"])
def test_malformed_sources_are_refused_naming_the_field(given):
    with pytest.raises(exception.InvalidInput) as info:
        sources.parse_source(given, "import")
    assert info.value.field == "source"


def test_clients_cannot_write_a_feeds_source():
    with pytest.raises(exception.InvalidInput, match="feeds"):
        sources.parse_source("feed:spamhaus", "import")
    assert sources.parse_source("feed:spamhaus", "import", allowed=sources.KINDS) == "feed:spamhaus"


# --------------------------------------------------------------------------- expiry arithmetic

def test_never_is_the_latest_expiry_and_only_a_later_one_extends():
    assert sources.latest([MINUTE, None, DAY]) is None
    assert sources.latest([MINUTE, DAY]) == DAY
    assert sources.extends(MINUTE, DAY) and sources.extends(MINUTE, None)
    assert not sources.extends(DAY, MINUTE) and not sources.extends(None, DAY) and not sources.extends(None, None)
    assert not sources.extends(MINUTE, MINUTE + datetime.timedelta(seconds=30), slack=60)
    assert sources.extends(MINUTE, MINUTE + datetime.timedelta(seconds=61), slack=60)


# --------------------------------------------------------------------------- adding

def test_new_specs_are_created_and_live_ones_counted_duplicate():
    plan = plan_sync("manual", [A, B], None, {A: held(1, A, None, manual=None)}, NOW)
    assert plan.create == [B] and plan.duplicate == [A] and plan.unchanged == [A]
    assert not plan.rule_expiry and not plan.source_update


def test_reblocking_permanently_renews_a_60_second_block():
    plan = plan_sync("manual", [A], None, {A: held(1, A, MINUTE, manual=MINUTE)}, NOW)
    assert plan.renewed == [A] and plan.rule_expiry == {1: None}
    assert plan.source_update == [(1, "manual", None)] and plan.create == []


def test_an_earlier_expiry_never_shortens_a_rule():
    plan = plan_sync("manual", [A], MINUTE, {A: held(1, A, DAY, manual=DAY)}, NOW)
    assert plan.duplicate == [A] and plan.unchanged == [A] and not plan.changes_anything


def test_reimporting_with_a_longer_ttl_renews_every_entry():
    current = {s: held(i, s, MINUTE, import__feed=MINUTE) for i, s in enumerate((A, B, C))}
    plan = plan_sync("import:feed", [A, B, C], DAY, current, NOW)
    assert plan.renewed == [A, B, C] and plan.rule_expiry == {0: DAY, 1: DAY, 2: DAY}


def test_another_source_gains_the_rule_without_moving_its_expiry():
    plan = plan_sync("import:x", [A], MINUTE, {A: held(1, A, None, manual=None)}, NOW)
    assert plan.source_insert == [(1, "import:x", MINUTE)]
    assert plan.duplicate == [A] and plan.unchanged == [] and plan.rule_expiry == {}


def test_a_rule_from_before_sources_becomes_manual_when_touched():
    legacy = Held(1, A, MINUTE, None)
    plan = plan_sync("import:x", [A], DAY, {A: legacy}, NOW)
    assert plan.source_insert == [(1, "manual", MINUTE), (1, "import:x", DAY)]
    assert plan.rule_expiry == {1: DAY}


def test_slack_spares_feeds_from_renewing_every_rule_on_every_sync():
    almost = MINUTE + datetime.timedelta(seconds=30)
    plan = plan_sync("feed:f", [A], almost, {A: held(1, A, MINUTE, feed__f=MINUTE)}, NOW, slack=60)
    assert plan.unchanged == [A] and not plan.changes_anything


def test_an_expired_live_copy_is_retired_and_created_again():
    stale = held(1, A, PAST, manual=PAST)
    plan = plan_sync("manual", [A], None, {A: stale}, NOW)
    assert plan.retire == [stale] and plan.create == [A]


def test_a_lapsed_wish_of_a_source_is_renewed_even_within_slack():
    plan = plan_sync("manual", [A], MINUTE, {A: held(1, A, None, manual=PAST, feed__f=None)}, NOW, slack=3600)
    assert plan.source_update == [(1, "manual", MINUTE)] and plan.duplicate == [A]


# --------------------------------------------------------------------------- replacing

def test_replace_adds_the_new_and_releases_what_the_list_no_longer_names():
    current = {A: held(1, A, None, feed__f=None), B: held(2, B, None, feed__f=None)}
    plan = plan_sync("feed:f", [B, C], None, current, NOW, replace=True)
    assert plan.create == [C] and plan.removed == [A]
    assert [h.rule_id for h in plan.delete] == [1] and plan.source_delete == [(1, "feed:f")]
    assert plan.guard.in_force == 2 and plan.guard.removing == 1


def test_a_rule_wanted_by_another_source_stays_with_that_sources_expiry():
    current = {A: held(1, A, None, feed__f=None, manual=MINUTE)}
    plan = plan_sync("feed:f", [], None, current, NOW, replace=True)
    assert plan.delete == [] and plan.source_delete == [(1, "feed:f")]
    assert plan.rule_expiry == {1: MINUTE}


def test_rules_of_other_sources_are_not_touched_by_a_replace():
    current = {A: held(1, A, None, manual=None)}
    plan = plan_sync("feed:f", [B], None, current, NOW, replace=True)
    assert plan.create == [B] and plan.removed == [] and plan.delete == []


def test_the_guard_trips_when_too_large_a_share_would_be_removed():
    current = {make_spec(f"198.51.100.{i}"): held(i, make_spec(f"198.51.100.{i}"), None, feed__f=None)
               for i in range(1, 41)}
    keep = list(current)[:15]
    plan = plan_sync("feed:f", keep, None, current, NOW, replace=True, guard=Guard(0.5, 10))
    assert plan.guard.removing == 25 and plan.guard.in_force == 40 and plan.guard.tripped
    plan = plan_sync("feed:f", list(current)[:25], None, current, NOW, replace=True, guard=Guard(0.5, 10))
    assert plan.guard.removing == 15 and not plan.guard.tripped


def test_rules_set_aside_as_settled_count_as_duplicates_and_in_force_and_dilute_the_guard():
    # The caller left 60 wanted rules the source holds for good out of wanted and held (settled): removing 25
    # of the 40 planned ones is then 25 of 100 in force, under the guard's half.
    current = {make_spec(f"198.51.100.{i}"): held(i, make_spec(f"198.51.100.{i}"), None, feed__f=None)
               for i in range(1, 41)}
    keep = list(current)[:15]
    plan = plan_sync("feed:f", keep, None, current, NOW, replace=True, guard=Guard(0.5, 10), settled=60)
    assert (plan.guard.in_force, plan.guard.removing, plan.guard.tripped) == (100, 25, False)
    assert (plan.duplicates, len(plan.duplicate), len(plan.unchanged)) == (75, 15, 15)
    assert plan_sync("feed:f", keep, None, current, NOW, replace=True, guard=Guard(0.5, 10)).guard.tripped


def test_the_guard_ignores_small_removals_and_rules_no_longer_in_force():
    current = {A: held(1, A, None, feed__f=None), B: held(2, B, None, feed__f=None)}
    assert not plan_sync("feed:f", [], None, current, NOW, replace=True, guard=Guard(0.5, 10)).guard.tripped
    lapsed = {s: held(i, s, PAST, feed__f=PAST) for i, s in enumerate((A, B, C, D))}
    report = plan_sync("feed:f", [], None, lapsed, NOW, replace=True, guard=Guard(0.1, 1)).guard
    assert (report.in_force, report.removing, report.tripped) == (0, 0, False)


def split_own(source, wanted, current):
    """``current`` as a replace reads it from the database: the source's rules as rows (``own``), and in
    ``held`` only the others that matter plus, with all their sources, the source's rules that leave."""
    own = {tuple(spec): (*spec, h.rule_id, h.expires_at, h.sources[source])
           for spec, h in current.items() if h.sources is not None and source in h.sources}
    held = {spec: h for spec, h in current.items() if tuple(spec) not in own or spec not in set(wanted)}
    return held, own


EXPIRIES = st.sampled_from([None, PAST, MINUTE, DAY])


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(st.tuples(st.sampled_from([A, B, C, D]), EXPIRIES,
                                st.dictionaries(st.sampled_from(["feed:f", "manual", "import:x"]), EXPIRIES,
                                                max_size=3) | st.none()),
                      unique_by=lambda t: t[0], max_size=4),
       wanted=st.lists(st.sampled_from([A, B, C, D]), unique=True),
       expires=EXPIRIES, replace=st.booleans(), slack=st.sampled_from([0.0, 120.0]))
def test_a_plan_from_the_sources_own_rows_is_the_plan_from_held_rules(rules, wanted, expires, replace, slack):
    current = {spec: Held(i, spec, rule_expires, sources_) for i, (spec, rule_expires, sources_) in enumerate(rules)}
    held_, own = split_own("feed:f", wanted, current)
    expected = plan_sync("feed:f", wanted, expires, current, NOW, replace, slack)
    got = plan_sync("feed:f", wanted, expires, held_, NOW, replace, slack, own=own)
    # Retired rules carry what the planner was given of their sources; everything else is the same plan.
    assert [(h.rule_id, h.spec, h.expires_at) for h in got.retire] == \
        [(h.rule_id, h.spec, h.expires_at) for h in expected.retire]
    got.retire, expected.retire = [], []
    assert got == expected


# --------------------------------------------------------------------------- releasing

def test_releasing_a_source_deletes_the_rule_only_when_no_other_source_wants_it():
    shared = held(1, A, None, manual=MINUTE, feed__f=None)
    assert sources.release("feed:f", shared, NOW) == (False, MINUTE)
    assert sources.release("manual", shared, NOW) == (False, None)
    assert sources.release(None, shared, NOW) == (True, None)
    assert sources.release("feed:f", held(1, A, None, feed__f=None, manual=PAST), NOW)[0] is True
    with pytest.raises(exception.NotFound, match="import:x"):
        sources.release("import:x", shared, NOW)
