"""How fast this machine runs Python right now, printed beside a benchmark's figures.

The shared development VM's speed varies by half within an hour (noisy neighbours: on 2026-11-30 the same
10-million-step loop took 1.05 s in one quarter of an hour and 1.55-1.75 s in another, and every benchmark figure
moved with it), so a run that prints its own probe can be compared with a run made at another time.
"""

from __future__ import annotations

import time

def python_loop_seconds(steps: int = 10_000_000) -> float:
    """Seconds for ``steps`` additions in a plain Python loop (best of two)."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        total = 0
        for i in range(steps):
            total += i
        best = min(best, time.perf_counter() - started)
    return best


def describe() -> str:
    return (f"machine probe: a 10M-step Python loop in a function took {python_loop_seconds():.2f} s "
            "(benchmarks/machine.py; lower is a faster moment)")
