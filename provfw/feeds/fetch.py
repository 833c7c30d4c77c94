"""Download a block list: conditional, bounded in size and time.

Design
    One function, ``fetch``, over ``requests`` (a session may be injected for
    tests and connection reuse).  It never reads more than ``max_bytes`` of
    the *decoded* body (a gzip-encoded answer is counted after decoding, so a
    small compressed answer cannot expand past the limit), refuses a
    ``Content-Length`` over the limit before reading, and gives up when the
    whole download takes longer than ``total_timeout`` seconds (requests'
    own timeouts bound each connect and each read, not the sum: a server
    that trickles a byte every few seconds would otherwise hold the conductor
    for ever).  ``If-None-Match`` / ``If-Modified-Since`` are sent when the
    caller has an ETag / Last-Modified; a 304 answer has no body.

    Errors are types (``exception.FeedFetchError`` and its subclasses
    ``FeedTooLarge``, ``FeedTimeout``), with a message that says what
    happened for the feed's ``last_error``.  Nothing here touches the
    database; the conductor's feed syncer decides what a result means.

Thread-safety: a call uses only its arguments; share a session only as requests allows.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.parse

import requests
import urllib3

import provfw
from provfw import adminclient, exception

USER_AGENT = f"provfw/{provfw.__version__} (feed fetcher; +https://opendev.org/provfw)"
CHUNK_BYTES = 64 * 1024
SCHEMES = ("http", "https")


@dataclasses.dataclass(frozen=True)
class Fetched:
    """``status``: 200 or 304.  ``body``: the decoded bytes (None for 304).  ``etag`` and ``last_modified``:
    the validators to send next time (None when the server gave none).  ``seconds``: wall time."""

    status: int
    body: bytes | None
    etag: str | None
    last_modified: str | None
    seconds: float
    url: str


def check_url(url: object) -> str:
    """Return ``url`` if provfw may fetch it (http or https, with a host); InvalidInput (field ``url``) otherwise."""
    if not isinstance(url, str) or not url or len(url) > 2048 or not url.isprintable() or " " in url:
        raise exception.InvalidInput("url", "must be an http:// or https:// URL of at most 2048 characters")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise exception.InvalidInput("url", f"{url[:100]!r} is not an http:// or https:// URL with a host")
    return url


def redact(url: str) -> str:
    """``url`` without a password in its user part, for views and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def fetch(url: str, etag: str | None = None, last_modified: str | None = None, *, max_bytes: int,
          connect_timeout: float = 10.0, read_timeout: float = 30.0, total_timeout: float = 120.0,
          session: requests.Session | None = None) -> Fetched:
    """GET ``url``; return Fetched, or raise FeedFetchError / FeedTooLarge / FeedTimeout.

    Any status but 200 and 304 (after redirects) is a FeedFetchError naming it.
    """
    headers = {"User-Agent": USER_AGENT, "Accept": "text/plain, text/csv, */*;q=0.5"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    started = time.monotonic()
    client = session or requests
    shown = redact(url)
    try:
        response = client.get(url, headers=headers, stream=True, timeout=(connect_timeout, read_timeout))
    except requests.Timeout as exc:
        raise exception.FeedTimeout(f"{shown}: no answer within {connect_timeout:g} s / {read_timeout:g} s "
                                    f"({type(exc).__name__})") from None
    except requests.RequestException as exc:
        raise exception.FeedFetchError(f"{shown}: {_reason(exc)}") from None
    with response:
        if response.status_code == 304:
            return Fetched(304, None, response.headers.get("ETag") or etag,
                           response.headers.get("Last-Modified") or last_modified, time.monotonic() - started,
                           response.url)
        if response.status_code != 200:
            raise exception.FeedFetchError(f"{shown}: HTTP {response.status_code} {response.reason or ''}".rstrip())
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes and \
                not response.headers.get("Content-Encoding"):
            raise exception.FeedTooLarge(f"{shown}: {int(declared):,} bytes is more than [feeds] max_bytes "
                                         f"({max_bytes:,})")
        chunks: list[bytes] = []
        size = 0
        try:
            # read1 returns whatever arrived (at most a chunk, decoded), so a server that trickles bytes
            # cannot keep the loop from checking the clock; b"" is the end of the body.
            while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
                size += len(chunk)
                if size > max_bytes:
                    raise exception.FeedTooLarge(f"{shown}: more than [feeds] max_bytes ({max_bytes:,} bytes)")
                if time.monotonic() - started > total_timeout:
                    raise exception.FeedTimeout(f"{shown}: the download took more than {total_timeout:g} s "
                                                f"({size:,} bytes read)")
                chunks.append(chunk)
        except urllib3.exceptions.ReadTimeoutError:
            raise exception.FeedTimeout(f"{shown}: the server stopped sending for {read_timeout:g} s "
                                        f"({size:,} bytes read)") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise exception.FeedFetchError(f"{shown}: {_reason(exc)} ({size:,} bytes read)") from None
        return Fetched(200, b"".join(chunks), response.headers.get("ETag"), response.headers.get("Last-Modified"),
                       time.monotonic() - started, response.url)


def _reason(exc: BaseException) -> str:
    """The innermost OS-level reason ('Connection refused') inside requests' wrappers, else the text."""
    return adminclient.root_cause(exc)
