"""psycopg2's wait callback for the eventlet daemons (provfw-api, provfw-conductor, the all-in-one), with limits.

Under eventlet psycopg2 runs asynchronously and calls a wait callback whenever it would block.  eventlet's own
(``eventlet.support.psycopg2_patcher``) waits without end, and libpq applies ``connect_timeout`` only to a
blocking connect: a database server that accepts the TCP connection and never answers (a hung host, a
half-open path through a firewall) held a daemon's start - with SIGTERM unanswered, the signal flag being read
only between attempts - and every request, with no log line, for ever.  This callback gives each wait a
deadline: ``CONNECT_TIMEOUT`` while connecting (``connect_timeout`` of ``provfw.db.sqlalchemy.api.
create_engine``), ``ANSWER_TIMEOUT`` for a statement (its server-side ``statement_timeout`` of 60 s, plus 10 s:
past that the server is not working on it).  At the deadline it raises ``psycopg2.OperationalError``; psycopg2
then closes the connection, so SQLAlchemy counts it as a disconnect and the db layer raises
DatabaseUnavailable (503 from the API; another attempt while a daemon waits for its database).

No eventlet monkey-patching here: tests install ``make_wait()`` in a plain process.
"""

from __future__ import annotations

import time
from typing import Callable

CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 70.0


class _NoAnswer(Exception):
    """The hub woke the waiting greenthread at its deadline."""


def make_wait(connect_timeout: float = CONNECT_TIMEOUT, answer_timeout: float = ANSWER_TIMEOUT) -> Callable:
    """A wait callback for ``psycopg2.extensions.set_wait_callback``: poll ``conn``, yielding to the eventlet hub
    until its socket is ready, for at most ``connect_timeout`` seconds while connecting and ``answer_timeout``
    for anything else."""
    import warnings

    import psycopg2
    from psycopg2 import extensions

    with warnings.catch_warnings():            # as provfw.cmd.eventlet_patch: the brief names eventlet
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        from eventlet.hubs import trampoline

    def wait(conn, timeout=None) -> None:
        limit = connect_timeout if conn.status == extensions.STATUS_SETUP else answer_timeout
        deadline = time.monotonic() + limit
        while True:
            state = conn.poll()
            if state == extensions.POLL_OK:
                return
            try:
                trampoline(conn.fileno(), read=state == extensions.POLL_READ, write=state == extensions.POLL_WRITE,
                           timeout=max(0.0, deadline - time.monotonic()), timeout_exc=_NoAnswer)
            except _NoAnswer:
                raise psycopg2.OperationalError(f"no answer from the database server in {limit:g} s") from None

    return wait


def install() -> None:
    """Make psycopg2 cooperative with these limits, when it is installed (API and conductor processes only)."""
    try:
        from psycopg2 import extensions
    except ImportError:
        return
    extensions.set_wait_callback(make_wait())
