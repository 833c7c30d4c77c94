"""The API contract (provfw.api.schemas): the published document, the routes, and the validation built on it."""

from __future__ import annotations

import ipaddress

import pytest
import routes
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st

from provfw import exception, rules
from provfw.api import auth, router, schemas, wsgi

DOCUMENT = schemas.openapi_document()


def _routes() -> set[tuple[str, str]]:
    found = set()
    for route in router.build_mapper().matchlist:
        for method in route.conditions["method"]:
            found.add((route.routepath, method.lower()))
    return found


def test_every_route_of_the_mapper_is_in_the_document_and_every_documented_operation_is_routed():
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert _routes() == documented


def test_every_routed_action_is_the_documented_operation_id():
    by_route = {(route.routepath, route.conditions["method"][0].lower()): route.defaults["action"]
                for route in router.build_mapper().matchlist}
    for (path, method), action in by_route.items():
        assert DOCUMENT["paths"][path][method]["operationId"] == action


def test_the_router_refuses_to_start_with_a_route_outside_the_contract():
    mapper = router.build_mapper()
    mapper.connect("/v1/secret", controller="admin", action="secret", conditions={"method": ["GET"]})
    with pytest.raises(exception.ConfigError, match="secret"):
        wsgi.Router(mapper, {"admin": object()}, auth.TokenAuthenticator())


def test_the_document_is_valid_openapi_3_1():
    assert DOCUMENT["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(schemas.openapi_document()).validate()   # against the OAS 3.1 meta-schema


def test_every_operation_documents_its_errors_in_the_one_error_shape():
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            public = operation.get("security") == []
            assert ("401" in responses) != public, (method, path)
            assert {"400", "500"} <= set(responses)         # every operation refuses unknown query parameters
            assert ("503" in responses) != public or path == "/healthz", (method, path)   # the database is away
            if method != "get":
                assert "403" in responses                   # reader tokens may only GET
            if "requestBody" in operation:
                assert {"413", "415"} <= set(responses), (method, path)
            for status, response in responses.items():
                assert response["headers"]["X-Request-Id"] == {"$ref": "#/components/headers/X-Request-Id"}
                if (method, path, status) == ("get", "/healthz", "503"):        # the health check's own shape
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Unavailable"}
                elif int(status) >= 400 and (method, path) != ("post", "/v1/block-external-addresses"):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, (method, path, status)


def test_every_request_body_refuses_unknown_fields():
    for name in ("RuleCreate", "RuleImport", "ExternalBlock", "ExternalUnblock"):
        assert schemas.SCHEMAS[name]["additionalProperties"] is False


def test_the_field_domains_are_the_ones_provfw_rules_defines():
    create = schemas.SCHEMAS["RuleCreate"]["properties"]
    assert create["cidr"]["pattern"] == rules.CIDR_PATTERN and create["cidr"]["maxLength"] == rules.CIDR_MAX_LENGTH
    assert create["protocol"]["enum"][:-1] == list(rules.PROTOCOLS)
    assert (create["from_port"]["minimum"], create["from_port"]["maximum"]) == (rules.ANY, rules.MAX_PORT)
    assert create["description"]["maxLength"] == rules.MAX_DESCRIPTION
    assert create["description"]["pattern"] == rules.TEXT_PATTERN
    assert create["ttl"]["maximum"] == rules.MAX_LIFETIME
    assert create["expires_at"]["pattern"] == rules.TIMESTAMP_PATTERN


@pytest.mark.parametrize("body, message", [
    ({"cidr": "198.51.100.7", "expires": "2026-12-01T00:00:00Z"}, "expires: unknown field; the fields are cidr,"),
    ({}, "cidr: is required"),
    ([], "body: must be an object"),
    ({"cidr": "fe80::1%eth0"}, "cidr: 'fe80::1%eth0' is not a plain IPv4/IPv6 address or CIDR"),
    ({"cidr": "198.51.100.7", "ttl": 60, "expires_at": "2030-01-01T00:00:00Z"}, "ttl: give either ttl or expires_at"),
    ({"cidr": "198.51.100.7", "ttl": 0.5}, "ttl: must be an integer"),
    ({"cidr": "198.51.100.7", "from_port": 70000}, "from_port: 70000 is out of range -1..65535"),
    ({"cidr": "198.51.100.7", "description": "a\x00b"}, "description: 'a\\x00b' must not contain control"),
    ({"cidr": "198.51.100.7", "description": "a\n"}, "description: 'a\\n' must not contain control"),
    ({"cidr": "198.51.100.7", "expires_at": "2026-12-01T00:00:00"},
     "expires_at: '2026-12-01T00:00:00' is not an RFC 3339 date-time with a UTC offset"),
    ({"cidr": "198.51.100.7", "protocol": "TCP"}, "protocol: 'TCP' is not one of tcp, udp, icmp, all, null"),
])
def test_a_refusal_names_the_field_first(body, message):
    with pytest.raises(exception.InvalidInput) as info:
        schemas.validate("RuleCreate", body)
    assert str(info.value).startswith(message), str(info.value)


def test_an_import_list_item_of_the_wrong_type_is_named_by_its_index():
    with pytest.raises(exception.InvalidInput) as info:
        schemas.validate("RuleImport", {"cidrs": ["198.51.100.7", 5]})
    assert info.value.field == "cidrs[1]"


def test_unknown_and_mistyped_query_parameters_are_named():
    with pytest.raises(exception.InvalidInput, match="^colour: unknown parameter; the parameters are cidr"):
        schemas.validate_parameters("index", "query", {"colour": "red"})
    with pytest.raises(exception.InvalidInput, match="^limit: 'ten' is not an integer"):
        schemas.coerce_parameter("limit", "ten", schemas.OPERATIONS["index"].query["limit"])
    with pytest.raises(exception.InvalidInput, match="^limit: "):
        schemas.validate_parameters("index", "query", {"limit": 0})
    assert schemas.coerce_parameter("limit", "10", {"type": "integer"}) == 10


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(allow_nan=False),
                    st.sampled_from(["", "x", "198.51.100.7", "2001:db8::/48", "0.0.0.0/0", "tcp", "icmp", "manual",
                                     "2026-12-01T00:00:00Z", "2026-12-01T00:00:00", "\x00", "a" * 300]),
                    st.lists(st.sampled_from(["198.51.100.7", 5, None]), max_size=3), st.just({"a": 1}))
_DIRECT = sorted(name for name in schemas.SCHEMAS if not schemas._refers(schemas.SCHEMAS[name]))


def _refusals(validator, instance) -> list[str]:
    """Every error, as the refusal it would make, in the order ``schemas._first`` ranks them."""
    errors = sorted(validator.iter_errors(instance), key=lambda e: (
        len(e.absolute_path), list(map(str, e.absolute_path)), schemas._RANK.get(str(e.validator), 9),
        list(map(str, e.relative_schema_path))))
    return [str(schemas._refusal(error, "body", "field")) for error in errors]


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(_DIRECT), data=st.data())
def test_a_component_without_references_refuses_exactly_as_through_a_reference(name, data):
    """``schemas._validator`` validates a component without ``$ref`` as itself (no registry look-up per
    request); what it answers must be what validating through "#/components/schemas/NAME" answers."""
    schema = schemas.SCHEMAS[name]
    fields = sorted(schema.get("properties", {})) + ["unknown"] if isinstance(schema, dict) else ["unknown"]
    instance = data.draw(st.one_of(_VALUES, st.dictionaries(st.sampled_from(fields), _VALUES, max_size=4)))
    through_ref = schemas._Validator({"$ref": f"{schemas.BASE_URI}#/components/schemas/{name}"},
                                     registry=schemas._registry(), format_checker=schemas._FORMATS)
    assert _refusals(schemas._validator(name), instance) == _refusals(through_ref, instance)


def test_components_with_references_still_validate_through_them():
    referring = [name for name in schemas.SCHEMAS if schemas._refers(schemas.SCHEMAS[name])]
    assert referring                      # BlockConflict is an anyOf of two references
    for name in referring:
        assert "$ref" in schemas._validator(name).schema


# --------------------------------------------------------------------------- the schema and provfw.rules agree

def _network(draw_v6: bool, address: int, prefix: int | None) -> str:
    ip = ipaddress.IPv6Address(address % 2**128) if draw_v6 else ipaddress.IPv4Address(address % 2**32)
    return str(ip) if prefix is None else f"{ip}/{prefix % (129 if draw_v6 else 33)}"


@settings(max_examples=300, deadline=None)
@given(v6=st.booleans(), address=st.integers(0, 2**128 - 1), prefix=st.none() | st.integers(0, 128),
       protocol=st.sampled_from(rules.PROTOCOLS), from_port=st.none() | st.integers(-1, 65535),
       to_port=st.none() | st.integers(-1, 65535))
def test_every_rule_provfw_rules_accepts_passes_the_published_schema(v6, address, prefix, protocol, from_port,
                                                                     to_port):
    body = {"cidr": _network(v6, address, prefix), "protocol": protocol, "from_port": from_port,
            "to_port": to_port}
    try:
        rules.spec_from_body(body)
    except exception.InvalidInput:
        return
    schemas.validate("RuleCreate", body)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
       | st.from_regex(r"[0-9a-fA-F.:/%]{1,50}", fullmatch=True))
def test_a_cidr_the_schema_refuses_is_refused_by_provfw_rules_too(text):
    try:
        schemas.validate("RuleCreate", {"cidr": text})
    except exception.InvalidInput:
        if text == text.strip():    # rules also reads lines of a text import, whose whitespace it ignores
            with pytest.raises(exception.InvalidInput):
                rules.normalise_cidr(text)
        return
    # The schema accepts it: rules either normalises it to a canonical CIDR the schema accepts, or refuses it.
    try:
        canonical = rules.normalise_cidr(text)
    except exception.InvalidInput:
        return
    schemas.validate("RuleCreate", {"cidr": canonical})
    assert "%" not in canonical


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_the_schema_and_provfw_rules_agree_on_every_description(text):
    try:
        schemas.validate("RuleCreate", {"cidr": "198.51.100.7", "description": text})
        schema_ok = True
    except exception.InvalidInput:
        schema_ok = False
    try:
        rules.validate_description(text)
        rules_ok = True
    except exception.InvalidInput:
        rules_ok = False
    assert schema_ok == rules_ok


def test_the_document_lists_routes_exactly_as_routes_would_match_them():
    # A {name} in a documented path is a routes placeholder, so the URL templates mean the same thing.
    mapper = routes.Mapper()
    for path in DOCUMENT["paths"]:
        mapper.connect(path, action="x")
    assert mapper.match("/v1/provider-fw-rules/42") == {"action": "x", "id": "42"}


@pytest.mark.parametrize("body, where", [
    (rb'{"description": "\ud800"}', "description"),
    (rb'{"cidrs": ["192.0.2.1", "\uDFFF"]}', "cidrs[1]"),
    (rb'{"\udbff": 1}', "\udbff"),
    (rb'["x", {"a": ["\uDc00"]}]', "[1].a[0]"),
])
def test_decode_json_refuses_a_lone_surrogate_escape_wherever_it_is(body, where):
    with pytest.raises(exception.InvalidInput) as caught:
        wsgi.decode_json(body)
    assert caught.value.field == where and "surrogate" in caught.value.reason


@pytest.mark.parametrize("body, expected", [
    (rb'{"description": "\ud83d\ude00"}', {"description": "\U0001F600"}),   # a pair is one code point
    (rb'{"description": "\\ud800"}', {"description": "\\ud800"}),           # an escaped backslash, not an escape
    (rb'{"description": "\ud7ff\ue000"}', {"description": "\ud7ff\ue000"}),   # just outside the surrogate block
])
def test_decode_json_keeps_text_that_only_looks_like_a_surrogate(body, expected):
    assert wsgi.decode_json(body) == expected


def test_decode_json_refuses_an_encoded_surrogate_as_not_utf8():
    with pytest.raises(exception.InvalidInput, match="not UTF-8"):
        wsgi.decode_json(b'{"description": "\xed\xa0\x80"}')


@pytest.mark.parametrize("bad", [3, None, ["192.0.2.1"], {"cidr": "192.0.2.1"}, True])
def test_a_long_import_list_with_one_item_that_is_not_a_string_is_refused_naming_the_item(bad):
    cidrs = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(20_000)]
    assert schemas.validate("RuleImport", {"cidrs": cidrs}) == {"cidrs": cidrs}
    cidrs[19_998] = bad
    with pytest.raises(exception.InvalidInput, match=r"^cidrs\[19998\]: must be a string$"):
        schemas.validate("RuleImport", {"cidrs": cidrs})
    with pytest.raises(exception.InvalidInput, match=r"^\[19998\]: must be a string$"):
        schemas.validate("RuleImportList", cidrs)


@pytest.mark.parametrize("url", ["file:///tmp/drop.txt", "ftp://198.51.100.1/drop.txt", "https://x/a b"])
def test_a_feed_url_the_conductor_cannot_fetch_is_refused_saying_which_urls_it_takes(url):
    for name, body in (("FeedCreate", {"name": "drop", "url": url, "interval": 3600}), ("FeedUpdate", {"url": url})):
        with pytest.raises(exception.InvalidInput, match=r"^url: .* is not an http:// or https:// URL"):
            schemas.validate(name, body)
