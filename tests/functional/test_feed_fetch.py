"""The feed fetcher against a real HTTP server on 127.0.0.1: conditional requests, size and time limits."""

from __future__ import annotations

import time

import pytest
import requests

from provfw import exception
from provfw.feeds import fetch
from tests.lib.httpserver import FeedServer, data_file

pytestmark = pytest.mark.functional

DROP = data_file("feeds", "spamhaus-drop.txt")


@pytest.fixture
def server():
    server = FeedServer()
    yield server
    server.close()


def get(url, etag=None, modified=None, **limits):
    limits.setdefault("max_bytes", 1024 * 1024)
    return fetch.fetch(url, etag, modified, session=requests.Session(), **limits)


def test_a_list_downloads_with_its_validators_and_a_repeat_is_a_304(server):
    server.publish("/drop.txt", DROP)
    first = get(server.url("/drop.txt"))
    assert (first.status, first.body) == (200, DROP) and first.etag and first.last_modified
    again = get(server.url("/drop.txt"), first.etag, first.last_modified)
    assert (again.status, again.body, again.etag) == (304, None, first.etag)
    assert server.answered("/drop.txt") == [200, 304]
    headers = server.requests[-1][1]
    assert headers["If-None-Match"] == first.etag and headers["User-Agent"].startswith("provfw/")


def test_a_server_with_only_last_modified_answers_304_too(server):
    server.publish("/drop.txt", DROP, etag=False)
    first = get(server.url("/drop.txt"))
    assert first.etag is None and first.last_modified
    assert get(server.url("/drop.txt"), None, first.last_modified).status == 304


def test_a_changed_list_downloads_again(server):
    published = server.publish("/drop.txt", DROP)
    first = get(server.url("/drop.txt"))
    published.set(DROP + b"192.0.2.128/25 ; SBL000005\n")
    assert get(server.url("/drop.txt"), first.etag, first.last_modified).body.endswith(b"SBL000005\n")


def test_an_error_status_names_the_status(server):
    server.publish("/drop.txt", DROP, status=503)
    with pytest.raises(exception.FeedFetchError, match="HTTP 503") as info:
        get(server.url("/drop.txt"))
    assert info.value.status == "fetch_error"
    with pytest.raises(exception.FeedFetchError, match="HTTP 404"):
        get(server.url("/missing.txt"))


def test_a_declared_length_over_the_limit_is_refused_unread(server):
    server.publish("/big.txt", b"198.51.100.1\n" * 1000)
    with pytest.raises(exception.FeedTooLarge, match="max_bytes"):
        get(server.url("/big.txt"), max_bytes=1000)


def test_an_undeclared_length_is_cut_at_the_limit(server):
    server.publish("/big.txt", b"198.51.100.1\n" * 10000, content_length=False)
    with pytest.raises(exception.FeedTooLarge):
        get(server.url("/big.txt"), max_bytes=50_000)


def test_the_limit_counts_decoded_bytes_so_gzip_cannot_expand_past_it(server):
    server.publish("/bomb.txt", b"198.51.100.1\n" * 100_000, gzip=True)       # 1.3 MB, a few KiB on the wire
    with pytest.raises(exception.FeedTooLarge):
        get(server.url("/bomb.txt"), max_bytes=200_000)
    small = server.publish("/small.txt", DROP, gzip=True)
    assert get(server.url("/small.txt")).body == small.body


def test_a_server_that_trickles_is_cut_off_by_the_total_timeout(server):
    server.publish("/slow.txt", DROP * 20, trickle=0.05)
    started = time.monotonic()
    with pytest.raises(exception.FeedTimeout, match="more than 0.5 s"):
        get(server.url("/slow.txt"), read_timeout=5, total_timeout=0.5)
    assert time.monotonic() - started < 3


def test_a_closed_port_says_connection_refused(server):
    port = server.port
    server.close()
    with pytest.raises(exception.FeedFetchError, match="Connection refused"):
        get(f"http://127.0.0.1:{port}/drop.txt", connect_timeout=2)


@pytest.mark.parametrize("url", ["ftp://example.org/x", "file:///etc/passwd", "http:///nohost", "not a url", "",
                                 "https://example.org/" + "x" * 2050])
def test_only_http_and_https_urls_with_a_host_are_accepted(url):
    with pytest.raises(exception.InvalidInput) as info:
        fetch.check_url(url)
    assert info.value.field == "url"


def test_passwords_in_urls_are_not_shown():
    assert fetch.redact("https://user:s3cret@feeds.example:8443/list.txt") == \
        "https://user:***@feeds.example:8443/list.txt"
    assert fetch.redact("https://feeds.example/list.txt?key=1") == "https://feeds.example/list.txt?key=1"
