"""A TCP server that accepts connections and never sends a byte: what a hung database server looks like to a
client whose kernel still completes the handshake (a stuck process, a half-open path through a firewall)."""

from __future__ import annotations

import socket
import threading


class Silent:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte (a hung server); closes them at ``close()``."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes the accept(); a close alone would not (Linux)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
