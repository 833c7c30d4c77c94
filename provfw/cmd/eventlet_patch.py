"""Import first in every daemon entry point: monkey-patch with eventlet.

The core (manager, drivers, rpc, db) is plain threading code; only the
daemons turn its threads into greenthreads, so tests and tools run the same
code with real threads.  Eventlet announces itself as deprecated; the brief
names it as the worker's concurrency model, and keeping it at this one
import means a move to threads or asyncio later touches only this file.
"""

import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402

eventlet.monkey_patch()
