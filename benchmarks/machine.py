"""How fast this machine runs Python right now, printed beside a benchmark's figures.

The shared development VM's speed varies by half within an hour (noisy neighbours: on 2026-11-30 the same
10-million-step loop took 1.05 s in one quarter of an hour and 1.55-1.75 s in another, and every benchmark figure
moved with it), so a run that prints its own probe can be compared with a run made at another time.

The loop alone is not enough: on 2026-12-01 it read fast (0.39-0.57 s) while everything that waits on
another process was slow - PostgreSQL's ``SELECT 1`` took 169 us a round trip and the end-to-end figures were
1.5-2x those of a fast moment.  So the probe also times round trips to the local PostgreSQL (when it answers).
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


def pg_round_trip_us(count: int = 2000) -> float | None:
    """Median microseconds of ``SELECT 1`` on the local PostgreSQL (psycopg2, one connection), or None."""
    try:
        import psycopg2
        import sqlalchemy as sa

        from tests.lib.services import PG_ADMIN_URL       # the server the benchmarks use ($PROVFW_TEST_PG)
        url = sa.engine.make_url(PG_ADMIN_URL)
        connection = psycopg2.connect(connect_timeout=2,
                                      **url.translate_connect_args(username="user", database="dbname"))
    except Exception:  # noqa: BLE001 - no PostgreSQL, no driver: the probe says so
        return None
    try:
        cursor = connection.cursor()
        times = []
        for _ in range(count):
            started = time.perf_counter()
            cursor.execute("SELECT 1")
            cursor.fetchall()
            times.append(time.perf_counter() - started)
        times.sort()
        return 1e6 * times[len(times) // 2]
    finally:
        connection.close()


def describe() -> str:
    round_trip = pg_round_trip_us()
    database = f", PostgreSQL SELECT 1 {round_trip:.0f} us" if round_trip is not None else ""
    return (f"machine probe: a 10M-step Python loop in a function took {python_loop_seconds():.2f} s{database} "
            "(benchmarks/machine.py; lower is a faster moment)")
