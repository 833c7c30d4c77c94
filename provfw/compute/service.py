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

``ready`` is set once the first full apply succeeded (provfw-compute then
tells systemd READY=1); ``started`` also when the worker gave up on it (a
driver without a provider firewall) and serves anyway.  With a ``watchdog``
(``provfw.systemd.Watchdog``), the cast consumer, the cast applier and the
periodic check beat it every round, so a worker stuck in any of them stops
answering systemd's watchdog and is restarted.

Casts are received by the consumer thread and applied by the applier thread:
whatever queued while one apply ran is applied as one composed change next
(``ComputeManager.dispatch_many``).

Thread-safety: ``start``/``stop`` from one thread; the loops they spawn only
call the (thread-safe) manager.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, metrics, rpc
from provfw import systemd
from provfw.compute import manager as compute_manager
from provfw.retrying import retrying

LOG = logging.getLogger(__name__)

EXPIRY_POLL = 0.2
APPLIER_POLL = 0.5       # seconds between the applier's looks at the stop flag (and watchdog beats)


class ComputeService:
    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF,
                 manager: compute_manager.ComputeManager | None = None,
                 watchdog: systemd.Watchdog | None = None):
        self.conf = conf
        self.manager = manager or compute_manager.ComputeManager(conf)
        # The consumer only queues casts; one applier thread applies whatever queued meanwhile (apply_casts).
        self.consumer = rpc.FanoutConsumer(self._queue_cast, self.manager.host, conf)
        self._casts: collections.deque[tuple[str, dict]] = collections.deque()
        self._cast_queued = threading.Event()
        self._report_wanted = threading.Event()
        self.consumer.on_connect = self._on_bus_connect
        self.watchdog = watchdog
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = threading.Event()
        self.ready = threading.Event()
        reconciler = self.manager.reconciler
        metrics.bind_worker(
            rules_applied=lambda: reconciler.rule_count,
            applied_generation=lambda: -1 if reconciler.generation is None else reconciler.generation,
            quarantined=lambda: len(reconciler.quarantine()),
            bus_connected=lambda: 1 if self.consumer.connected.is_set() else 0)

    def _on_bus_connect(self) -> None:
        # Casts sent while we were not listening are gone; the generation check finds them.  It must
        # not be answered from the conductor's cached generation: a cast lost between the initial
        # snapshot and this moment is younger than the cache's TTL (found by the e2e test that restarts
        # a worker and unblocks at once: the unblock waited for the next periodic check).
        if self.started.is_set():
            self.manager.periodic_check(fresh=True)

    def start(self) -> None:
        self._spawn(self._initial_sync_then_serve, "provfw-main")

    def _initial_sync_then_serve(self) -> None:
        self.manager.report_state()
        synced = False
        try:
            retrying("initial sync", exception.ProvfwError, initial=1.0,
                     maximum=float(self.conf.compute.reconcile_interval), stop_event=self._stop, log=LOG)(
                self._initial_sync)
            synced = True
        except NotImplementedError as exc:
            LOG.error("serving without an initial apply: %s", exc)
        except exception.ProvfwError:
            pass                                   # stopped while retrying
        if self._stop.is_set():
            return
        self.started.set()
        if synced:
            self.ready.set()
        if self.watchdog is not None:
            hung = float(self.conf.hung_loop_timeout)
            # The consumer sleeps up to 30 s between reconnects while the bus is away: not hung.
            self.watchdog.register("cast consumer", hung + 30.0)
            self.watchdog.register("periodic check", hung + self.conf.compute.reconcile_interval)
            self.watchdog.register("cast applier", hung + APPLIER_POLL)
            self.consumer.on_tick = lambda: self.watchdog.beat("cast consumer")
        self.manager.report_via(self._report_wanted.set)
        self._spawn(self._report_state_soon, "provfw-reporter")
        self._spawn(self._apply_casts, "provfw-applier")
        self._spawn(self.consumer.run, "provfw-consumer")
        self._spawn(self._every(self.conf.compute.heartbeat_interval, self.manager.report_state), "provfw-heartbeat")
        self._spawn(self._every(self.conf.compute.reconcile_interval, self.manager.periodic_check,
                                beat="periodic check"), "provfw-periodic")
        self._spawn(self._expiry_loop, "provfw-expiry")

    def _queue_cast(self, method: str, args: dict) -> None:
        self._casts.append((method, args))
        self._cast_queued.set()
        time.sleep(0)    # under eventlet: let the applier run now, not after the hub's next poll

    def _apply_casts(self) -> None:
        """Apply the casts queued since the last apply, together (``ComputeManager.dispatch_many``).

        While a slow apply runs (a linear chain rebuilt under sustained
        writes), the consumer keeps receiving; the next round takes every
        cast queued meanwhile and applies their composed change once, so the
        worker catches up instead of trailing by one rebuild per cast.
        """
        while not self._stop.is_set():
            if self.watchdog is not None:
                self.watchdog.beat("cast applier")
            if not self._cast_queued.wait(APPLIER_POLL):
                continue
            self._cast_queued.clear()
            batch = []
            while self._casts:
                batch.append(self._casts.popleft())
            if not batch or self._stop.is_set():
                continue
            try:
                self.manager.dispatch_many(batch)
            except Exception:  # noqa: BLE001 - the applier must never die; the periodic check converges
                LOG.exception("applying %d casts failed", len(batch))

    def _report_state_soon(self) -> None:
        """Send the state reports that applies and errors ask for: the first at once, then at most one per
        ``[compute] report_min_interval``, carrying the state as it is when it leaves.

        A burst of casts (a script blocking addresses one by one, a feed's
        churn) is then a handful of reports, not one per cast from every host
        of the fleet, each a publish with a confirm on the worker and a row
        written by the conductor; the applier no longer waits for the
        broker's confirm before its next apply.  Felix rate-limits its status
        reports the same way (``EndpointReportingDelaySecs``).  The heartbeat
        still reports on its own schedule.
        """
        interval = float(self.conf.compute.report_min_interval)
        while not self._stop.is_set():
            if not self._report_wanted.wait(APPLIER_POLL):
                continue
            self._report_wanted.clear()
            self.manager.report_state()
            self._stop.wait(interval)

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

    def _every(self, interval: float, func, beat: str | None = None):
        def loop():
            while not self._stop.wait(interval):
                try:
                    func()
                except Exception:  # noqa: BLE001 - a periodic task must never die
                    LOG.exception("periodic task %s failed", getattr(func, "__name__", func))
                if beat is not None and self.watchdog is not None:
                    self.watchdog.beat(beat)
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
        # Before the joins: a loop waiting on a conductor that is down gives up within a second instead
        # of after every retry (28 s with the defaults: found stopping an all-in-one whose bus had gone).
        self.manager.conductor.close()
        for thread in self._threads:
            thread.join(timeout)
        self.manager.driver.close()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass
