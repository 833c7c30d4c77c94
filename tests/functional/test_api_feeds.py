"""Issue 10 through the REST API, on SQLite, PostgreSQL and MariaDB: list formats, sources, renewals,
replace-sync and its guard, the non-global policy, "why is this address blocked", and the feed resources.

The failing cases of the issue come first, each as it was reported."""

from __future__ import annotations

import codecs
import datetime
import json

import pytest

from provfw.db import api as db
from tests.functional.test_api import Api
from tests.lib.httpserver import data_file

pytestmark = pytest.mark.functional

IMPORT = "/v1/provider-fw-rules/import"


@pytest.fixture
def api(conf, any_db):
    import secrets

    conf.set_override("control_exchange", "api-feeds-" + secrets.token_hex(4))
    conf.set_override("min_interval", 60, group="feeds")
    api = Api(conf)
    yield api
    api.close()


def text_import(api, body: bytes, query: str = "", status: int | None = None):
    response = api.call("POST", IMPORT + (f"?{query}" if query else ""), raw=body, content_type="text/plain")
    if status is not None:
        assert response.status_int == status, response.text
    return response


def live(source=None):
    return sorted(r.cidr for r in db.provider_fw_rule_get_all(source=source))


def expiry(cidr):
    (rule,) = [r for r in db.provider_fw_rule_get_all() if r.cidr == cidr]
    return rule.expires_at


# --------------------------------------------------------------------------- the failing cases

def test_a_spamhaus_drop_file_imports_all_its_entries_and_refuses_no_header_line(api):
    body = text_import(api, data_file("feeds", "spamhaus-drop.txt"), status=201).json
    assert (body["added"], body["refused"], body["format"]) == (4, 0, "spamhaus")
    assert live() == ["192.0.2.0/24", "198.51.100.0/25", "198.51.100.128/26", "203.0.113.0/24"]


def test_a_list_starting_with_a_utf8_bom_keeps_its_first_entry(api):
    body = text_import(api, codecs.BOM_UTF8 + b"203.0.113.9\n198.51.100.5\n", status=201).json
    assert (body["added"], body["refused"]) == (2, 0) and "203.0.113.9/32" in live()


def test_a_range_is_imported_as_the_networks_that_cover_it(api):
    body = text_import(api, b"198.51.100.5-198.51.100.9\n", status=201).json
    assert body["added"] == 3 and live() == ["198.51.100.5/32", "198.51.100.6/31", "198.51.100.8/31"]


def test_reblocking_permanently_while_a_60_second_block_exists_renews_it(api):
    first = api.call("POST", "/v1/provider-fw-rules", {"cidr": "192.0.2.50", "ttl": 60})
    assert first.status_int == 201
    api.drain_casts()
    again = api.call("POST", "/v1/provider-fw-rules", {"cidr": "192.0.2.50"})
    assert again.status_int == 200, again.text
    assert again.json["renewed"] is True and again.json["rule"]["expires_at"] is None
    assert again.json["rule"]["id"] == first.json["rule"]["id"]
    assert again.json["rule"]["updated_generation"] == again.json["generation"]
    ((_, cast),) = api.drain_casts()                    # hosts relabel the same id: no expiry any more
    assert cast["added"] == [[first.json["rule"]["id"], "192.0.2.50/32", "all", -1, -1, None]]
    assert expiry("192.0.2.50/32") is None
    # Blocking it again, for less or the same, changes nothing: the seed's 409.
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "192.0.2.50", "ttl": 60}).status_int == 409
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "192.0.2.50"}).status_int == 409


def test_reimporting_a_daily_list_over_a_minute_list_renews_every_entry(api):
    feed = b"198.51.100.1\n198.51.100.2\n198.51.100.3\n"
    text_import(api, feed, "ttl=60", status=201)
    body = text_import(api, feed, "ttl=86400", status=200).json
    assert (body["added"], body["renewed"], body["duplicate"]) == (0, 3, 0)
    soon = datetime.datetime.utcnow() + datetime.timedelta(hours=23)
    assert all(expiry(c) > soon for c in live())
    # A shorter ttl later never shortens them.
    assert text_import(api, feed, "ttl=60", status=200).json["renewed"] == 0
    assert all(expiry(c) > soon for c in live())


def test_firehol_level1_as_published_blocks_no_non_global_range(api):
    body = text_import(api, data_file("feeds", "firehol-level1.netset"), status=201).json
    reasons = {r["value"]: r["reason"] for r in body["refused_lines"]}
    assert set(reasons) == {"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
                            "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3"}
    assert "169.254.0.0/16, link-local" in reasons["169.254.0.0/16"]
    assert "0.0.0.0/8, 'this network'" in reasons["0.0.0.0/8"]
    assert "is protected network 127.0.0.0/8" in reasons["127.0.0.0/8"]
    assert live() == ["192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.7/32"]


# --------------------------------------------------------------------------- the non-global policy

def test_a_single_non_global_rule_is_refused_naming_the_range_unless_the_request_opts_in(api):
    refused = api.call("POST", "/v1/provider-fw-rules", {"cidr": "169.254.169.254"})
    assert refused.status_int == 409 and "169.254.0.0/16" in refused.json["error"]["message"]
    assert "metadata" in refused.json["error"]["message"] and live() == []
    seed = api.call("POST", "/v1/block-external-addresses", {"cidr": "10.1.2.0/24"})
    assert seed.status_int == 409 and "10.0.0.0/8" in seed.json["error"]["message"]
    allowed = api.call("POST", "/v1/provider-fw-rules", {"cidr": "10.1.2.3", "allow_non_global": True,
                                                         "description": "compromised tenant VM"})
    assert allowed.status_int == 201
    detail = api.call("GET", "/v1/audit-log?limit=1").json["audit"][0]["detail"]
    assert detail["allow_non_global"] is True and detail["non_global_allowed"] == [
        {"cidr": "10.1.2.3/32", "range": "10.0.0.0/8"}]
    # The protected networks stay on top of the opt-in.
    protected = api.call("POST", "/v1/provider-fw-rules", {"cidr": "127.0.0.5", "allow_non_global": True})
    assert protected.status_int == 409 and "protected network 127.0.0.0/8" in protected.json["error"]["message"]


def test_the_configuration_can_allow_non_global_ranges_for_every_request(api):
    api.conf.set_override("allow_non_global", True)
    body = text_import(api, b"10.9.0.0/16\n100.64.1.1\n", status=201).json
    assert (body["added"], body["non_global_allowed"]) == (2, 2)
    detail = api.call("GET", "/v1/audit-log?limit=1").json["audit"][0]["detail"]
    assert [item["range"] for item in detail["non_global_allowed"]] == ["10.0.0.0/8", "100.64.0.0/10"]
    # A request can still ask for the strict policy.
    strict = text_import(api, b"192.168.1.1\n", "allow_non_global=false", status=200).json
    assert strict["refused"] == 1


# --------------------------------------------------------------------------- formats

def test_format_and_column_override_detection_and_each_refusal_keeps_its_line(api):
    csv = data_file("feeds", "siem-export.csv")
    body = text_import(api, csv, "column=src_ip", status=201).json
    assert body["format"] == "csv" and body["added"] == 4 and body["duplicate"] == 1
    forced = text_import(api, b"203.0.113.77\t9\n203.0.113.78\tlots\n", "format=ipsum&source=ipsum").json
    assert forced["format"] == "ipsum"
    assert [(r["line"], "number of lists" in r["reason"]) for r in forced["refused_lines"]] == [(2, True)]
    assert text_import(api, b"x\n", "format=bogus").status_int == 400
    missing = text_import(api, csv, "column=dst_ip")
    assert missing.status_int == 400 and missing.json["error"]["message"].startswith("column:")
    packed = text_import(api, b"\x1f\x8b\x08\x00\x8brest")                # a .gz uploaded by mistake
    assert packed.status_int == 400 and packed.json["error"]["message"].startswith("body:")
    binary = text_import(api, b"198.51.100.1\n\x00\x00\x00")
    assert binary.status_int == 400 and "NUL" in binary.json["error"]["message"]
    assert live() == ["192.0.2.130/32", "198.51.100.17/32", "2001:db8:a::25/128", "203.0.113.45/32",
                      "203.0.113.77/32"]


# --------------------------------------------------------------------------- sources and replace-sync

def test_every_rule_shows_its_sources_and_listings_filter_by_source(api):
    api.call("POST", "/v1/provider-fw-rules", {"cidr": "203.0.113.9"})
    api.call("POST", "/v1/provider-fw-rules", {"cidr": "203.0.113.10", "source": "ticket-42"})
    text_import(api, b"203.0.113.9\n203.0.113.11\n", "source=abuse", status=201)
    rules = {r["cidr"]: r for r in api.call("GET", "/v1/provider-fw-rules").json["rules"]}
    assert [s["source"] for s in rules["203.0.113.9/32"]["sources"]] == ["import:abuse", "manual"]
    assert [s["source"] for s in rules["203.0.113.10/32"]["sources"]] == ["manual:ticket-42"]
    by_source = api.call("GET", "/v1/provider-fw-rules?source=import:abuse", token="reader").json["rules"]
    assert [r["cidr"] for r in by_source] == ["203.0.113.9/32", "203.0.113.11/32"]
    assert api.call("GET", "/v1/provider-fw-sources", token="reader").json["sources"] == [
        {"source": "import:abuse", "rules": 2}, {"source": "manual", "rules": 1},
        {"source": "manual:ticket-42", "rules": 1}]
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "203.0.113.12", "source": "feed:x"}).status_int == 400


def test_replace_sync_adds_and_removes_in_one_generation_and_one_cast(api):
    day1 = b"\n".join(f"198.51.100.{i}".encode() for i in range(1, 41))
    day2 = b"\n".join(f"198.51.100.{i}".encode() for i in range(4, 44))
    api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.1"})       # also a manual block
    text_import(api, day1, "source=daily&mode=replace", status=201)
    api.drain_casts()
    generation = db.provider_fw_generation_get()
    body = text_import(api, day2, "source=daily&mode=replace", status=201).json
    assert (body["added"], body["removed"], body["deleted"], body["duplicate"]) == (3, 3, 2, 37)
    assert body["generation"] == generation + 1 and body["guard"]["tripped"] is False
    ((_, cast),) = api.drain_casts()
    assert (len(cast["added"]), len(cast["removed"])) == (3, 2)
    assert "198.51.100.1/32" in live() and "198.51.100.2/32" not in live()           # the manual one stays
    assert len(live("import:daily")) == 40


def test_a_replace_that_would_unblock_most_of_a_list_is_refused_unless_forced(api):
    full = b"\n".join(f"198.51.100.{i}".encode() for i in range(1, 101))
    text_import(api, full, "source=daily&mode=replace", status=201)
    generation, before = db.provider_fw_generation_get(), live()
    truncated = b"\n".join(full.split(b"\n")[:20])                   # a download cut short
    refused = text_import(api, truncated, "source=daily&mode=replace")
    assert refused.status_int == 409 and "force" in refused.json["error"]["message"]
    assert (db.provider_fw_generation_get(), live()) == (generation, before)
    preview = text_import(api, truncated, "source=daily&mode=replace&dry_run=true", status=200).json
    assert preview["dry_run"] and preview["guard"] == {"in_force": 100, "removing": 80, "max_fraction": 0.5,
                                                       "min_rules": 10, "tripped": True}
    assert sorted(preview["preview"]["removed"]) == sorted(f"198.51.100.{i}/32" for i in range(21, 101))
    assert (preview["added"], preview["removed"], preview["duplicate"]) == (0, 80, 20)
    assert (db.provider_fw_generation_get(), live()) == (generation, before)
    forced = text_import(api, truncated, "source=daily&mode=replace&force=true", status=200).json
    assert forced["removed"] == 80 and len(live()) == 20
    audit = api.call("GET", "/v1/audit-log?limit=1").json["audit"][0]
    assert audit["detail"]["forced_past_guard"]["tripped"] is True


def test_replace_needs_a_named_source_and_imports_cannot_write_manual_or_feed_sources(api):
    assert text_import(api, b"198.51.100.1\n", "mode=replace").status_int == 400
    assert text_import(api, b"198.51.100.1\n", "source=manual").status_int == 400
    assert text_import(api, b"198.51.100.1\n", "source=feed:spamhaus").status_int == 400
    assert text_import(api, b"198.51.100.1\n", "dry_run=maybe").status_int == 400


def test_a_json_import_takes_the_same_options_as_keys(api):
    response = api.call("POST", IMPORT, {"cidrs": ["198.51.100.5-198.51.100.6", "bogus"], "source": "j",
                                         "mode": "replace", "ttl": 3600})
    assert response.status_int == 201, response.text
    body = response.json
    assert (body["added"], body["refused"], body["source"], body["format"]) == (2, 1, "import:j", "json")
    assert body["refused_lines"][0]["line"] == 2 and live("import:j") == ["198.51.100.5/32", "198.51.100.6/32"]


def test_deleting_with_a_source_keeps_a_rule_another_source_wants(api):
    rule = api.call("POST", "/v1/provider-fw-rules", {"cidr": "203.0.113.9", "ttl": 600}).json["rule"]
    text_import(api, b"203.0.113.9\n", "source=abuse", status=200)
    response = api.call("DELETE", f"/v1/provider-fw-rules/{rule['id']}?source=manual")
    assert response.status_int == 204
    kept = api.call("GET", f"/v1/provider-fw-rules/{rule['id']}").json["rule"]
    assert [s["source"] for s in kept["sources"]] == ["import:abuse"] and kept["expires_at"] is None
    assert api.call("DELETE", f"/v1/provider-fw-rules/{rule['id']}?source=manual").status_int == 404
    unblocked = api.call("POST", "/v1/remove-external-address-block", {"cidr": "203.0.113.9",
                                                                       "source": "import:abuse"})
    assert unblocked.status_int == 200 and (unblocked.json["deleted"], unblocked.json["kept"]) == (1, 0)


@pytest.mark.parametrize("other_ttl", [None, 3600], ids=["another source's rule is permanent", "it expires"])
def test_an_unblock_by_one_source_counts_every_rule_another_source_keeps(api, other_ttl):
    # Found by stop 28's newcomer: "kept" counted only the kept rules whose expiry moved, so with the other
    # source's rule permanent (manual's expiry lapses, the rule's does not move) it said 0, and the CLI said
    # nothing of the rule that stayed; the audit row said the same.
    other = {"cidr": "203.0.113.0/24", "protocol": "tcp", "from_port": 1, "to_port": 65535, "source": "manual:bob"}
    if other_ttl:
        other["ttl"] = other_ttl
    assert api.call("POST", "/v1/provider-fw-rules", other).status_int == 201
    assert api.call("POST", "/v1/block-external-addresses", {"cidr": "203.0.113.0/24"}).status_int == 200
    unblocked = api.call("POST", "/v1/remove-external-address-block", {"cidr": "203.0.113.0/24", "source": "manual"})
    assert unblocked.status_int == 200, unblocked.text
    assert (unblocked.json["deleted"], unblocked.json["kept"]) == (2, 1)
    left = api.call("GET", "/v1/provider-fw-rules").json["rules"]
    assert [(r["protocol"], [s["source"] for s in r["sources"]]) for r in left] == [("tcp", ["manual:bob"])]
    assert json.loads(db.audit_get_all()[0].detail)["kept"] == 1                        # the newest first


# --------------------------------------------------------------------------- why

def test_contains_lists_every_rule_covering_an_address_most_specific_first_with_its_sources(api):
    text_import(api, b"198.51.100.0/24\n198.51.0.0/16\n", "source=drop", status=201)
    api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.7", "protocol": "tcp", "from_port": 22})
    api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.8"})
    found = api.call("GET", "/v1/provider-fw-rules?contains=198.51.100.7", token="reader")
    assert found.status_int == 200
    rules = found.json["rules"]
    assert [(r["cidr"], [s["source"] for s in r["sources"]]) for r in rules] == [
        ("198.51.100.7/32", ["manual"]), ("198.51.100.0/24", ["import:drop"]), ("198.51.0.0/16", ["import:drop"])]
    assert found.json["next_marker"] is None
    assert api.call("GET", "/v1/provider-fw-rules?contains=203.0.113.1").json["rules"] == []
    assert api.call("GET", "/v1/provider-fw-rules?contains=nope").status_int == 400


# --------------------------------------------------------------------------- feeds

FEED = {"name": "drop", "url": "https://www.spamhaus.org/drop/drop.txt", "interval": 3600}


def test_feeds_are_created_listed_shown_changed_synced_and_removed(api):
    created = api.call("POST", "/v1/feeds", {**FEED, "ttl": 86400, "description": "Spamhaus DROP"})
    assert created.status_int == 201, created.text
    feed = created.json["feed"]
    assert (feed["source"], feed["enabled"], feed["rules"], feed["last_status"]) == ("feed:drop", True, 0, None)
    assert api.call("POST", "/v1/feeds", FEED).status_int == 409
    assert [f["name"] for f in api.call("GET", "/v1/feeds", token="reader").json["feeds"]] == ["drop"]
    assert api.call("GET", "/v1/feeds/nope").status_int == 404
    changed = api.call("PATCH", "/v1/feeds/drop", {"enabled": False})
    assert changed.status_int == 200 and changed.json["feed"]["next_sync"] is None
    assert api.call("POST", "/v1/feeds/drop/sync").status_int == 409                  # disabled
    api.call("PATCH", "/v1/feeds/drop", {"enabled": True, "interval": 7200})
    synced = api.call("POST", "/v1/feeds/drop/sync?force=true")
    assert synced.status_int == 202 and synced.json["feed"]["force_next"] is True
    actions = [r["action"] for r in api.call("GET", "/v1/audit-log?limit=4").json["audit"]]
    assert actions == ["feed.sync", "feed.update", "feed.update", "feed.create"]
    deleted = api.call("DELETE", "/v1/feeds/drop")
    assert deleted.status_int == 200 and deleted.json["removed"] == 0
    assert api.call("GET", "/v1/feeds").json["feeds"] == []


@pytest.mark.parametrize("change,field", [
    ({"url": "ftp://example.org/list"}, "url"),
    ({"url": "file:///etc/passwd"}, "url"),
    ({"interval": 30}, "interval"),
    ({"ttl": 3600}, "ttl"),                       # less than twice the interval: rules would lapse
    ({"name": "-bad"}, "name"),
    ({"format": "xml"}, "format"),
    ({"format": "plain", "column": "src"}, "column"),
    ({"protocol": "tcp", "from_port": 70000}, "from_port"),
    ({"secret": 1}, "secret"),
])
def test_a_bad_feed_is_refused_naming_the_field(api, change, field):
    response = api.call("POST", "/v1/feeds", {**FEED, **change})
    assert response.status_int == 400 and response.json["error"]["message"].startswith(field), response.text
    assert api.call("GET", "/v1/feeds").json["feeds"] == []


def test_readers_see_feeds_but_cannot_change_them_and_passwords_are_hidden(api):
    api.call("POST", "/v1/feeds", {**FEED, "url": "https://ops:hunter2@feeds.example/list.txt"})
    shown = api.call("GET", "/v1/feeds/drop", token="reader")
    assert shown.status_int == 200 and shown.json["feed"]["url"] == "https://ops:***@feeds.example/list.txt"
    assert "hunter2" not in json.dumps(api.call("GET", "/v1/audit-log?limit=1").json)
    assert api.call("POST", "/v1/feeds/drop/sync", token="reader").status_int == 403
    assert api.call("DELETE", "/v1/feeds/drop", token="reader").status_int == 403
