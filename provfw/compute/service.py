"""The compute worker's main loop: start-up sync, cast consumer, periodic check, heartbeat and expiry timer.

Written against plain ``threading``; ``provfw-compute`` monkey-patches with
eventlet in its entry point so these threads are greenthreads there, while
tests can run the same code with real threads.

Order at start: the first report (so the host shows up), then the first
full apply from the conductor, and only then the cast consumer, so a worker
never serves casts on top of an unknown kernel state.  If the conductor is
unreachable at start, the worker keeps whatever the kernel holds (it never
flushes) and retries with backoff; a driver that does not implement the
provider firewall (NotImplementedError) is not retried - it is reported and
the worker keeps heartbeating.

Thread-safety: ``start``/``stop`` from one thread; the loops they spawn only
call the (thread-safe) manager.
"""

from __future__ import annotations

import logging
import threading
import time

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, rpc
from provfw.compute import manager as compute_manager
from provfw.retrying import retrying

LOG = logging.getLogger(__name__)

EXPIRY_POLL = 0.2


class ComputeService:
    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF,
                 manager: compute_manager.ComputeManager | None = None):
        self.conf = conf
        self.manager = manager or compute_manager.ComputeManager(conf)
        self.consumer = rpc.FanoutConsumer(self.manager.dispatch, self.manager.host, conf)
        self.consumer.on_connect = self._on_bus_connect
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = threading.Event()

    def _on_bus_connect(self) -> None:
        # Casts sent while we were not listening are gone; the generation check finds them.
        if self.started.is_set():
            self.manager.periodic_check()

    def start(self) -> None:
        self._spawn(self._initial_sync_then_serve, "provfw-main")

    def _initial_sync_then_serve(self) -> None:
        self.manager.report_state()
        try:
            retrying("initial sync", exception.ProvfwError, initial=1.0, maximum=float(self.conf.compute.reconcile_interval),
                     stop_event=self._stop, log=LOG)(self._initial_sync)
        except NotImplementedError as exc:
            LOG.error("serving without an initial apply: %s", exc)
        except exception.ProvfwError:
            pass                                   # stopped while retrying
        if self._stop.is_set():
            return
        self.started.set()
        self._spawn(self.consumer.run, "provfw-consumer")
        self._spawn(self._every(self.conf.compute.heartbeat_interval, self.manager.report_state), "provfw-heartbeat")
        self._spawn(self._every(self.conf.compute.reconcile_interval, self.manager.periodic_check),
                    "provfw-periodic")
        self._spawn(self._expiry_loop, "provfw-expiry")

    def _initial_sync(self) -> None:
        try:
            self.manager.init_host()
        except exception.ProvfwError:
            if self.manager.not_implemented:
                # Retrying cannot help: keep heartbeating and reporting it.
                raise NotImplementedError(self.manager.last_error) from None
            raise

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _every(self, interval: float, func):
        def loop():
            while not self._stop.wait(interval):
                try:
                    func()
                except Exception:  # noqa: BLE001 - a periodic task must never die
                    LOG.exception("periodic task %s failed", getattr(func, "__name__", func))
        return loop

    def _expiry_loop(self) -> None:
        # Polls the reconciler's earliest expiry (a heap: O(1)) often enough to stop
        # enforcing a rule within a fraction of a second of its expiry, with no conductor.
        while not self._stop.wait(EXPIRY_POLL):
            expiry = self.manager.next_expiry()
            if expiry is not None and expiry <= time.time():
                self.manager.expire_rules()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.consumer.stop()
        for thread in self._threads:
            thread.join(timeout)
        self.manager.conductor.close()
        self.manager.driver.close()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass
