"""A TCP forwarder that tests can cut and restore: lose a broker or a
database connection without touching the shared server behind it.

Design
------
``TcpProxy(target_host, target_port)`` listens on 127.0.0.1:<free port> and
forwards every accepted connection to the target, byte for byte, half-closes
included.  ``cut()`` is a network failure as a client sees it: the listening
socket is closed, so new connections are refused (ECONNREFUSED), and every
current connection is reset on both sides (RST through SO_LINGER 0), so the
client and the server each see the connection die at once.  ``restore()``
listens again on the same port.  The server behind the proxy is never
stopped, which matters when RabbitMQ and PostgreSQL are shared with other
tests running at the same time.

One thread accepts; each connection has one thread that owns both of its
sockets (non-blocking, driven by ``select``) and a wake-up socket pair.
Because only that thread ever touches the sockets, an abort is a byte on the
wake-up pair: the thread resets and closes its own sockets, so no close races
a blocked ``recv`` in another thread (on Linux a close from another thread
neither wakes the ``recv`` nor sends the RST until that call returns).

Thread-safety: ``cut``, ``restore``, ``close`` and the counters may be called
from any thread; ``cut`` and ``close`` return only after every forwarding
thread has finished.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import threading
from typing import Callable

_CHUNK = 65536
# Stop reading from one side while this much is waiting for the other side:
# back-pressure instead of unbounded buffering.
_MAX_PENDING = 1 << 20


class _Waker:
    """A socket pair whose read end becomes readable when ``wake()`` is called."""

    def __init__(self):
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)

    def wake(self) -> None:
        try:
            self._writer.send(b"x")
        except OSError:
            pass  # already closed or already full: the reader is awake either way

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


def _reset_and_close(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer gets a RST, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Link:
    """One proxied connection: the accepted client socket and its upstream socket."""

    def __init__(self, proxy: "TcpProxy", client: socket.socket):
        self.proxy = proxy
        self.client = client
        self.waker = _Waker()
        self.aborted = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tcpproxy-link", daemon=True)

    def abort(self) -> None:
        self.aborted.set()
        self.waker.wake()

    def _run(self) -> None:
        upstream = None
        try:
            try:
                upstream = socket.create_connection(self.proxy.target, timeout=self.proxy.connect_timeout)
            except OSError:
                _reset_and_close(self.client)  # the client sees the target refuse, as it would directly
                return
            self._pump(self.client, upstream)
        finally:
            self.waker.close()
            self.proxy._forget(self)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peer = {client: upstream, upstream: client}
        pending = {client: bytearray(), upstream: bytearray()}  # bytes waiting to be written TO the key
        read_eof = {client: False, upstream: False}
        write_shut = {client: False, upstream: False}
        for sock in peer:
            sock.setblocking(False)
        try:
            while not self.aborted.is_set():
                readers = [s for s in peer if not read_eof[s] and len(pending[peer[s]]) < _MAX_PENDING]
                writers = [s for s in peer if pending[s]]
                if not readers and not writers:
                    break  # both directions finished cleanly
                readable, writable, _ = select.select(readers + [self.waker.reader], writers, [])
                if self.waker.reader in readable:
                    break
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    if data:
                        if sock is client and self.proxy.on_client_data is not None:
                            self.proxy.on_client_data(data)
                        pending[peer[sock]] += data
                    else:
                        read_eof[sock] = True
                for sock in writable:
                    sent = sock.send(pending[sock])
                    del pending[sock][:sent]
                # Pass a half-close on once everything before it has been delivered.
                for sock in peer:
                    if read_eof[peer[sock]] and not pending[sock] and not write_shut[sock]:
                        sock.shutdown(socket.SHUT_WR)
                        write_shut[sock] = True
        except OSError:
            self.aborted.set()  # one side failed: fail the other side the same way
        if self.aborted.is_set():
            _reset_and_close(client)
            _reset_and_close(upstream)
        else:
            client.close()
            upstream.close()


class TcpProxy:
    """Forward ``listen_host:<port>`` to ``target_host:target_port`` until cut.

    ``port`` 0 picks a free port; it stays the same across ``cut``/``restore``.
    ``on_client_data(bytes)`` sees what every client sends, as it is forwarded
    (called from the connection's thread).  Use as a context manager or call
    ``close()``.
    """

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1", port: int = 0,
                 connect_timeout: float = 5.0, on_client_data: Callable[[bytes], None] | None = None):
        self.target = (target_host, target_port)
        self.on_client_data = on_client_data
        self.listen_host = listen_host
        self.connect_timeout = connect_timeout
        self.accepted = 0  # connections accepted since creation, across restores
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._acceptor_waker: _Waker | None = None
        self.port = port
        self._listen()

    # ------------------------------------------------------------ public API

    @property
    def address(self) -> tuple[str, int]:
        return self.listen_host, self.port

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def cut(self) -> None:
        """Refuse new connections and reset every current one; return once they are all gone."""
        self._stop_listening()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.abort()
        for link in links:
            link.thread.join(10)

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.listen_host, self.port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor_waker = _Waker()
        self._acceptor = threading.Thread(target=self._accept_loop, args=(listener, self._acceptor_waker),
                                          name="tcpproxy-accept", daemon=True)
        self._acceptor.start()

    def _stop_listening(self) -> None:
        if self._listener is None:
            return
        assert self._acceptor is not None and self._acceptor_waker is not None
        self._acceptor_waker.wake()
        self._acceptor.join(10)
        self._acceptor_waker.close()
        # Closing the listening socket makes the kernel answer new SYNs with RST (connection refused);
        # connections still in its backlog are reset too.
        self._listener.close()
        self._listener = self._acceptor = self._acceptor_waker = None

    def _accept_loop(self, listener: socket.socket, waker: _Waker) -> None:
        while True:
            readable, _, _ = select.select([listener, waker.reader], [], [])
            if waker.reader in readable:
                return
            try:
                client, _ = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ECONNABORTED):
                    continue
                raise
            link = _Link(self, client)
            with self._lock:
                self._links.add(link)
                self.accepted += 1
            link.thread.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
