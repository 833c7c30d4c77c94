"""Keep-alive clients that block and unblock addresses while a test stops the API under them.

Each client sends its own ``X-Request-Id`` with every request, so a test can check, in the server's log, that
no request whose client saw the connection close without an answer was run (a committed block the client
cannot know about).  Used by ``tests/functional/test_api_stop.py`` (provfw-api) and
``tests/e2e/test_all_in_one_stop.py`` (provfw-all-in-one).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time


class Hammer:
    """``clients`` threads, each on one keep-alive connection, until the server goes away or ``stop()``."""

    def __init__(self, port: int, token: str, clients: int = 6, tag: str = "load"):
        self.port, self.token, self.tag = port, token, tag
        self.answers: list[int] = []            # HTTP statuses received
        self.failures: list[int] = []           # the 5xx among them
        self.unanswered: list[str] = []         # request ids whose connection closed without an answer
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> "Hammer":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` answers arrived; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.answers) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.answers) >= count

    def _client(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"X-Auth-Token": self.token, "Content-Type": "application/json"}
        address = f"198.51.100.{index + 1}"
        paths = ("/v1/block-external-addresses", "/v1/remove-external-address-block")
        n = 0
        while not self._stop.is_set():
            request_id = f"req-{self.tag}-{index}-{n}"
            try:
                conn.request("POST", paths[n % 2], json.dumps({"cidr": address}),
                             {**headers, "X-Request-Id": request_id})
                response = conn.getresponse()
                response.read()
            except http.client.RemoteDisconnected:
                self.unanswered.append(request_id)   # sent whole, closed before any answer: was it run?
                return
            except (OSError, http.client.HTTPException):
                return                               # refused or reset while sending: the server is gone
            if response.status >= 500:
                self.failures.append(response.status)
            self.answers.append(response.status)
            n += 1


def run_unanswered(log: str, unanswered: list[str]) -> list[str]:
    """The request ids among ``unanswered`` that the server's log shows it ran (any line carrying the id)."""
    return [request_id for request_id in unanswered if re.search(rf"\b{re.escape(request_id)}\b", log)]
