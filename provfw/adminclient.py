"""AdminClient: the library dashboards and the ``provfw`` CLI use to talk to provfw-api.

    client = AdminClient("http://127.0.0.1:8774", token)
    client.block_ips("203.0.113.0/24")          # the seed's call
    client.list_rules(cidr="203.0.113.0/24")
    client.unblock_ips("203.0.113.0/24")

Errors from the server raise ``AdminClientError`` carrying the HTTP status
and the server's message.  Thread-safety: one ``requests.Session`` per
client; share a client between threads only if you accept requests' rules.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import requests


class AdminClientError(Exception):
    def __init__(self, status: int, message: str, body: Any = None):
        self.status = status
        self.message = message
        self.body = body
        super().__init__(f"HTTP {status}: {message}")


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers.update({"X-Auth-Token": token, "Accept": "application/json"})

    # ------------------------------------------------------------ transport

    def _request(self, method: str, path: str, expect: Iterable[int] = (200,), **kwargs) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, self.url + path, **kwargs)
        if response.status_code not in tuple(expect):
            try:
                body = response.json()
                message = body.get("error", {}).get("message") or body.get("message") or response.text
            except ValueError:
                body, message = None, response.text
            raise AdminClientError(response.status_code, message, body)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # ------------------------------------------------------------ the seed's calls

    def block_ips(self, cidr: str, description: str | None = None, ttl: float | None = None) -> dict:
        """Block all TCP, UDP and ICMP from ``cidr`` (creates the missing rules of the three)."""
        body: dict[str, Any] = {"cidr": cidr}
        if description is not None:
            body["description"] = description
        if ttl is not None:
            body["ttl"] = ttl
        return self._request("POST", "/v1/block-external-addresses", json=body)

    def unblock_ips(self, cidr: str) -> dict:
        """Delete every rule for ``cidr``."""
        return self._request("POST", "/v1/remove-external-address-block", json={"cidr": cidr})

    def list_blocks(self) -> list[dict]:
        return self._request("GET", "/v1/external-address-blocks")["blocks"]

    # ------------------------------------------------------------ rules

    def create_rule(self, cidr: str, protocol: str = "all", from_port: int | None = None,
                    to_port: int | None = None, description: str | None = None, ttl: float | None = None,
                    expires_at: str | None = None) -> dict:
        body = {k: v for k, v in {"cidr": cidr, "protocol": protocol, "from_port": from_port, "to_port": to_port,
                                  "description": description, "ttl": ttl, "expires_at": expires_at}.items()
                if v is not None}
        return self._request("POST", "/v1/provider-fw-rules", expect=(201,), json=body)["rule"]

    def get_rule(self, rule_id: int) -> dict:
        return self._request("GET", f"/v1/provider-fw-rules/{int(rule_id)}")["rule"]

    def delete_rule(self, rule_id: int) -> None:
        self._request("DELETE", f"/v1/provider-fw-rules/{int(rule_id)}", expect=(204,))

    def list_rules_page(self, cidr: str | None = None, protocol: str | None = None, limit: int | None = None,
                        marker: int | None = None) -> dict:
        params = {k: v for k, v in {"cidr": cidr, "protocol": protocol, "limit": limit, "marker": marker}.items()
                  if v is not None}
        return self._request("GET", "/v1/provider-fw-rules", params=params)

    def iter_rules(self, cidr: str | None = None, protocol: str | None = None, page_size: int = 1000) -> Iterator[dict]:
        """Every live rule, following the pagination markers."""
        marker = None
        while True:
            page = self.list_rules_page(cidr, protocol, page_size, marker)
            yield from page["rules"]
            marker = page.get("next_marker")
            if marker is None:
                return

    def list_rules(self, cidr: str | None = None, protocol: str | None = None) -> list[dict]:
        return list(self.iter_rules(cidr, protocol))

    def import_rules(self, lines: Iterable[str] | str, protocol: str = "all", description: str | None = None,
                     ttl: float | None = None) -> dict:
        """Bulk import: one CIDR or address per line ('#' comments allowed)."""
        text = lines if isinstance(lines, str) else "\n".join(lines)
        if isinstance(ttl, float) and ttl.is_integer():
            ttl = int(ttl)      # a query-string integer is digits: "3600", not "3600.0"
        params = {k: v for k, v in {"protocol": protocol, "description": description, "ttl": ttl}.items()
                  if v is not None}
        return self._request("POST", "/v1/provider-fw-rules/import", expect=(200, 201), params=params,
                             data=text.encode(), headers={"Content-Type": "text/plain"})

    # ------------------------------------------------------------ operations

    def services(self) -> dict:
        return self._request("GET", "/v1/services")

    def generation(self) -> int:
        return self._request("GET", "/v1/provider-fw-rules", params={"limit": 1})["generation"]

    def audit_log(self, limit: int = 100) -> list[dict]:
        return self._request("GET", "/v1/audit-log", params={"limit": limit})["audit"]

    def health(self) -> dict:
        return self._request("GET", "/healthz")


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)
