"""The test TCP proxy on 127.0.0.1: forwards, resets on cut, refuses while cut, forwards again after restore."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.lib.tcpproxy import TcpProxy


class EchoServer:
    """Echoes every byte back; on EOF from the client, half-closes after echoing."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.resets = 0  # connections that ended with a reset instead of an EOF
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(thread)  # before start: join() must see every thread that has echoed
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except ConnectionResetError:
                self.resets += 1
            except OSError:
                pass  # the proxy was closed between our EOF and our half-close (fixture teardown)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(5)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo):
    with TcpProxy("127.0.0.1", echo.port) as proxy:
        yield proxy


def _connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=5)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_bytes_and_a_half_close_pass_through_unchanged(proxy):
    payload = bytes(range(256)) * 8192  # 2 MiB: more than the proxy buffers, so back-pressure is exercised
    with _connect(proxy) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = _recv_exactly(sock, len(payload) + 1)
        sender.join()
    assert echoed == payload, "echo differs or the server's EOF did not come through after the data"
    assert proxy.accepted == 1


def test_cut_resets_both_sides_and_refuses_new_connections(proxy, echo):
    sock = _connect(proxy)
    sock.sendall(b"ping")
    assert _recv_exactly(sock, 4) == b"ping"
    proxy.cut()
    assert proxy.active_connections == 0
    with pytest.raises(ConnectionResetError):
        sock.recv(1)  # a RST, not a clean EOF: the client must see a failure
    sock.close()
    echo.join()
    assert echo.resets == 1, "the server side was not reset"
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)


def test_restore_accepts_again_on_the_same_port(proxy):
    port = proxy.port
    proxy.cut()
    proxy.restore()
    assert proxy.port == port and not proxy.is_cut
    with _connect(proxy) as sock:
        sock.sendall(b"again")
        assert _recv_exactly(sock, 5) == b"again"


def test_a_target_that_refuses_is_seen_by_the_client_as_a_reset():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    with TcpProxy("127.0.0.1", dead_port, connect_timeout=1) as proxy:
        # On loopback the reset can even beat connect() back to the client; either way it is a reset.
        with pytest.raises(ConnectionResetError), _connect(proxy) as sock:
            sock.recv(1)


def test_close_leaves_no_forwarding_thread(echo):
    before = {t for t in threading.enumerate() if t.name.startswith("tcpproxy")}
    proxy = TcpProxy("127.0.0.1", echo.port)
    socks = [_connect(proxy) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"x")
        assert _recv_exactly(sock, 1) == b"x"
    proxy.close()
    left = {t for t in threading.enumerate() if t.name.startswith("tcpproxy")} - before
    assert not left
    for sock in socks:
        sock.close()
