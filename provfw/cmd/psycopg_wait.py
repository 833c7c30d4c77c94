"""psycopg2's wait callback, with limits: for the eventlet daemons (provfw-api, provfw-conductor, the all-in-one)
and for the API under a threaded WSGI server (gunicorn's gthread or sync workers, uWSGI: ``provfw.api.wsgi_app``).

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

Without eventlet (``green=False``) psycopg2 would block in libpq, which waits for a statement's answer without
end (``connect_timeout`` bounds only the connect, and TCP keepalives are acknowledged by a hung server's
kernel): a gunicorn thread whose server went silent was lost for good.  The same callback then waits with
``select.poll``, which releases the GIL, so other threads run meanwhile (psycopg2's own ``extras.wait_select``
is this loop without a deadline).

No eventlet monkey-patching here: tests install ``make_wait()`` in a plain process.
"""

from __future__ import annotations

import select
import time
from typing import Callable

CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 70.0


class _NoAnswer(Exception):
    """The hub woke the waiting greenthread at its deadline."""


def make_wait(connect_timeout: float = CONNECT_TIMEOUT, answer_timeout: float = ANSWER_TIMEOUT,
              green: bool = True) -> Callable:
    """A wait callback for ``psycopg2.extensions.set_wait_callback``: poll ``conn`` until its socket is ready,
    for at most ``connect_timeout`` seconds while connecting and ``answer_timeout`` for anything else, then
    raise ``psycopg2.OperationalError``.  ``green``: yield to the eventlet hub while waiting; else block the
    calling thread in ``poll(2)`` (any number of threads may wait at once)."""
    import psycopg2
    from psycopg2 import extensions

    if green:
        import warnings

        with warnings.catch_warnings():            # as provfw.cmd.eventlet_patch: the brief names eventlet
            warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
            from eventlet.hubs import trampoline

        def ready(fd: int, state: int, seconds: float) -> bool:
            try:
                trampoline(fd, read=state == extensions.POLL_READ, write=state == extensions.POLL_WRITE,
                           timeout=seconds, timeout_exc=_NoAnswer)
            except _NoAnswer:
                return False
            return True
    else:
        def ready(fd: int, state: int, seconds: float) -> bool:
            poller = select.poll()
            poller.register(fd, select.POLLIN if state == extensions.POLL_READ else select.POLLOUT)
            return bool(poller.poll(seconds * 1000.0))   # an error or a hang-up is ready too: poll() then says

    def wait(conn, timeout=None) -> None:
        limit = connect_timeout if conn.status == extensions.STATUS_SETUP else answer_timeout
        deadline = time.monotonic() + limit
        while True:
            state = conn.poll()
            if state == extensions.POLL_OK:
                return
            if not ready(conn.fileno(), state, max(0.0, deadline - time.monotonic())):
                raise psycopg2.OperationalError(f"no answer from the database server in {limit:g} s")

    return wait


def install(green: bool = True) -> None:
    """Give psycopg2 these limits, when it is installed (API and conductor processes only); ``green``: as
    ``make_wait``."""
    try:
        from psycopg2 import extensions
    except ImportError:
        return
    extensions.set_wait_callback(make_wait(green=green))
