"""provfw's one retry primitive: tenacity, with one backoff policy.

Every loop that retries something that may come back - a cast to a broker
that restarted, a consumer reconnecting, a call to a conductor, a database
write that lost a deadlock - goes through ``retrying()``, so the backoff
(exponential from ``initial`` to ``maximum`` seconds, with jitter) and the
log line before each sleep look the same everywhere.

Thread-safety: ``retrying()`` returns a new ``tenacity.Retrying`` per call;
nothing is shared.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable, TypeVar

import tenacity

LOG = logging.getLogger(__name__)

T = TypeVar("T")


def retrying(what: str, retry_on: Iterable[type[BaseException]] | type[BaseException] = Exception,
             attempts: int | None = None, initial: float = 0.2, maximum: float = 30.0,
             stop_event: threading.Event | None = None, log: logging.Logger = LOG,
             level: int = logging.WARNING) -> tenacity.Retrying:
    """A ``tenacity.Retrying`` for ``what`` (used in the log line).

    * ``retry_on``: exception types worth another attempt; anything else propagates at once.
    * ``attempts``: total attempts (None: until ``stop_event`` is set, or forever).
    * Sleeps grow exponentially from ``initial`` to ``maximum`` seconds (jittered by up to ``initial``);
      with ``stop_event`` they end early when it is set, and no further attempt is made.
    * After the last attempt the last exception is re-raised unchanged (``reraise=True``).

    Use as ``for attempt in retrying(...): with attempt: ...`` or ``retrying(...)(func, *args)``.
    """
    types = tuple(retry_on) if not isinstance(retry_on, type) else (retry_on,)
    stops = []
    if attempts is not None:
        stops.append(tenacity.stop_after_attempt(attempts))
    if stop_event is not None:
        stops.append(tenacity.stop_when_event_set(stop_event))
    stop = tenacity.stop_any(*stops) if stops else tenacity.stop_never

    def before_sleep(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.log(level, "%s failed (%s: %s); attempt %d, retrying in %.1fs", what, type(error).__name__, error,
                state.attempt_number, state.next_action.sleep if state.next_action else 0.0)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(types),
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=initial, min=initial, max=maximum)
        + tenacity.wait_random(0, initial),
        sleep=stop_event.wait if stop_event is not None else tenacity.nap.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def call_retrying(what: str, func: Callable[[], T],
                  retry_on: Iterable[type[BaseException]] | type[BaseException] = Exception, **policy) -> T:
    """``func()`` under ``retrying(what, retry_on, **policy)``, its first attempt made outside tenacity.

    Nearly every call succeeds at once, and tenacity's per-call machinery (a
    ``Retrying``, its thread-local state, a dozen hook calls) cost about 50 us
    of CPU each under eventlet - twice per API mutation group (the transaction
    and the cast), 2 % of provfw-api's CPU in ``benchmarks/bench_api.py``.
    When the first attempt raises one of ``retry_on``, tenacity takes over
    with that failure as its attempt 1 (logged, counted against ``attempts``
    and waited after exactly as ``retrying()`` alone would) and calls
    ``func`` again from attempt 2.  Anything else propagates at once.
    """
    types = tuple(retry_on) if not isinstance(retry_on, type) else (retry_on,)
    try:
        return func()
    except types as first:
        failed = [first]

    def attempt() -> T:
        if failed:
            raise failed.pop()
        return func()

    return retrying(what, types, **policy)(attempt)
