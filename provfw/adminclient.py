"""AdminClient: the library dashboards and the ``provfw`` CLI use to talk to provfw-api.

    client = AdminClient("http://127.0.0.1:8774", token)
    client.block_ips("203.0.113.0/24")          # the seed's call
    client.list_rules(cidr="203.0.113.0/24")
    client.unblock_ips("203.0.113.0/24")

Errors come in two types, so callers decide on the type, never on text:

* ``AdminClientError``: the API answered, and refused (any status other than the
  call's success status) or answered something that is not provfw's JSON.  It
  carries ``status`` (int), ``message`` (the server's ``error.message``) and
  ``body`` (the parsed JSON, or None).
* ``APIUnreachable``: no answer at all (connection refused, DNS, TLS, timeout).
  It carries ``url`` and ``reason``.  It subclasses
  ``requests.RequestException``, so code written against the requests errors
  this client used to leak keeps working.  ``timed_out`` is True when the
  request was sent but no answer came in time: a change may or may not have
  been made.

Thread-safety: one ``requests.Session`` per client; share a client between
threads only if you accept requests' rules.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from typing import Any, Iterable, Iterator

import requests


class AdminClientError(Exception):
    """The API answered with an error (or with something that is not provfw's JSON)."""

    def __init__(self, status: int, message: str, body: Any = None):
        self.status = status
        self.message = message
        self.body = body
        super().__init__(f"HTTP {status}: {message}")


class APIUnreachable(requests.RequestException):
    """No answer from the API at ``url``; ``reason`` says why (e.g. 'Connection refused')."""

    def __init__(self, url: str, reason: str, timed_out: bool = False):
        self.url = url
        self.reason = reason
        self.timed_out = timed_out
        super().__init__(f"no answer from {url}: {reason} (a change may or may not have been made)" if timed_out
                         else f"cannot reach {url}: {reason}")


def root_cause(exc: BaseException) -> str:
    """The innermost OS-level reason inside requests' and urllib3's wrappers ('Connection refused').

    urllib3 nests the socket error several levels deep (MaxRetryError.reason ->
    NewConnectionError.__cause__ -> ConnectionRefusedError); when the chain has
    another shape the outermost text is still an honest answer.
    """
    seen: set[int] = set()
    level: list[Any] = [exc]
    found: str | None = None
    while level:  # breadth first, so the last reason found is the deepest
        following: list[Any] = []
        for current in level:
            if not isinstance(current, BaseException) or id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(current, OSError) and current.strerror:
                found = current.strerror
            following += [current.__cause__, current.__context__, getattr(current, "reason", None),
                          *(a for a in current.args if isinstance(a, BaseException))]
        level = following
    return found or str(exc)


class AdminClient:
    """A client of one provfw-api endpoint.

    ``url`` is the API's base URL (``http://host:8774``), ``token`` an API token
    (``provfw-manage token create``), ``timeout`` the seconds to wait for each
    answer.  Every method raises ``AdminClientError`` or ``APIUnreachable`` as
    described in the module docstring.
    """

    def __init__(self, url: str, token: str, timeout: float = 30.0, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers.update({"X-Auth-Token": token, "Accept": "application/json"})

    # ------------------------------------------------------------ transport

    def _send(self, method: str, path: str, expect: Iterable[int] = (200,), **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, self.url + path, **kwargs)
        except requests.ConnectTimeout as exc:
            raise APIUnreachable(self.url, f"connection timed out after {kwargs['timeout']:g} s") from exc
        except requests.ConnectionError as exc:
            raise APIUnreachable(self.url, root_cause(exc)) from exc
        except requests.Timeout as exc:
            raise APIUnreachable(self.url, f"timed out after {kwargs['timeout']:g} s", timed_out=True) from exc
        if response.status_code not in tuple(expect):
            try:
                body = response.json()
                error = body.get("error") if isinstance(body, dict) else None
                message = (error or {}).get("message") or (body.get("message") if isinstance(body, dict) else None)
            except ValueError:
                body, message = None, None
            raise AdminClientError(response.status_code, message or response.text.strip() or response.reason, body)
        return response

    def _request(self, method: str, path: str, expect: Iterable[int] = (200,), **kwargs) -> Any:
        return self._json(self._send(method, path, expect, **kwargs), path)

    def _json(self, response: requests.Response, path: str) -> Any:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AdminClientError(response.status_code,
                                   f"the answer from {self.url}{path} is not JSON; is this a provfw API?") from None

    # ------------------------------------------------------------ the seed's calls

    def block_ips(self, cidr: str, description: str | None = None, ttl: float | None = None,
                  source: str | None = None, allow_non_global: bool | None = None) -> dict:
        """Block all TCP, UDP and ICMP from ``cidr`` (creates the missing rules of the three, renews the others).

        ``ttl`` is in seconds (whole seconds are sent); ``source`` defaults to ``manual``;
        ``allow_non_global`` opts in to blocking a non-global range.  Returns ``{"status": "OK", "message":
        "Added N rules", "rules": [rule, ...], "renewed": int, "generation": int}`` where each rule is shaped as
        ``get_rule`` returns it.  Raises AdminClientError 400 (bad CIDR), 409 (the three rules exist already
        for at least as long: "Duplicate rule. 0 rules added"; protected or non-global network).
        """
        body: dict[str, Any] = {"cidr": cidr}
        if description is not None:
            body["description"] = description
        if ttl is not None:
            body["ttl"] = math.ceil(ttl)
        if source is not None:
            body["source"] = source
        if allow_non_global is not None:
            body["allow_non_global"] = allow_non_global
        return self._request("POST", "/v1/block-external-addresses", json=body)

    def unblock_ips(self, cidr: str, source: str | None = None) -> dict:
        """Delete every rule for ``cidr`` (with ``source``: only that source's wish; rules others want stay).

        Returns ``{"status": "OK", "message": "Deleted N rules", "cidr": normalised cidr, "deleted": N,
        "kept": N, "generation": int}``.  Raises AdminClientError 404 when no rule has that CIDR (and source),
        400 for a bad CIDR.
        """
        body = {"cidr": cidr, **({"source": source} if source is not None else {})}
        return self._request("POST", "/v1/remove-external-address-block", json=body)

    def list_blocks(self) -> list[dict]:
        """Distinct blocked CIDRs: ``[{"cidr": str, "rules": int}, ...]``."""
        return self._request("GET", "/v1/external-address-blocks")["blocks"]

    # ------------------------------------------------------------ rules

    def create_rule(self, cidr: str, protocol: str = "all", from_port: int | None = None,
                    to_port: int | None = None, description: str | None = None, ttl: float | None = None,
                    expires_at: str | None = None, source: str | None = None,
                    allow_non_global: bool | None = None) -> dict:
        """Create one rule, or renew the live one; returns it as ``get_rule`` does, with ``renewed`` (bool) and
        ``change_generation`` (the generation of this creation or renewal; the rule's own ``generation`` is the
        one that created it) added.

        Raises AdminClientError 400 naming the bad field, 409 when the same rule is live for at least as long,
        a protected or non-global network overlaps, or ``max_rules`` is reached.
        """
        _, answer = self.create_rule_answer(cidr, protocol, from_port, to_port, description, ttl, expires_at,
                                            source, allow_non_global)
        return {**answer["rule"], "renewed": answer.get("renewed", False),
                "change_generation": answer.get("generation")}

    def create_rule_answer(self, cidr: str, protocol: str = "all", from_port: int | None = None,
                           to_port: int | None = None, description: str | None = None, ttl: float | None = None,
                           expires_at: str | None = None, source: str | None = None,
                           allow_non_global: bool | None = None) -> tuple[int, dict]:
        """``create_rule``, answering (the HTTP status, the API's whole answer as sent): 201 and ``{"rule",
        "generation", "renewed": false, "notified"}`` when the rule was created; 200 when it was live and this
        request renewed it (``renewed`` true: a later expiry, or none) or only added its source (``renewed``
        false).  Raises as ``create_rule`` does."""
        body = {k: v for k, v in {"cidr": cidr, "protocol": protocol, "from_port": from_port, "to_port": to_port,
                                  "description": description, "ttl": None if ttl is None else math.ceil(ttl),
                                  "expires_at": expires_at, "source": source,
                                  "allow_non_global": allow_non_global}.items() if v is not None}
        response = self._send("POST", "/v1/provider-fw-rules", expect=(200, 201), json=body)
        return response.status_code, self._json(response, "/v1/provider-fw-rules")

    def get_rule(self, rule_id: int) -> dict:
        """One live rule: ``{"id", "cidr", "protocol", "from_port", "to_port", "description", "created_by",
        "created_at", "expires_at", "generation"}`` (timestamps ISO 8601 UTC with 'Z', or None).
        Raises AdminClientError 404 when unknown."""
        return self._request("GET", f"/v1/provider-fw-rules/{int(rule_id)}")["rule"]

    def delete_rule(self, rule_id: int, source: str | None = None) -> int | None:
        """Delete one rule (with ``source``: only that source's wish); returns the generation of the deletion
        (None from a server that does not say).  Raises AdminClientError 404 when unknown."""
        params = {"source": source} if source is not None else None
        response = self._send("DELETE", f"/v1/provider-fw-rules/{int(rule_id)}", expect=(204,), params=params)
        generation = response.headers.get("X-Provfw-Generation")
        return int(generation) if generation and generation.isdigit() else None

    def list_rules_page(self, cidr: str | None = None, protocol: str | None = None, limit: int | None = None,
                        marker: int | None = None, source: str | None = None, within: str | None = None) -> dict:
        """One page: ``{"rules": [rule, ...], "generation": int, "next_marker": int | None}``, ordered by id;
        ``within``: only rules whose network lies inside that network (itself included)."""
        params = {k: v for k, v in {"cidr": cidr, "protocol": protocol, "limit": limit, "marker": marker,
                                    "source": source, "within": within}.items() if v is not None}
        return self._request("GET", "/v1/provider-fw-rules", params=params)

    def rules_containing(self, address: str) -> dict:
        """Why is ``address`` (or a network) blocked: ``{"rules": [rule, ...], "generation": int}``, every live
        rule whose network contains it, most specific first, each with its ``sources``."""
        return self._request("GET", "/v1/provider-fw-rules", params={"contains": address})

    def sources(self) -> list[dict]:
        """``[{"source": str, "rules": int}, ...]``: every source and how many live rules it wants."""
        return self._request("GET", "/v1/provider-fw-sources")["sources"]

    def iter_rules(self, cidr: str | None = None, protocol: str | None = None, page_size: int = 1000,
                   source: str | None = None, within: str | None = None) -> Iterator[dict]:
        """Every live rule, following the pagination markers (``page_size`` rules a request)."""
        marker = None
        while True:
            page = self.list_rules_page(cidr, protocol, page_size, marker, source, within)
            yield from page["rules"]
            marker = page.get("next_marker")
            if marker is None:
                return

    def list_rules(self, cidr: str | None = None, protocol: str | None = None) -> list[dict]:
        """Every live rule as a list (see ``iter_rules``)."""
        return list(self.iter_rules(cidr, protocol))

    def import_rules(self, lines: Iterable[str] | str, protocol: str = "all", description: str | None = None,
                     ttl: float | None = None, *, expires_at: str | None = None, source: str | None = None,
                     mode: str | None = None, format: str | None = None, column: str | None = None,
                     dry_run: bool = False, force: bool = False, allow_non_global: bool | None = None) -> dict:
        """Bulk import a block list (any format of docs/feeds.md), one transaction and one cast.

        ``ttl`` is in seconds, rounded up to a whole second; ``expires_at`` (RFC 3339 with an offset) instead.
        ``source``: ``import:NAME`` (a bare NAME means that; default ``import:default``); ``mode``: ``add``
        or ``replace`` (the source's rules become exactly this list; refused with 409 past the replace guard
        unless ``force``); ``format`` / ``column``: override detection / name the CSV column; ``dry_run``:
        say what would change, change nothing.

        Returns ``{"added", "renewed", "duplicate", "removed", "deleted", "refused": int, "refused_lines":
        [{"line": int (1-based, counted in ``lines``), "value": str, "reason": str}, ...] (at most 1000),
        "generation": int, "source", "mode", "format": str, "dry_run": bool, "guard": dict | None,
        "preview": dict | None, "notified": bool | None, "non_global_allowed": int}``.
        Raises AdminClientError 400 for a bad option or an unreadable list, 413 for a body over ``[api]
        max_import_body_size``, 409 when ``max_rules`` would be exceeded or the guard refuses (nothing changed).
        """
        text = lines if isinstance(lines, str) else "\n".join(lines)
        # The options travel in the query string, where the API takes ttl as whole seconds ("86400", not "86400.0").
        seconds = None if ttl is None else math.ceil(ttl)
        flags = {"dry_run": dry_run or None, "force": force or None,
                 "allow_non_global": None if allow_non_global is None else allow_non_global}
        params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in {
            "protocol": protocol, "description": description, "ttl": seconds, "expires_at": expires_at,
            "source": source, "mode": mode, "format": format, "column": column, **flags}.items() if v is not None}
        return self._request("POST", "/v1/provider-fw-rules/import", expect=(200, 201), params=params,
                             data=text.encode(), headers={"Content-Type": "text/plain"})

    # ------------------------------------------------------------ feeds

    def list_feeds(self) -> list[dict]:
        """Every feed: ``[feed, ...]`` shaped as ``get_feed`` returns it."""
        return self._request("GET", "/v1/feeds")["feeds"]

    def get_feed(self, name: str) -> dict:
        """One feed: its settings (``name``, ``source``, ``url`` with any password hidden, ``format``,
        ``column``, ``interval``, ``protocol``, ``from_port``, ``to_port``, ``ttl``, ``enabled``,
        ``allow_non_global``, ``description``), its live ``rules`` count and its last sync (``last_sync``,
        ``last_success``, ``last_applied``, ``last_status``, ``last_error``, ``last_generation``, ``counts``,
        ``next_sync``, ``syncing``).  Raises AdminClientError 404 when unknown."""
        return self.get_feed_answer(name)["feed"]

    def get_feed_answer(self, name: str) -> dict:
        """``get_feed``'s whole answer, as the API sent it: ``{"feed": feed}``."""
        return self._request("GET", f"/v1/feeds/{_segment(name)}")

    def create_feed(self, name: str, url: str, interval: int, **settings: Any) -> dict:
        """Subscribe to a list (``settings``: format, column, protocol, from_port, to_port, ttl, enabled,
        allow_non_global, description); returns the feed.  Raises AdminClientError 400 naming the bad field,
        409 when the name is taken."""
        return self.create_feed_answer(name, url, interval, **settings)["feed"]

    def create_feed_answer(self, name: str, url: str, interval: int, **settings: Any) -> dict:
        """``create_feed``'s whole answer, as the API sent it: ``{"feed": feed}``."""
        body = {"name": name, "url": url, "interval": interval,
                **{k: v for k, v in settings.items() if v is not None}}
        return self._request("POST", "/v1/feeds", expect=(201,), json=body)

    def update_feed(self, name: str, **changes: Any) -> dict:
        """Change some settings (None values are left out); returns the feed."""
        return self.update_feed_answer(name, **changes)["feed"]

    def update_feed_answer(self, name: str, **changes: Any) -> dict:
        """``update_feed``'s whole answer, as the API sent it: ``{"feed": feed}``."""
        body = {k: v for k, v in changes.items() if v is not None}
        return self._request("PATCH", f"/v1/feeds/{_segment(name)}", json=body)

    def delete_feed(self, name: str) -> dict:
        """Delete the feed and release its rules: ``{"feed", "removed", "deleted", "generation", "notified"}``."""
        return self._request("DELETE", f"/v1/feeds/{_segment(name)}")

    def sync_feed(self, name: str, force: bool = False) -> dict:
        """Make the feed due now (``force``: past the replace guard once); returns the feed.  The conductor
        syncs it at its next poll; follow ``last_sync``.  Raises AdminClientError 409 when it is disabled."""
        return self.sync_feed_answer(name, force)["feed"]

    def sync_feed_answer(self, name: str, force: bool = False) -> dict:
        """``sync_feed``'s whole answer, as the API sent it: ``{"feed": feed}``."""
        params = {"force": "true"} if force else None
        return self._request("POST", f"/v1/feeds/{_segment(name)}/sync", expect=(202,), params=params)

    # ------------------------------------------------------------ operations

    def services(self) -> dict:
        """``{"services": [{"host", "binary", "state" ("up" | "down"), "heartbeat_at", "applied_generation",
        "in_sync" (bool), "applied_at", "rule_count", "driver", "last_error"}, ...], "generation": int}``."""
        return self._request("GET", "/v1/services")

    def generation(self) -> int:
        """The current rule generation."""
        return self._request("GET", "/v1/provider-fw-rules", params={"limit": 1})["generation"]

    def audit_log(self, limit: int = 100) -> list[dict]:
        """The newest ``limit`` audit records, newest first: ``[{"id", "at", "actor", "request_id", "action",
        "generation", "detail" (dict or None)}, ...]``.  Raises AdminClientError 403 for a reader token."""
        return self._request("GET", "/v1/audit-log", params={"limit": limit})["audit"]

    def health(self) -> dict:
        """``{"status": "ok", "generation": int}``; needs no token."""
        return self._request("GET", "/healthz")


def _segment(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def dumps(value: Any) -> str:
    """``value`` as indented JSON with sorted keys (what ``provfw -o json`` prints)."""
    return json.dumps(value, indent=2, sort_keys=True)
