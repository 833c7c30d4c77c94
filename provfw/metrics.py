"""Every Prometheus metric provfw exports, declared here and nowhere else.

Design
------
Names follow Calico Felix's and CrowdSec's: ``provfw_`` prefix, base units
(seconds), ``_total`` on counters, labels with bounded values only (a route
template, never a raw path; a driver's configured name, never its
description).  Metrics live in four registries by the process that owns
them, so a daemon exports only what it can know:

* ``WORKER``: provfw-compute's dataplane (apply histogram, failures, drift
  repairs, rules applied and quarantined, the applied generation, the bus);
* ``API``: requests by route, method and status, and their durations;
* ``CONTROL``: what provfw-api and provfw-conductor share (casts that could
  not be sent, database transactions rolled back by a deadlock);
* ``CONDUCTOR``: filled on scrape by ``provfw.conductor.metrics.
  ConductorCollector`` - the generation, active rules, each host's up/lag
  and each feed's last sync read from the database (one read each per
  scrape, never per request), and the conductor's own request counters -
  plus the feed syncs the conductor ran (``FEED_SYNCS``, ``FEED_SYNC_SECONDS``).

``serve(host, port, *registries)`` starts one HTTP endpoint (``GET
/metrics``) for the registries a daemon owns plus the process collectors
(CPU, memory, file descriptors, GC); provfw-all-in-one serves all four on one
port.  Worker gauges that mirror state (rules applied, generation,
quarantine, bus) are callback gauges bound by ``bind_worker``: read on
scrape, so they can never disagree with the reconciler.

Thread-safety: prometheus_client metrics are thread-safe; ``bind_worker``
replaces the callbacks (one worker per process, the last one bound wins).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import gc_collector, platform_collector, process_collector
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

LOG = logging.getLogger(__name__)

WORKER = CollectorRegistry()
API = CollectorRegistry()
CONTROL = CollectorRegistry()
CONDUCTOR = CollectorRegistry()

# From a 3-rule delta on ipset (~1 ms) to a 120k-rule linear iptables rebuild (tens of seconds).
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# ----------------------------------------------------------------------------- compute worker

DATAPLANE_APPLY_SECONDS = Histogram(
    "provfw_dataplane_apply_seconds",
    "Wall time of one driver apply (quarantine search included), by firewall driver and mode "
    "(full, delta, expiry, repair, none).",
    ["driver", "mode"], buckets=APPLY_BUCKETS, registry=WORKER)
DATAPLANE_APPLY_FAILURES = Counter(
    "provfw_dataplane_apply_failures",
    "Applies (and drift checks) that failed; the previously applied rules stayed in force.",
    ["driver"], registry=WORKER)
DATAPLANE_DRIFT_REPAIRS = Counter(
    "provfw_dataplane_drift_repairs",
    "Drift checks that found the kernel changed by someone else and rewrote it.",
    ["driver"], registry=WORKER)
RULES_APPLIED = Gauge("provfw_rules_applied", "Rules the kernel enforces on this host.", registry=WORKER)
APPLIED_GENERATION = Gauge("provfw_applied_generation",
                           "Rule-set generation this host's kernel reflects (-1 before the first apply).",
                           registry=WORKER)
RULES_QUARANTINED = Gauge("provfw_rules_quarantined",
                          "Rules this host's kernel refused; reported, never enforced.", registry=WORKER)
BUS_CONNECTED = Gauge("provfw_bus_connected",
                      "1 while the worker's cast consumer is connected to the message bus.", registry=WORKER)

# ----------------------------------------------------------------------------- API

API_REQUESTS = Counter(
    "provfw_api_requests",
    "API requests answered, by route template, method and status code.",
    ["route", "method", "status"], registry=API)
API_REQUEST_SECONDS = Histogram(
    "provfw_api_request_seconds",
    "Time from receiving an API request to the last byte of its answer, by route template and method.",
    ["route", "method"], buckets=REQUEST_BUCKETS, registry=API)

# ----------------------------------------------------------------------------- API and conductor

CASTS_FAILED = Counter(
    "provfw_casts_failed",
    "trigger_provider_fw_rules casts that could not be sent (workers converge on their periodic check).",
    registry=CONTROL)
DB_GROUP_COMMIT_MUTATIONS = Histogram(
    "provfw_db_group_commit_mutations",
    "Mutations that shared one transaction, generation and cast (the API's group commit; 1 when one ran alone).",
    buckets=(1, 2, 4, 8, 16, 32, 64), registry=CONTROL)
DB_GENERATION_LOCK_WAIT_SECONDS = Histogram(
    "provfw_db_generation_lock_wait_seconds",
    "Time a transaction that changes the rule set took to hold the generation row lock, from asking for its "
    "connection: the pool checkout, BEGIN, the first statement's round trip, and any wait while another "
    "transaction (another API process, the conductor) held the lock.",
    buckets=REQUEST_BUCKETS, registry=CONTROL)
DB_GENERATION_LOCK_HELD_SECONDS = Histogram(
    "provfw_db_generation_lock_held_seconds",
    "Time from taking the generation row lock to the end of the transaction (COMMIT or ROLLBACK). Every "
    "mutation holds it, so rate() of the _sum is the fraction of time this process held it: near 1, "
    "mutations are bound by the lock.",
    buckets=REQUEST_BUCKETS, registry=CONTROL)
DB_DEADLOCKS = Counter(
    "provfw_db_deadlocks",
    "Database transactions the server rolled back for a deadlock or serialisation failure, by operation "
    "(each is run again, up to 5 times).",
    ["operation"], registry=CONTROL)

# ----------------------------------------------------------------------------- conductor: feeds

FEED_SYNCS = Counter(
    "provfw_feed_syncs",
    "Feed syncs by feed and outcome: ok (a list applied), not_modified, unchanged (the list was confirmed); "
    "fetch_error, refused, error, lost (the rules of the last good list stayed in force).",
    ["feed", "status"], registry=CONDUCTOR)
FEED_SYNC_SECONDS = Histogram(
    "provfw_feed_sync_seconds", "Wall time of one feed sync (download, parse, replace-sync), by feed.",
    ["feed"], buckets=APPLY_BUCKETS, registry=CONDUCTOR)

ROLES = {"worker": WORKER, "api": API, "control": CONTROL, "conductor": CONDUCTOR}


def bind_worker(rules_applied: Callable[[], float], applied_generation: Callable[[], float],
                quarantined: Callable[[], float], bus_connected: Callable[[], float]) -> None:
    """Make the worker's state gauges read these callables on every scrape."""
    RULES_APPLIED.set_function(rules_applied)
    APPLIED_GENERATION.set_function(applied_generation)
    RULES_QUARANTINED.set_function(quarantined)
    BUS_CONNECTED.set_function(bus_connected)


class _Union(Collector):
    """The metrics of several registries as one collector."""

    def __init__(self, registries: Iterable[CollectorRegistry]):
        self.registries = list(registries)

    def collect(self):
        for registry in self.registries:
            yield from registry.collect()


def registry_for(*registries: CollectorRegistry) -> CollectorRegistry:
    """A registry exporting ``registries`` plus this process's CPU, memory, file descriptors and GC."""
    combined = CollectorRegistry()
    combined.register(_Union(registries))
    process_collector.ProcessCollector(registry=combined)
    platform_collector.PlatformCollector(registry=combined)
    gc_collector.GCCollector(registry=combined)
    return combined


class MetricsServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (useful with port 0 in tests)."""

    def __init__(self, httpd, thread):
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_address[1]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve(host: str, port: int, *registries: CollectorRegistry, what: str = "provfw") -> MetricsServer | None:
    """Serve ``registries`` on http://host:port/metrics; None when ``port`` is None or the port is taken.

    A port that cannot be bound is logged as an error and the daemon runs on
    without metrics: a firewall worker must not stop enforcing (or restart in
    a loop) because a metrics port is in use.  Port 0 binds a free port
    (tests); configuration uses 0 in ``[metrics]`` to mean "off", which the
    caller turns into None.
    """
    if port is None:
        return None
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry_for(*registries))
    except OSError as exc:
        LOG.error("%s: cannot serve metrics on %s:%s (%s); running without a metrics endpoint", what, host, port,
                  exc)
        return None
    server = MetricsServer(httpd, thread)
    LOG.info("%s metrics on http://%s:%s/metrics", what, host, server.port)
    return server


def serve_configured(conf, port_option: str, *registries: CollectorRegistry, what: str) -> MetricsServer | None:
    """``serve`` on ``[metrics] bind_host`` and ``[metrics] <port_option>``; None when that port is 0 (off)."""
    port = getattr(conf.metrics, port_option)
    if not port:
        return None
    return serve(conf.metrics.bind_host, port, *registries, what=what)
