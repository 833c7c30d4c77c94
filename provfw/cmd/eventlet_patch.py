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


def green_database() -> None:
    """Make psycopg2 cooperative (its wait callback) when it is installed; API and conductor only."""
    try:
        from eventlet.support import psycopg2_patcher
        psycopg2_patcher.make_psycopg_green()
    except ImportError:
        pass
