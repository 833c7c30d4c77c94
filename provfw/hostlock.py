"""The per-host apply lock: "one writer per dataplane" across processes.

Two provfw-compute processes (or a worker and ``provfw-manage``) configured
for the same dataplane must never interleave applies.  ``flock`` is taken
non-blocking in a polling loop so that under eventlet only the waiting
greenthread sleeps, not the whole process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from provfw import exception


@contextlib.contextmanager
def external_lock(directory: str, name: str, timeout: float = 120.0):
    path = os.path.join(directory, f"provfw-{name}.lock")
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise exception.DriverError(f"could not take the apply lock {path} in {timeout}s") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
