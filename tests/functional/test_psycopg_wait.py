"""``provfw.cmd.psycopg_wait``: the eventlet daemons' psycopg2 wait callback gives up on a server that does not
answer, within its limits, against a real PostgreSQL and a listener that accepts and never speaks."""

from __future__ import annotations

import time

import pytest

from provfw.cmd import psycopg_wait
from tests.lib import services
from tests.lib.silent import Silent

pytestmark = pytest.mark.functional

psycopg2 = pytest.importorskip("psycopg2")


@pytest.fixture
def limited():
    from psycopg2 import extensions

    extensions.set_wait_callback(psycopg_wait.make_wait(connect_timeout=1.0, answer_timeout=2.0))
    yield
    extensions.set_wait_callback(None)


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
    services.require(services.port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
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
