"""The admin REST API against real databases (SQLite, PostgreSQL, MariaDB),
with casts going over kombu's in-process transport to a real consumer."""

from __future__ import annotations

import datetime
import json
import queue
import secrets
import threading
import urllib.parse

import pytest
import webob

from provfw import rpc, rules
from provfw.api import router, schemas
from provfw.compute import api as compute_api
from provfw.db import api as db
from tests.lib import bus

pytestmark = pytest.mark.functional


class Api:
    """Calls the WSGI app in-process; records every cast a real consumer receives."""

    def __init__(self, conf):
        self.conf = conf
        self.app = router.build_app(conf, compute_api.ComputeAPI(conf))
        self.casts: queue.Queue = queue.Queue()
        with rpc.connection(conf) as conn:      # the conductor's job in a deployment: workers bind passively
            rpc.fanout_exchange(conf)(conn.channel()).declare()
        self.consumer = rpc.FanoutConsumer(lambda method, args: self.casts.put((method, args)), "api-test", conf)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.thread.start()
        assert self.consumer.connected.wait(5)
        self.admin = db.api_token_create("admin-" + secrets.token_hex(3), "admin")
        self.reader = db.api_token_create("reader-" + secrets.token_hex(3), "reader")

    def call(self, method: str, path: str, body=None, token: str | None = "admin", raw: bytes | None = None,
             content_type: str = "application/json", headers: dict | None = None) -> webob.Response:
        request = webob.Request.blank(path, method=method)
        if token == "admin":
            request.headers["X-Auth-Token"] = self.admin
        elif token == "reader":
            request.headers["X-Auth-Token"] = self.reader
        elif token is not None:
            request.headers["X-Auth-Token"] = token
        if raw is not None:
            request.body = raw
            request.content_type = content_type
        elif body is not None:
            request.body = json.dumps(body).encode()
            request.content_type = content_type
        for key, value in (headers or {}).items():
            request.headers[key] = value
        return request.get_response(self.app)

    def drain_casts(self, timeout: float = 0.15) -> list:
        return bus.drain(self.casts, timeout)

    def close(self):
        self.consumer.stop()
        self.thread.join(5)


@pytest.fixture
def api(conf, any_db):
    conf.set_override("control_exchange", "api-test-" + secrets.token_hex(4))
    conf.set_override("protected_cidrs", ["127.0.0.0/8", "::1/128", "10.20.0.0/16"])
    api = Api(conf)
    yield api
    api.close()


def test_create_list_show_delete_round_trip_casts_each_generation(api):
    created = api.call("POST", "/v1/provider-fw-rules",
                       {"cidr": "198.51.100.11/24", "protocol": "tcp", "from_port": 22, "description": "ssh"})
    assert created.status_int == 201, created.text
    rule = created.json["rule"]
    assert rule["cidr"] == "198.51.100.0/24" and rule["from_port"] == rule["to_port"] == 22
    ((method, args),) = api.drain_casts()
    assert (method, args["generation"], args["previous_generation"]) == (
        "trigger_provider_fw_rules", created.json["generation"], created.json["generation"] - 1)
    assert [item[:2] for item in args["added"]] == [[rule["id"], "198.51.100.0/24"]] and args["removed"] == []

    listing = api.call("GET", "/v1/provider-fw-rules?cidr=198.51.100.99/24", token="reader")
    assert listing.status_int == 200 and [r["id"] for r in listing.json["rules"]] == [rule["id"]]
    assert listing.json["generation"] == created.json["generation"]
    assert api.call("GET", f"/v1/provider-fw-rules/{rule['id']}").json["rule"]["description"] == "ssh"

    deleted = api.call("DELETE", f"/v1/provider-fw-rules/{rule['id']}")
    assert deleted.status_int == 204
    assert api.call("GET", f"/v1/provider-fw-rules/{rule['id']}").status_int == 404
    assert api.call("DELETE", f"/v1/provider-fw-rules/{rule['id']}").status_int == 404
    assert [c[1]["generation"] for c in api.drain_casts()] == [int(deleted.headers["X-Provfw-Generation"])]


def test_a_create_answers_the_rule_exactly_as_a_read_shows_it_new_renewed_or_shared(api):
    # The answer comes from its own transaction (new rules from the insert's RETURNING, others read back): it must
    # be what GET says.
    def same_as_read(answer):
        rule = answer.json["rule"]
        assert rule == api.call("GET", f"/v1/provider-fw-rules/{rule['id']}").json["rule"], answer.text
        return rule

    new = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.20", "ttl": 60, "description": "é x"})
    assert new.status_int == 201 and same_as_read(new)["sources"][0]["source"] == "manual"
    renewed = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.20", "ttl": 3600})
    assert renewed.status_int == 200 and renewed.json["renewed"] is True
    assert same_as_read(renewed)["updated_generation"] == renewed.json["generation"]
    shared = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.20", "source": "manual:ticket-7"})
    assert shared.status_int == 200
    assert [s["source"] for s in same_as_read(shared)["sources"]] == ["manual", "manual:ticket-7"]
    block = api.call("POST", "/v1/block-external-addresses", {"cidr": "198.51.100.21"})   # the seed's three rules
    assert block.status_int == 200 and len(block.json["rules"]) == 3, block.text
    for rule in block.json["rules"]:
        assert rule == api.call("GET", f"/v1/provider-fw-rules/{rule['id']}").json["rule"]


def test_the_same_rule_twice_is_a_conflict(api):
    body = {"cidr": "198.51.100.0/24", "protocol": "udp", "from_port": 53}
    assert api.call("POST", "/v1/provider-fw-rules", body).status_int == 201
    generation = db.provider_fw_generation_get()
    again = api.call("POST", "/v1/provider-fw-rules", {**body, "cidr": "198.51.100.77/24"})
    assert again.status_int == 409 and "already exists" in again.json["error"]["message"]
    assert db.provider_fw_generation_get() == generation


def test_block_external_addresses_follows_the_seed(api):
    first = api.call("POST", "/v1/block-external-addresses", {"cidr": "203.0.113.9/24"})
    assert first.status_int == 200
    assert first.json["status"] == "OK" and first.json["message"] == "Added 3 rules"
    assert sorted((r["protocol"], r["from_port"], r["to_port"]) for r in first.json["rules"]) == [
        ("icmp", -1, -1), ("tcp", 1, 65535), ("udp", 1, 65535)]
    again = api.call("POST", "/v1/block-external-addresses", {"cidr": "203.0.113.0/24"})
    assert again.status_int == 409
    assert again.json == {"status": "Failed", "message": "Duplicate rule. 0 rules added"}

    # One of the three removed: blocking again adds just the missing one.
    tcp = [r for r in first.json["rules"] if r["protocol"] == "tcp"][0]
    assert api.call("DELETE", f"/v1/provider-fw-rules/{tcp['id']}").status_int == 204
    assert api.call("POST", "/v1/block-external-addresses", {"cidr": "203.0.113.0/24"}).json["message"] == \
        "Added 1 rules"

    blocks = api.call("GET", "/v1/external-address-blocks", token="reader").json["blocks"]
    assert blocks == [{"cidr": "203.0.113.0/24", "rules": 3}]
    removed = api.call("POST", "/v1/remove-external-address-block", {"cidr": "203.0.113.0/24"})
    assert removed.json["message"] == "Deleted 3 rules"
    assert (removed.json["cidr"], removed.json["deleted"]) == ("203.0.113.0/24", 3)
    assert api.call("POST", "/v1/remove-external-address-block", {"cidr": "203.0.113.0/24"}).status_int == 404


def test_ipv6_and_bare_addresses_are_normalised(api):
    response = api.call("POST", "/v1/provider-fw-rules", {"cidr": "2001:DB8:0:0::1", "protocol": "icmp",
                                                          "from_port": 128, "to_port": 0})
    assert response.status_int == 201
    assert response.json["rule"]["cidr"] == "2001:db8::1/128"


BAD_REQUESTS = [
    ("invalid cidr", "/v1/provider-fw-rules", {"cidr": "300.1.2.3/24"}, 400, "cidr"),
    ("port out of range", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24", "protocol": "tcp", "from_port": 0}, 400,
     "from_port"),
    ("from > to", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24", "protocol": "tcp", "from_port": 90,
                                            "to_port": 80}, 400, "from_port"),
    ("unknown protocol", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24", "protocol": "sctp"}, 400, "protocol"),
    ("/0", "/v1/provider-fw-rules", {"cidr": "0.0.0.0/0"}, 400, "cidr"),
    ("::/0", "/v1/block-external-addresses", {"cidr": "::/0"}, 400, "cidr"),
    ("protected overlap", "/v1/provider-fw-rules", {"cidr": "10.0.0.0/8"}, 409, "10.20.0.0/16"),
    ("protected overlap via seed call", "/v1/block-external-addresses", {"cidr": "10.20.30.40"}, 409, "10.20.0.0/16"),
    ("missing cidr", "/v1/provider-fw-rules", {"protocol": "tcp"}, 400, "cidr"),
    ("body is a list", "/v1/provider-fw-rules", [1, 2], 400, "body"),
    ("ttl negative", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24", "ttl": -5}, 400, "ttl"),
    ("expires in the past", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24", "expires_at": "2001-01-01T00:00:00Z"},
     400, "expires_at"),
    ("description too long", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24", "description": "x" * 300}, 400,
     "description"),
]


def _table_state():
    return db.provider_fw_generation_get(), [(r.id, r.cidr, r.protocol) for r in db.provider_fw_rule_get_all()]


@pytest.mark.parametrize("name,path,body,status,mentions", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_error_and_changes_nothing(api, name, path, body, status, mentions):
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "192.0.2.0/24"}).status_int == 201
    api.drain_casts()
    before = _table_state()
    response = api.call("POST", path, body)
    assert response.status_int == status, response.text
    assert mentions in response.json["error"]["message"]
    assert response.json["error"]["code"] == status
    assert _table_state() == before
    assert api.drain_casts(0.1) == []


def test_body_that_is_not_json_no_token_reader_token_and_oversized_change_nothing(api):
    before = _table_state()
    not_json = api.call("POST", "/v1/provider-fw-rules", raw=b"{cidr: nope")
    assert not_json.status_int == 400 and not_json.json["error"]["message"].startswith("body:")
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24"}, token=None).status_int == 401
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24"}, token="bogus").status_int == 401
    forbidden = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24"}, token="reader")
    assert forbidden.status_int == 403
    assert api.call("DELETE", "/v1/provider-fw-rules/1", token="reader").status_int == 403
    huge = api.call("POST", "/v1/provider-fw-rules", raw=b"{" + b" " * (api.conf.api.max_request_body_size + 10) + b"}")
    assert huge.status_int == 413
    assert api.call("GET", "/v1/provider-fw-rules", token=None).status_int == 401
    assert api.call("PUT", "/v1/provider-fw-rules").status_int == 405
    assert api.call("GET", "/v1/nothing-here").status_int == 404
    assert _table_state() == before
    assert api.drain_casts(0.1) == []


def test_pagination_with_limit_and_marker_visits_every_rule_once(api):
    for i in range(7):
        assert api.call("POST", "/v1/provider-fw-rules", {"cidr": f"198.51.100.{i}"}).status_int == 201
    seen, marker = [], None
    while True:
        path = "/v1/provider-fw-rules?limit=3" + (f"&marker={marker}" if marker else "")
        page = api.call("GET", path).json
        seen += [r["cidr"] for r in page["rules"]]
        marker = page["next_marker"]
        if marker is None:
            break
    assert seen == [f"198.51.100.{i}/32" for i in range(7)]
    assert api.call("GET", "/v1/provider-fw-rules?limit=0").status_int == 400
    assert api.call("GET", "/v1/provider-fw-rules?marker=x").status_int == 400


def test_every_mutation_is_audited_with_token_name_and_request_id(api):
    response = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.0/24", "description": "abuse #42"},
                        headers={"X-Request-Id": "req-audit-test"})
    assert response.headers["X-Request-Id"] == "req-audit-test"
    records = api.call("GET", "/v1/audit-log?limit=1").json["audit"]
    assert records[0]["request_id"] == "req-audit-test"
    assert records[0]["actor"].startswith("admin-")
    assert records[0]["detail"]["reason"] == "abuse #42"
    assert api.call("GET", "/v1/audit-log", token="reader").status_int == 403


def test_bulk_import_counts_added_duplicate_and_refused_in_one_generation(api):
    text = "\n".join(["# feed", "198.51.100.1", "198.51.100.1  # again", "198.51.100.0/30", "not-an-ip",
                      "10.20.1.1", "0.0.0.0/0", "2001:db8::/48", ""])
    before = db.provider_fw_generation_get()
    response = api.call("POST", "/v1/provider-fw-rules/import?protocol=tcp&from_port=22", raw=text.encode(),
                        content_type="text/plain")
    assert response.status_int == 201, response.text
    body = response.json
    assert (body["added"], body["duplicate"], body["refused"]) == (3, 1, 3)
    assert {r["line"] for r in body["refused_lines"]} == {5, 6, 7}
    assert body["generation"] == before + 1
    assert [(method, args["generation"], len(args["added"])) for method, args in api.drain_casts()] == [
        ("trigger_provider_fw_rules", before + 1, 3)]
    again = api.call("POST", "/v1/provider-fw-rules/import", raw=json.dumps(
        {"cidrs": ["198.51.100.1"], "protocol": "tcp", "from_port": 22}).encode())
    assert again.status_int == 200 and again.json["added"] == 0 and again.json["duplicate"] == 1
    assert db.provider_fw_generation_get() == before + 1


def test_max_rules_refuses_new_rules_with_a_clear_error(api):
    api.conf.set_override("max_rules", 2)
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.1"}).status_int == 201
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.2"}).status_int == 201
    refused = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.3"})
    assert refused.status_int == 409 and "max_rules" in refused.json["error"]["message"]
    assert db.provider_fw_rule_count() == 2


def test_services_lists_workers_with_state_and_sync(api):
    db.service_update("hv-a", driver="libvirt/iptables", heartbeat=True, applied_generation=0, rule_count=0)
    db.service_update("hv-b", driver="libvirt/iptables", applied_generation=-1)
    services = {s["host"]: s for s in api.call("GET", "/v1/services", token="reader").json["services"]}
    assert services["hv-a"]["state"] == "up" and services["hv-a"]["in_sync"]
    assert services["hv-b"]["state"] == "down" and not services["hv-b"]["in_sync"]


def test_an_unexpected_error_is_a_json_500_without_traceback(api, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(db, "provider_fw_rule_get_all", explode)
    response = api.call("GET", "/v1/provider-fw-rules")
    assert response.status_int == 500
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert response.headers["X-Request-Id"] in response.json["error"]["message"]


# --------------------------------------------------------------------------- the contract's edges (issue 8)
# Each kind of input a new user found crashing or fooling the API, on SQLite, PostgreSQL and MariaDB alike.

NOT_PLAIN_NETWORKS = [
    "fe80::1%eth0",             # an IPv6 scope id: ipaddress keeps it in the CIDR, ip6tables-restore refuses it
    "fe80::1%eth0/64",
    "fe80::1%25eth0",
    "198.51.100.0/255.255.255.0",   # netmask and hostmask forms
    "198.51.100.0/0.0.0.255",
    "198.51.100.0/024",         # a zero-padded prefix
    " 198.51.100.7",            # whitespace in a JSON field
    "198.51.100.7\n",
    "١٩٨.51.100.7",             # Arabic-Indic digits: Python's \d and int() accept them
    "198.51.100.7/32/32",
    "x" * 5000,
]


@pytest.mark.parametrize("cidr", NOT_PLAIN_NETWORKS, ids=range(len(NOT_PLAIN_NETWORKS)))
def test_anything_but_a_plain_network_is_refused_naming_cidr_everywhere_a_cidr_is_taken(api, cidr):
    before = _table_state()
    for path in ("/v1/provider-fw-rules", "/v1/block-external-addresses", "/v1/remove-external-address-block"):
        response = api.call("POST", path, {"cidr": cidr})
        assert response.status_int == 400, (path, response.text)
        assert response.json["error"]["message"].startswith("cidr: ")
    listing = api.call("GET", "/v1/provider-fw-rules?" + urllib.parse.urlencode({"cidr": cidr}))
    assert listing.status_int == 400 and listing.json["error"]["message"].startswith("cidr: ")
    # An import entry is a value of a block list (docs/feeds.md): surrounding whitespace, netmask, hostmask
    # and prefix spellings are the list formats' to read; everything else is refused there too.
    if cidr.strip() == cidr and "/0" not in cidr and "/255" not in cidr:
        imported = api.call("POST", "/v1/provider-fw-rules/import", {"cidrs": [cidr]})
        assert imported.status_int == 200 and imported.json["refused"] == 1, imported.text
    assert _table_state() == before


def test_a_text_import_refuses_a_scope_id_line_and_adds_the_rest(api):
    response = api.call("POST", "/v1/provider-fw-rules/import", raw=b"fe80::1%eth0\n2001:db8::1\n",
                        content_type="text/plain")
    assert response.status_int == 201
    assert (response.json["added"], response.json["refused"]) == (1, 1)
    assert response.json["refused_lines"][0]["line"] == 1
    assert [r.cidr for r in db.provider_fw_rule_get_all()] == ["2001:db8::1/128"]


TEXT_THAT_IS_NOT_STORABLE = [
    ("NUL", b'"a\\u0000b"'),
    ("lone high surrogate", b'"\\ud800"'),
    ("lone low surrogate", b'"x\\udfffy"'),
    ("escape", b'"\\u001b[2J"'),
    ("newline", b'"two\\nlines"'),
    ("C1 control", b'"\\u009b31m"'),
    ("DEL", b'"\\u007f"'),
]


@pytest.mark.parametrize("name,literal", TEXT_THAT_IS_NOT_STORABLE, ids=[t[0] for t in TEXT_THAT_IS_NOT_STORABLE])
def test_a_description_no_database_can_store_or_no_terminal_should_print_is_refused(api, name, literal):
    before = _table_state()
    for path in ("/v1/provider-fw-rules", "/v1/block-external-addresses"):
        response = api.call("POST", path, raw=b'{"cidr": "198.51.100.7", "description": ' + literal + b"}")
        assert response.status_int == 400, response.text
        assert response.json["error"]["message"].startswith("description: ")
    assert _table_state() == before


def test_a_description_of_any_printable_unicode_up_to_the_limit_is_stored_as_given(api):
    description = ("é€😀" * 100)[:255]
    response = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.7", "description": description})
    assert response.status_int == 201, response.text
    assert api.call("GET", f"/v1/provider-fw-rules/{response.json['rule']['id']}").json["rule"]["description"] \
        == description


@pytest.mark.parametrize("query", ["description=x%00y", "description=%ED%A0%80", "description=%FF",
                                   "description=" + "x" * 256, "protocol=tcp&protocol=udp", "colour=red",
                                   "from_port=99999999999999999999999", "ttl=1.5", "ttl=", "from_port=%D9%A1"])
def test_a_bad_import_query_string_is_a_400_naming_the_parameter(api, query):
    before = _table_state()
    response = api.call("POST", "/v1/provider-fw-rules/import?" + query, raw=b"198.51.100.7\n",
                        content_type="text/plain")
    assert response.status_int == 400, response.text
    name = query.split("=", 1)[0].split("&")[0]
    assert response.json["error"]["message"].startswith((name + ":", "query:")), response.text
    assert _table_state() == before


@pytest.mark.parametrize("rule_id", ["99999999999999999999999", str(2**63), "0", "-1", "1.0", "1e3", "%D9%A1",
                                     "%FF", "%00", "abc"])
def test_an_id_no_rule_can_have_is_a_404_on_every_database(api, rule_id):
    assert api.call("GET", f"/v1/provider-fw-rules/{rule_id}").status_int == 404
    assert api.call("DELETE", f"/v1/provider-fw-rules/{rule_id}").status_int == 404


@pytest.mark.parametrize("query", ["marker=99999999999999999999999", f"marker={2**63}", "marker=-1", "limit=0",
                                   "limit=10001", "limit=1.0", "limit=", "marker=", "limit=1&limit=2", "page=2",
                                   "protocol=TCP", "cidr=%FF"])
def test_a_bad_list_query_is_a_400_naming_the_parameter(api, query):
    response = api.call("GET", "/v1/provider-fw-rules?" + query)
    assert response.status_int == 400, response.text


@pytest.mark.parametrize("body,field", [
    ({"cidr": "198.51.100.7", "expires": "2026-12-01T00:00:00Z"}, "expires"),     # a misspelt expires_at
    ({"cidr": "198.51.100.7", "port": 22}, "port"),
    ({"cidr": "198.51.100.7", "Protocol": "tcp"}, "Protocol"),
])
def test_an_unknown_field_is_refused_naming_it_rather_than_ignored(api, body, field):
    before = _table_state()
    response = api.call("POST", "/v1/provider-fw-rules", body)
    assert response.status_int == 400
    assert response.json["error"]["message"].startswith(f"{field}: unknown field")
    assert _table_state() == before


def _in(seconds: float) -> str:
    return (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)).isoformat()


@pytest.mark.parametrize("expires_at,fragment", [
    ("9999-12-31T23:59:59Z", "ten years"),
    pytest.param(_in(rules.MAX_LIFETIME + 3600), "ten years", id="an hour past ten years"),   # (xdist: one id)
    ("2026-12-01T00:00:00", "offset"),                 # zone-less: RFC 3339 requires the offset
    ("2026-12-01 00:00:00Z", "RFC 3339"),
    ("20261201T000000Z", "RFC 3339"),
    ("0001-01-01T00:00:00+14:00", "not a valid date-time"),   # before year 1 in UTC: no OverflowError
    ("9999-12-31T23:59:59-14:00", "not a valid date-time"),   # after year 9999 in UTC
    ("2026-02-30T00:00:00Z", "not a valid date-time"),
    ("2026-12-01T00:00:60Z", "not a valid date-time"),        # leap seconds are not representable
])
def test_expires_at_is_an_rfc3339_time_at_most_ten_years_ahead_like_ttl(api, expires_at, fragment):
    response = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.7", "expires_at": expires_at})
    assert response.status_int == 400, response.text
    assert response.json["error"]["message"].startswith("expires_at: ")
    assert fragment in response.json["error"]["message"]


def test_expires_at_in_any_offset_is_stored_as_the_same_instant_in_utc(api):
    response = api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.7",
                                                          "expires_at": "2031-06-01T02:30:00.123456789+02:30"})
    assert response.status_int == 201, response.text
    assert response.json["rule"]["expires_at"] == "2031-06-01T00:00:00.123456Z"


@pytest.mark.parametrize("body,field", [
    ({"cidr": "198.51.100.7", "ttl": 1.5}, "ttl"),
    ({"cidr": "198.51.100.7", "ttl": "60"}, "ttl"),
    ({"cidr": "198.51.100.7", "ttl": rules.MAX_LIFETIME + 1}, "ttl"),
    ({"cidr": "198.51.100.7", "ttl": 1e400}, "ttl"),
    ({"cidr": "198.51.100.7", "protocol": "tcp", "from_port": 22.5}, "from_port"),
    ({"cidr": "198.51.100.7", "protocol": "tcp", "from_port": "22"}, "from_port"),
    ({"cidr": "198.51.100.7", "protocol": "tcp", "from_port": 2**64}, "from_port"),
    ({"cidr": "198.51.100.7", "protocol": "tcp", "to_port": -2**63 - 1}, "to_port"),
    ({"cidr": "198.51.100.7", "protocol": "tcp", "from_port": True}, "from_port"),
    ({"cidr": "198.51.100.7", "protocol": ["tcp"]}, "protocol"),
    ({"cidr": "198.51.100.7", "description": 42}, "description"),
    ({"cidr": ["198.51.100.7"]}, "cidr"),
    ({"cidr": None}, "cidr"),
    ({"cidr": "198.51.100.7", "ttl": 60, "expires_at": _in(3600)}, "ttl"),
])
def test_a_value_of_the_wrong_type_or_range_is_a_400_naming_the_field(api, body, field):
    before = _table_state()
    response = api.call("POST", "/v1/provider-fw-rules", raw=json.dumps(body).replace("Infinity", "1e400").encode())
    assert response.status_int == 400, response.text
    assert response.json["error"]["message"].startswith(f"{field}: "), response.text
    assert _table_state() == before


def test_an_integer_written_with_a_zero_fraction_is_that_integer(api):
    # JSON Schema: 22.0 is the integer 22.
    raw = b'{"cidr": "198.51.100.7", "protocol": "tcp", "from_port": 22.0, "ttl": 60.0}'
    response = api.call("POST", "/v1/provider-fw-rules", raw=raw)
    assert response.status_int == 201, response.text
    assert response.json["rule"]["from_port"] == 22


@pytest.mark.parametrize("raw,content_type,status", [
    (b"", "application/json", 400),
    (b"   ", "application/json", 400),
    (b"", None, 415),
    (b'{"cidr": "198.51.100.7"}', None, 415),
    (b'{"cidr": "198.51.100.7"}', "text/plain", 415),
    (b'{"cidr": "198.51.100.7"}', "application/x-www-form-urlencoded", 415),
    (b'{"cidr": "198.51.100.7"}', "application/json; charset=latin-1", 415),
    (b'{"cidr": "198.51.100.7", "ttl": NaN}', "application/json", 400),
    (b'{"cidr": "198.51.100.7", "ttl": Infinity}', "application/json", 400),
    (b'{"cidr": "198.51.100.7", "cidr": "203.0.113.9"}', "application/json", 400),
    (b"[" * 30000 + b"]" * 30000, "application/json", 400),
    (b'{"cidr": "198.51.100.7", "from_port": ' + b"9" * 5000 + b"}", "application/json", 400),
    (b'{"cidr": "198.51.100.7"', "application/json", 400),
    (b'\xff{"cidr": "198.51.100.7"}', "application/json", 400),
    (b'"198.51.100.7"', "application/json", 400),
    (b"null", "application/json", 400),
])
def test_an_empty_malformed_or_mistyped_body_is_a_4xx_and_changes_nothing(api, raw, content_type, status):
    before = _table_state()
    request = webob.Request.blank("/v1/provider-fw-rules", method="POST")
    request.headers["X-Auth-Token"] = api.admin
    request.body = raw
    if content_type is None:
        request.environ.pop("CONTENT_TYPE", None)
    else:
        request.headers["Content-Type"] = content_type
    response = request.get_response(api.app)
    assert response.status_int == status, response.text
    assert response.json["error"]["code"] == status
    assert _table_state() == before


def test_a_wrong_method_is_a_405_that_says_which_methods_are_allowed(api):
    response = api.call("PUT", "/v1/provider-fw-rules/1")
    assert response.status_int == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "DELETE"}


def test_an_expired_rule_leaves_every_listing_at_its_expiry_before_any_purge(api):
    past = db.provider_fw_rule_create(rules.make_spec("198.51.100.7"), expires_at=_naive(-1))[0]
    live = db.provider_fw_rule_create(rules.make_spec("198.51.100.8"), expires_at=_naive(3600))[0]
    assert [r["id"] for r in api.call("GET", "/v1/provider-fw-rules").json["rules"]] == [live.id]
    assert api.call("GET", "/v1/provider-fw-rules?cidr=198.51.100.7/32").json["rules"] == []
    assert api.call("GET", f"/v1/provider-fw-rules/{past.id}").status_int == 404
    assert api.call("DELETE", f"/v1/provider-fw-rules/{past.id}").status_int == 404
    assert api.call("GET", "/v1/external-address-blocks").json["blocks"] == [{"cidr": "198.51.100.8/32", "rules": 1}]
    assert api.call("POST", "/v1/remove-external-address-block", {"cidr": "198.51.100.7"}).status_int == 404
    # The same rule can be created again at once (the expired row is retired in the same transaction).
    assert api.call("POST", "/v1/provider-fw-rules", {"cidr": "198.51.100.7"}).status_int == 201


def _naive(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(seconds=seconds)


def test_the_openapi_document_is_public_and_is_the_contract_the_router_enforces(api):
    response = api.call("GET", "/v1/openapi.json", token=None)
    assert response.status_int == 200 and response.content_type == "application/json"
    assert response.json == schemas.openapi_document()


def test_the_rule_strategies_of_the_driver_property_tests_agree_with_the_real_api(conf, sqlite_db):
    """tests.lib.rule_strategies.api_spec is the API's verdict: every body it accepts the API creates with
    that very spec (201), every one it refuses the API refuses (4xx).  So the driver property tests draw
    exactly from what the API accepts."""
    from hypothesis import HealthCheck, given, settings

    from tests.lib.rule_strategies import api_spec, rule_bodies

    conf.set_override("control_exchange", "api-strategies-" + secrets.token_hex(4))
    api = Api(conf)
    verdicts = {"accepted": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=rule_bodies())
    def agree(body):
        expected = api_spec(body)
        response = api.call("POST", "/v1/provider-fw-rules", body)
        if expected is None:
            assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
            verdicts["refused"] += 1
            return
        assert response.status_code == 201, (body, response.text)
        rule = response.json["rule"]
        assert rules.RuleSpec(rule["cidr"], rule["protocol"], rule["from_port"], rule["to_port"]) == expected
        assert api.call("DELETE", f"/v1/provider-fw-rules/{rule['id']}").status_code == 204
        verdicts["accepted"] += 1

    try:
        agree()
    finally:
        api.close()
    assert verdicts["accepted"] > 50 and verdicts["refused"] > 0, verdicts
