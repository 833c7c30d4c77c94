"""provfw-conductor's loops: the request server, report flushing, expiry purge, feeds, its own heartbeat.

Plain ``threading`` (greenthreads under ``provfw-conductor``'s eventlet
patch; real threads in tests and in ``provfw-all-in-one``'s process).
Several conductors may run at once: they consume one shared request queue,
their caches are independent, a purge that finds nothing is harmless, and
each feed is synced by the one conductor whose claim on it won
(``provfw.conductor.feeds``).

While started, its ``ConductorCollector`` is registered on
``provfw.metrics.CONDUCTOR`` (read on scrape).  With a ``watchdog``
(``provfw.systemd.Watchdog``) the request server beats it every round, so a
conductor whose server loop hangs stops answering systemd's watchdog.

Thread-safety: ``start``/``stop`` from one thread; see ConductorManager for
what the loops share.
"""

from __future__ import annotations

import logging
import socket
import threading

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, metrics, rpc, systemd
from provfw.compute import api as compute_api_mod
from provfw.conductor import feeds as conductor_feeds
from provfw.conductor import manager as conductor_manager
from provfw.conductor import metrics as conductor_metrics
from provfw.db import api as db

LOG = logging.getLogger(__name__)

BINARY = "provfw-conductor"

# A report that must be written soon (a new generation, an error) rarely comes
# alone: every host applies the same change within milliseconds of the others.
# Waiting this long after the first one writes them together - a transaction or
# two per change for the whole fleet instead of one per host.
URGENT_GATHER = 0.05


class ConductorService:
    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF,
                 compute_api: compute_api_mod.ComputeAPI | None = None, host: str | None = None,
                 watchdog: systemd.Watchdog | None = None):
        self.conf = conf
        self.watchdog = watchdog
        self.host = host or socket.gethostname()
        self.compute_api = compute_api or compute_api_mod.ComputeAPI(conf)
        self.manager = conductor_manager.ConductorManager(conf, self.compute_api)
        self.feeds = conductor_feeds.FeedSyncer(conf, self.compute_api, host=self.host)
        self.server = rpc.RpcServer(self.manager.handle, conf,
                                    request_ttl=conf.conductor.call_timeout * (conf.conductor.call_retries + 1))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.collector = conductor_metrics.ConductorCollector(self.manager, conf.compute.service_down_time)

    @property
    def ready(self) -> threading.Event:
        """Set while the server consumes requests."""
        return self.server.connected

    def start(self) -> None:
        metrics.CONDUCTOR.register(self.collector)
        if self.watchdog is not None:
            # The server sleeps up to 30 s between reconnects while the bus is away: not hung.
            self.watchdog.register("conductor server", self.conf.hung_loop_timeout + 30.0)
            self.server.on_tick = lambda: self.watchdog.beat("conductor server")
        self._spawn(self.server.run, "conductor-server")
        self._spawn(self._flush_loop, "conductor-reports")
        self._spawn(self._every(self.conf.conductor.purge_interval, self.manager.purge_expired), "conductor-purge")
        self._spawn(self._every(self.conf.feeds.poll_interval, self._sync_feeds), "conductor-feeds")
        self._spawn(self._every(self.conf.compute.heartbeat_interval, self._heartbeat), "conductor-heartbeat")
        LOG.info("provfw-conductor started on host %s", self.host)

    def _flush_loop(self) -> None:
        interval = self.conf.conductor.report_flush_interval
        while not self._stop.is_set():
            if self.manager.flush_now.wait(interval):
                self._stop.wait(URGENT_GATHER)
            self.manager.flush_now.clear()
            try:
                self.manager.flush_reports()
            except exception.DatabaseUnavailable as exc:     # one line a round while it is away, not a traceback
                LOG.warning("flushing state reports failed: %s", exc.message)
            except Exception:  # noqa: BLE001 - a loop that must never die
                LOG.exception("flushing state reports failed")
        self.manager.flush_reports()

    def _sync_feeds(self) -> None:
        for outcome in self.feeds.run_due():
            if outcome.generation is not None:
                self.manager.note_generation(outcome.generation)

    def _heartbeat(self) -> None:
        db.service_update(self.host, binary=BINARY, heartbeat=True, driver=None)

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _every(self, interval: float, func):
        def loop():
            while not self._stop.wait(interval):
                try:
                    func()
                except exception.DatabaseUnavailable as exc:  # one line a round while it is away
                    LOG.warning("periodic task %s failed: %s", getattr(func, "__name__", func), exc.message)
                except Exception:  # noqa: BLE001 - a periodic task must never die
                    LOG.exception("periodic task %s failed", getattr(func, "__name__", func))
        return loop

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.server.stop()
        self.manager.flush_now.set()
        for thread in self._threads:
            thread.join(timeout)
        try:
            metrics.CONDUCTOR.unregister(self.collector)
        except KeyError:
            pass                                    # never started
