"""``provfw.cmd.psycopg_wait``: psycopg2's wait callback, green (the eventlet daemons) and threaded (the API under
gunicorn), gives up on a server that does not answer, within its limits, against a real PostgreSQL and a
listener that accepts and never speaks; threaded, it lets other threads' statements run while one waits."""

from __future__ import annotations

import threading
import time

import pytest

from provfw.cmd import psycopg_wait
from tests.lib import services
from tests.lib.silent import Silent

pytestmark = pytest.mark.functional

psycopg2 = pytest.importorskip("psycopg2")


@pytest.fixture(params=["green", "threaded"])
def limited(request):
    from psycopg2 import extensions

    extensions.set_wait_callback(psycopg_wait.make_wait(connect_timeout=1.0, answer_timeout=2.0,
                                                        green=request.param == "green"))
    yield request.param
    extensions.set_wait_callback(None)


def postgres():
    services.require(services.port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    return psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")


def test_a_server_that_accepts_and_never_answers_fails_the_connect_at_its_limit(limited):
    silent = Silent()
    try:
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match=r"no answer from the database server in 1 s"):
            psycopg2.connect(host="127.0.0.1", port=silent.port, user="provfw", dbname="provfw", connect_timeout=5)
        assert 0.9 <= time.monotonic() - started < 3
    finally:
        silent.close()


def test_a_statement_without_an_answer_fails_at_its_limit_and_closes_the_connection(limited):
    conn = postgres()
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT 1")                                   # within the limit: answered
        assert cursor.fetchone() == (1,)
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match=r"no answer from the database server in 2 s"):
            cursor.execute("SELECT pg_sleep(30)")                    # what a server that stopped answering looks like
        assert 1.9 <= time.monotonic() - started < 4
        assert conn.closed                                           # so SQLAlchemy takes it for a disconnect
    finally:
        conn.close()


@pytest.mark.parametrize("limited", ["threaded"], indirect=True)
def test_threads_waiting_on_the_database_wait_at_once_and_a_silent_server_holds_up_no_other_thread(limited):
    """Four threads each wait 0.5 s for PostgreSQL while a fifth waits on a silent server: the four finish
    together (poll(2) releases the GIL; one after another would take 2 s) and the fifth fails at its limit."""
    connections = [postgres() for _ in range(4)]
    silent = Silent()
    took: dict = {}
    errors: list = []

    def sleep_on(conn) -> None:
        started = time.monotonic()
        cursor = conn.cursor()
        cursor.execute("SELECT pg_sleep(0.5)")
        took[id(conn)] = time.monotonic() - started

    def connect_to_silent() -> None:
        try:
            psycopg2.connect(host="127.0.0.1", port=silent.port, user="provfw", dbname="provfw", connect_timeout=5)
        except psycopg2.OperationalError as exc:
            errors.append(str(exc))

    try:
        threads = [threading.Thread(target=connect_to_silent)] + [
            threading.Thread(target=sleep_on, args=(conn,)) for conn in connections]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads[1:]:
            thread.join(10)
        assert len(took) == 4 and time.monotonic() - started < 1.5, took
        threads[0].join(10)
        assert errors == ["no answer from the database server in 1 s"]
    finally:
        silent.close()
        for conn in connections:
            conn.close()
