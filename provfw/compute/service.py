"""The compute worker's main loop: start-up sync, cast consumer, periodic
check, heartbeat and expiry timer.

Written against plain ``threading``; ``provfw-compute`` monkey-patches with
eventlet in its entry point so these threads are greenthreads there, while
tests can run the same code with real threads.

Order at start: the first full apply happens before the consumer starts, so
a worker never serves casts on top of an unknown kernel state.  If the
database is unreachable at start, the worker keeps whatever the kernel holds
(it never flushes) and retries with backoff.
"""

from __future__ import annotations

import datetime
import logging
import threading

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.compute import manager as compute_manager
from provfw.compute import rpc

LOG = logging.getLogger(__name__)


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
        delay = 1.0
        self.manager.heartbeat()
        while not self._stop.is_set():
            if self.manager.init_host() is not None:
                break
            if self.manager.last_error and "not implemented" in self.manager.last_error:
                break  # retrying cannot help; keep heartbeating and report the error
            LOG.warning("initial apply failed; retrying in %.0fs", delay)
            self._stop.wait(delay)
            delay = min(delay * 2, self.conf.compute.reconcile_interval)
        self.started.set()
        self._spawn(self.consumer.run, "provfw-consumer")
        self._spawn(self._every(self.conf.compute.heartbeat_interval, self.manager.heartbeat), "provfw-heartbeat")
        self._spawn(self._every(self.conf.compute.reconcile_interval, self.manager.periodic_check),
                    "provfw-periodic")
        self._spawn(self._expiry_loop, "provfw-expiry")

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
        # Polls the driver's earliest expiry often enough to stop enforcing a
        # rule within a fraction of a second of its expiry, with no database.
        while not self._stop.wait(0.2):
            expiry = self.manager.next_expiry()
            if expiry is not None and expiry <= datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None):
                self.manager.expire_rules()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.consumer.stop()
        for thread in self._threads:
            thread.join(timeout)
        self.manager.driver.close()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass
