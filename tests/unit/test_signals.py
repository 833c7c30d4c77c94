"""The daemons' signal handlers take no lock; their loops see the signal and log it once.

Why: a handler that logs (or sets a ``threading.Event``) can wait, under eventlet, for a green lock
that the greenthread it interrupted was half-way through releasing - provfw-api then hung after
SIGTERM under load in CI (``tests/functional/test_api_stop.py``).  A lock held by another thread
stands in here for that half-released lock: the handler must return regardless.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from provfw.cmd import common


@pytest.fixture
def restore_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _hold_every_logging_lock(held: threading.Event, release: threading.Event) -> None:
    handlers = [h for ref in list(logging._handlerList) if (h := ref()) is not None]   # noqa: SLF001
    for handler in handlers:
        handler.acquire()
    try:
        held.set()
        release.wait(10)
    finally:
        for handler in handlers:
            handler.release()


def test_the_handler_returns_while_another_thread_holds_the_logging_locks(caplog):
    caplog.set_level(logging.INFO)                      # at least one handler (caplog's) whose lock is held
    stop = common.StopRequest(logging.getLogger("provfw.test"), "stopping")
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_every_logging_lock, args=(held, release), daemon=True)
    holder.start()
    assert held.wait(5)
    try:
        handler = threading.Thread(target=stop._handle, args=(signal.SIGTERM, None), daemon=True)  # noqa: SLF001
        handler.start()
        handler.join(2)
        assert not handler.is_alive(), "the signal handler waited for a lock another thread holds"
        assert stop.signum == signal.SIGTERM
    finally:
        release.set()
        holder.join(5)


def test_a_real_sigterm_is_seen_by_wait_and_logged_once(restore_handlers, caplog):
    caplog.set_level(logging.INFO, logger="provfw.test")
    stop = common.StopRequest(logging.getLogger("provfw.test"), "stopping; the kernel keeps the rules").install()
    assert not stop.is_set()
    assert stop.wait(0.05) is False
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.wait(2.0) is True
    assert stop.is_set() and stop.wait(0) is True
    lines = [r.getMessage() for r in caplog.records if r.name == "provfw.test"]
    assert lines == [f"signal {int(signal.SIGTERM)}: stopping; the kernel keeps the rules"]


def test_wait_returns_false_after_its_timeout_without_a_signal():
    flag = common.SignalFlag((signal.SIGUSR1,))
    started = time.monotonic()
    assert flag.wait(0.3) is False
    assert 0.29 <= time.monotonic() - started < 1.0


def test_take_consumes_the_signal_for_one_action(restore_handlers):
    flag = common.SignalFlag((signal.SIGUSR1,)).install()
    assert flag.take() is False
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.wait(2.0)
    assert flag.take() is True
    assert flag.take() is False and not flag.is_set()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.wait(2.0) and flag.take() is True


# The race CI hit, made deterministic: under eventlet's monkey patching, greenthread A logs; a trace
# function calls the installed SIGTERM handler - as CPython would between two bytecodes - at the line
# of threading's RLock.release where A has cleared the owner of the logging handler's lock but not yet
# released its semaphore.  A handler that logs waits there for A, forever.
_HALF_RELEASED_LOCK = r'''
import inspect, logging, signal, sys, threading
from provfw.cmd import eventlet_patch  # noqa: F401
import eventlet
from provfw.cmd import common

logging.basicConfig(level=logging.INFO, force=True, stream=sys.stdout)
log = logging.getLogger("race")
stop = common.StopRequest(log, "stopping").install()
lock = logging.getLogger().handlers[0].lock
assert type(lock) is threading._RLock, type(lock)           # a green lock under the monkey patching
source, first = inspect.getsourcelines(threading._RLock.release)
line = first + next(i for i, text in enumerate(source) if "self._block.release()" in text)
fired = []

def tracer(frame, event, arg):
    if frame.f_code is not threading._RLock.release.__code__ or frame.f_locals.get("self") is not lock:
        return None
    def on_line(frame, event, arg):
        if event == "line" and frame.f_lineno == line and not fired:
            fired.append(line)
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        return on_line
    return on_line

def greenthread_a():
    sys.settrace(tracer)
    log.info("A logs")
    sys.settrace(None)

a = eventlet.spawn(greenthread_a)
assert stop.wait(5), "the stop was not seen"
a.wait()
assert fired, "the trace never reached the half-released lock"
log.info("A finished; logging still works")
'''


def test_a_sigterm_landing_in_a_half_released_green_logging_lock_does_not_hang():
    import subprocess
    import sys
    try:
        done = subprocess.run([sys.executable, "-c", _HALF_RELEASED_LOCK], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung: the handler waited for the lock its greenthread half released\n{exc.stdout}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["INFO:race:A logs", "INFO:race:signal 15: stopping",
                                        "INFO:race:A finished; logging still works"]
