"""Pause Python's cyclic garbage collector around work that allocates per entry of a large list.

Why
    A block list of 120k entries allocates a few objects per entry at every
    step of its import (parsed networks, rule specs, the rows read back from
    the database, the planner's tuples), and none of them forms a reference
    cycle.  CPython's collector still counts them: every 700 allocations it
    scans the youngest generation, and each time the old generation has grown
    by a quarter it rescans the whole heap.  Measured on a churn replace-sync
    of the IPsum list (120,430 entries, docs/feeds.md), the collector was 40 %
    of the API's time: 2.5 s with it, 1.5 s without.  Mercurial's
    ``util.nogc`` pauses it for the same reason; reference counting still
    frees everything that is not in a cycle, and the pause ends with the work.

Thread-safety
    The collector is process-wide.  ``paused`` re-enables it only if it was
    enabled when the outermost pause began, so nested and overlapping pauses
    (two imports in two green threads) leave it as they found it, and code
    that disabled it on purpose finds it disabled afterwards; a pause is
    never longer than the work inside it (one import: seconds).

Kept objects
    ``kept`` is for work whose objects outlive it: a worker's decoded and
    applied snapshot of 120k rules.  Re-enabling the collector after a plain
    pause leaves ~500k objects in its youngest generation, and the next
    collections scan them all while the worker applies its next casts; left
    to the collector as it runs, they are scanned again at every full
    collection for as long as they live.  ``kept`` ends with ``gc.freeze()``
    instead, which moves every object the collector tracks to its permanent
    generation: no later collection scans them.  Measured in one process on
    a 120k-rule reply: decoding 0.5-0.7 s -> 0.2 s, and 200k later small
    allocations 0.31-0.43 s -> 0.12-0.17 s (docs/benchmarks.md).  Reference
    counting still frees those objects when the next snapshot replaces them
    (none of them forms a cycle).  A reference cycle that is already garbage
    when ``gc.freeze()`` runs would never be reclaimed (a caught exception and
    its traceback make one; kombu and eventlet make them between snapshots),
    so ``kept`` first runs one full collection, before the pause: it scans
    only what was made since the last freeze, the rest being frozen (in a
    worker's process, 34 ms before its first snapshot, 0.5 ms before each
    later one of 120k rules).  Only a cycle that becomes garbage during the
    pause itself, in another greenthread, can still be frozen.  ``gc.freeze``
    is the standard library's own tool for this (Python 3.7+).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator


def paused() -> contextlib.AbstractContextManager[None]:
    """Run the body with the cyclic garbage collector off; restore it (if it was on) afterwards."""
    return _pause(None)


def kept() -> contextlib.AbstractContextManager[None]:
    """``paused``, then the objects the body built are moved out of the collector's sight (``gc.freeze``).

    For work whose objects outlive it (see "Kept objects" above).  Nested in
    another pause it is a plain pause: the outermost decides.
    """
    return _pause(gc.freeze)


@contextlib.contextmanager
def _pause(at_end: Callable[[], None] | None) -> Iterator[None]:
    enabled = gc.isenabled()
    if enabled and at_end is not None:
        gc.collect()        # before a freeze: garbage cycles made since the last one must not be frozen for ever
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if at_end is not None:
                at_end()
            gc.enable()
