"""The published contract holds for the REAL provfw-api process on SQLite, PostgreSQL and MariaDB.

schemathesis reads ``GET /v1/openapi.json`` from a running ``provfw-api`` (the console script, started with a
config file by ``tests.lib.deployment``), generates valid and invalid requests for every operation from it,
and checks each answer: never a server error, a status code, content type, headers and body the document
declares for that operation, and invalid data refused with a 4xx.  The values that broke the API before it
had a contract are mixed into the generated ones, so a schema that forgets a rule sends them to the
database as valid data (a NUL description on PostgreSQL is then a 500 here).  The bus is ``memory://``: the
API only casts, and nobody needs to receive them here.
"""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

from provfw import rules
from provfw.api import schemas
from tests.conftest import DATABASE_KINDS
from tests.lib import deployment as deploy

pytestmark = pytest.mark.functional

# Per operation and database: the coverage phase's boundary cases plus this many generated examples. Enough
# to reach every field's edges in both modes, small enough that all three databases take about a minute.
EXAMPLES = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module", params=DATABASE_KINDS)
def live_api(request):
    """A provfw-api process on a fresh database of each kind, with an admin token from provfw-manage.

    No conductor: the contract is the API's, and a conductor would fetch the URLs of the feeds schemathesis
    creates (random hosts: traffic that must not leave the machine).
    """
    with deploy.Deployment(db_kind=request.param, transport_url="memory://") as dep:
        dep.start_api(conductor=False)
        yield dep


def _networks() -> st.SearchStrategy[str]:
    """Valid networks of both families, bare or with any prefix: the pattern alone rarely yields one."""
    v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
    v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
    return st.one_of(v4.map(str), v6.map(str),
                     st.tuples(v4, st.integers(1, 32)).map(lambda a: f"{a[0]}/{a[1]}"),
                     st.tuples(v6, st.integers(1, 128)).map(lambda a: f"{a[0]}/{a[1]}"))


def _expiries() -> st.SearchStrategy[str]:
    """RFC 3339 times inside the accepted window (a minute to ten years ahead), in any offset."""
    now = datetime.datetime.now(datetime.timezone.utc)
    offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: datetime.timezone(datetime.timedelta(minutes=m)))
    return st.tuples(st.integers(60, rules.MAX_LIFETIME - 86400), offsets, st.booleans()).map(
        lambda t: (now + datetime.timedelta(seconds=t[0])).astimezone(t[1]).isoformat(
            timespec="microseconds" if t[2] else "seconds").replace("+00:00", "Z"))


def _steered(document: dict) -> dict:
    """The served document with generation hints: CIDR fields carry a format schemathesis fills with
    networks.  Only positive generation uses formats; the negative cases still come from the pattern."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("pattern") == rules.CIDR_PATTERN:
                node["format"] = "provfw-cidr"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return document


schemathesis.openapi.format("provfw-cidr", _networks())
schemathesis.openapi.format("date-time", _expiries())
# The document the API serves is built by provfw.api.schemas; the last test checks the live one is the same.
# What broke the API before it had a contract (issue 8), mixed into generated values. schemathesis sends an
# entry only in the mode the schema puts it in: one the schema allows goes out as valid data (so a schema
# that forgot a rule lets it reach the database), one it refuses as invalid data (which must be a 4xx).
# (Lone surrogates, which JSON can carry, are in test_api.py: schemathesis's Rust validator cannot hold them.)
TEXTS = ["\x00", "a\x00b", "\x1b[2J", "two\nlines", "\x9b31m", "\x7f", "x" * 256, "😀" * 255, "ﬀ", "\u2028"]
NETWORKS = ["fe80::1%eth0", "fe80::1%eth0/64", "198.51.100.0/255.255.255.0", "198.51.100.0/024", " 198.51.100.7",
            "198.51.100.7\n", "١٩٨.51.100.7", "x" * 50]
TIMES = ["9999-12-31T23:59:59Z", "2026-12-01T00:00:00", "2026-12-01 00:00:00Z", "20261201T000000Z", "\x00"]
INTEGERS = [2**63, 2**64, 10**23, -2**63 - 1, 2**31, -2]
_BINDINGS = {"texts": ("description",), "networks": ("cidr", "cidrs[*]"), "times": ("expires_at",)}
# The test sends the admin token itself; schemathesis must not generate (or leave out) X-Auth-Token, or a case
# it believes negative for the missing token would reach the API with one.
CONFIG = schemathesis.Config.from_dict({
    "generation": {"with-security-parameters": False},
    "dictionaries": {"texts": {"values": TEXTS}, "networks": {"values": NETWORKS}, "times": {"values": TIMES},
                     "integers": {"values": INTEGERS}},
    "parameters": {
        **{f"{where}.{name}": {"dictionary": dictionary, "probability": 0.3}
           for dictionary, names in _BINDINGS.items() for name in names for where in ("body", "query")
           if not (where == "query" and name == "cidrs[*]")},
        **{f"{where}.{name}": {"dictionary": "integers", "probability": 0.2}
           for name in ("from_port", "to_port", "ttl", "limit", "marker") for where in ("body", "query")
           if not (where == "body" and name in ("limit", "marker"))},
        "path.id": {"dictionary": "integers", "probability": 0.2},
    },
})
schema = schemathesis.openapi.from_dict(_steered(schemas.openapi_document()), config=CONFIG)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_answer_of_the_real_api_is_in_its_published_contract(case, live_api):
    # Any text is a valid text/plain import (a line that is no CIDR is counted as refused): a "negative"
    # text body does not exist, so there is nothing for negative_data_rejection to hold it to.
    checks = [c for c in CHECKS if c is not negative_data_rejection or case.media_type != schemas.TEXT]
    case.call_and_validate(base_url=live_api.url, headers={"X-Auth-Token": live_api.admin_token}, checks=checks,
                           timeout=30)


def test_the_document_is_public_and_names_every_route(live_api):
    response = requests.get(live_api.url + "/v1/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    assert response.json() == schemas.openapi_document()


def test_a_chunked_body_is_read_whole_and_one_past_the_limit_is_refused(live_api):
    headers = {"X-Auth-Token": live_api.admin_token, "Content-Type": "text/plain"}
    lines = [f"198.18.{i // 256}.{i % 256}\n".encode() for i in range(300)]
    response = requests.post(live_api.url + "/v1/provider-fw-rules/import", data=iter(lines), headers=headers,
                             timeout=30)      # an iterator: requests sends it chunked, without Content-Length
    assert response.status_code == 201, response.text
    assert response.json()["added"] == 300
    headers["Content-Type"] = "application/json"
    huge = iter([b'{"cidr": "198.51.100.7", "description": "', b"x" * 70000, b'"}'])
    response = requests.post(live_api.url + "/v1/provider-fw-rules", data=huge, headers=headers, timeout=30)
    assert response.status_code == 413, response.text
