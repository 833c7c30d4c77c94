"""Import first in every daemon entry point: monkey-patch with eventlet.

The core (manager, drivers, rpc, db) is plain threading code; only the
daemons turn its threads into greenthreads, so tests and tools run the same
code with real threads.  Eventlet announces itself as deprecated; the brief
names it as the worker's concurrency model, and keeping it at this one
import means a move to threads or asyncio later touches only this file.

psycopg2 is NOT patched here: eventlet would import it, and a compute worker
must not load a database driver at all.  Processes with database access make
it green in ``provfw.cmd.common.prepare(database=True)`` (``green_database``).
"""

import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402

eventlet.monkey_patch(psycopg=False)

import logging  # noqa: E402

# Every log record asks for its thread's name (LogRecord.threadName), which under eventlet is green
# threading's current_thread(): about a sixth of a record's CPU (36 -> 30 us per record with oslo.log's
# formatter, measured 2026-12-02), and provfw-api logs two records per mutation (the access and audit lines).
# provfw's formats name the process, never the thread (oslo.log's defaults); oslo.log's JSON lines carry
# "thread_name": null instead of a greenthread's name.  Python's own switch for this (logging.logThreads).
logging.logThreads = False


def green_database() -> None:
    """Make psycopg2 cooperative (its wait callback, with time limits: ``psycopg_wait``) when it is installed;
    API and conductor only."""
    from provfw.cmd import psycopg_wait
    psycopg_wait.install()
