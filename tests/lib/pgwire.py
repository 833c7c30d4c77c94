"""What a PostgreSQL client sends, read off the wire: the simple queries, one per round trip.

``QueryLog.feed`` takes the client's bytes (``TcpProxy(on_client_data=...)``)
and parses the frontend protocol (PostgreSQL documentation, "Frontend/Backend
Protocol", "Message Formats"): untyped messages until the StartupMessage
(an SSLRequest or GSSENCRequest comes before it), then typed messages, a type
byte and an int32 length that counts itself.  psycopg2 sends every statement,
its own ``BEGIN``, ``COMMIT`` and ``ROLLBACK`` included, as one ``Query`` ('Q')
message and waits for the answer, so ``queries`` is the connection's round
trips.  One connection at a time: the parser keeps one stream's state.
"""

from __future__ import annotations

import struct
import threading

PROTOCOL_3_0 = 196608        # StartupMessage's protocol version field (3.0)


class QueryLog:
    def __init__(self):
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._started = False
        self.queries: list[str] = []

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._buffer += data
            while self._next():
                pass

    def take(self) -> list[str]:
        """The queries seen since the last ``take``."""
        with self._lock:
            queries, self.queries = self.queries, []
            return queries

    def _next(self) -> bool:
        buffer = self._buffer
        if not self._started:
            if len(buffer) < 8:
                return False
            (length,) = struct.unpack_from("!i", buffer, 0)
            if len(buffer) < length:
                return False
            (code,) = struct.unpack_from("!i", buffer, 4)
            self._started = code == PROTOCOL_3_0
            del buffer[:length]
            return True
        if len(buffer) < 5:
            return False
        kind = buffer[0:1]
        (length,) = struct.unpack_from("!i", buffer, 1)
        if len(buffer) < 1 + length:
            return False
        if kind == b"Q":
            self.queries.append(bytes(buffer[5:1 + length]).rstrip(b"\0").decode())
        del buffer[:1 + length]
        return True
