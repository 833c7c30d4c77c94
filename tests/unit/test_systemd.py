"""provfw.systemd against a real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from provfw import systemd


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound unix datagram socket; NOTIFY_SOCKET names it (a path)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_reaches_the_notify_socket_as_one_datagram(notify_socket):
    assert systemd.notify("READY=1", "STATUS=serving")
    assert received(notify_socket) == ["READY=1", "STATUS=serving"]


def test_an_abstract_socket_name_with_at_is_reached(monkeypatch):
    name = f"provfw-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert received(sock) == ["WATCHDOG=1"]
    finally:
        sock.close()


def test_outside_systemd_notify_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_a_vanished_socket_is_logged_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_seconds() == 4.0
    assert systemd.Watchdog().interval == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_seconds() is None and not systemd.Watchdog().enabled
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_seconds() == 4.0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_silent_loop_withholds_the_ping_and_a_beat_resumes_it(notify_socket):
    clock = Clock()
    watchdog = systemd.Watchdog(interval=1.0, clock=clock)
    watchdog.register("periodic check", max_silence=30)
    watchdog.register("cast consumer", max_silence=60)
    clock.now += 20
    assert watchdog.check_and_ping()
    assert received(notify_socket) == ["WATCHDOG=1"]

    clock.now += 20                       # periodic check silent for 40 s > 30 s
    watchdog.beat("cast consumer")
    assert not watchdog.check_and_ping()
    status = received(notify_socket)       # the reason is published once, and no WATCHDOG=1
    assert status[0].startswith("STATUS=hung: periodic check silent for 40s")
    assert not watchdog.check_and_ping()
    notify_socket.settimeout(0.2)
    with pytest.raises(socket.timeout):
        notify_socket.recv(4096)

    watchdog.beat("periodic check")
    assert watchdog.check_and_ping()
    notify_socket.settimeout(2)
    assert received(notify_socket) == ["WATCHDOG=1"]


def test_the_pinger_thread_pings_every_half_interval(notify_socket):
    watchdog = systemd.Watchdog(interval=0.05)
    watchdog.register("loop", max_silence=60)
    watchdog.start()
    try:
        assert [received(notify_socket) for _ in range(3)] == [["WATCHDOG=1"]] * 3
    finally:
        watchdog.stop()
