"""ConductorCollector: the conductor's Prometheus metrics, computed when Prometheus scrapes.

Design
------
Gauges that describe the database - the generation, active rules by
protocol, each worker's up/down and how many generations it is behind - are
read once per scrape with ONE statement (``db.provider_fw_metrics_read``),
never maintained per request, so a busy API pays nothing for them and two
conductors report the same values.  When the read fails, only
``provfw_database_up 0`` is exported (and the failure logged at debug: the
scrape itself is the alert).  The conductor's request counters come from
``ConductorManager.stats`` (a ``collections.Counter`` it already keeps) and
are exported as counters.

Exported: ``provfw_database_up``, ``provfw_generation``,
``provfw_active_rules{protocol}``, ``provfw_service_up{host}``,
``provfw_service_applied_generation{host}``,
``provfw_service_generation_lag{host}``,
``provfw_service_heartbeat_age_seconds{host}``, ``provfw_feed_ok{feed}``,
``provfw_feed_last_success_timestamp_seconds{feed}``, ``provfw_feed_entries{feed}``,
``provfw_feed_refused_entries{feed}``, and ``provfw_conductor_<stat>_total``
for each entry of ``STATS``.

Thread-safety: ``collect`` runs in the metrics server's thread; it only
reads the manager's Counter (a snapshot copy) and the database.
"""

from __future__ import annotations

import datetime
import json
import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from provfw.db import api as db

LOG = logging.getLogger(__name__)

# ConductorManager.stats key -> (metric name without _total, help)
STATS = {
    "requests": ("provfw_conductor_requests", "get_provider_fw_rules requests served."),
    "unchanged": ("provfw_conductor_unchanged_replies", "Requests answered 'no change' from the cached generation."),
    "delta_hits": ("provfw_conductor_delta_cache_hits", "Deltas served from the cache."),
    "delta_reads": ("provfw_conductor_delta_reads", "Deltas read from the database."),
    "snapshot_hits": ("provfw_conductor_snapshot_cache_hits", "Snapshots served from the cache."),
    "snapshot_reads": ("provfw_conductor_snapshot_reads", "Snapshots read from the database."),
    "generation_reads": ("provfw_conductor_generation_reads", "Reads of the generation row."),
    "reports": ("provfw_conductor_reports", "State reports (heartbeats) received from workers."),
    "rejected_reports": ("provfw_conductor_rejected_reports",
                         "State reports rejected (malformed, or claiming another host than the bus user's)."),
    "report_flushes": ("provfw_conductor_report_flushes", "Batches of state reports written to the database."),
    "rejected": ("provfw_conductor_rejected_requests", "Requests for methods the conductor does not serve."),
}


class ConductorCollector(Collector):
    """Collects the conductor's metrics from ``manager.stats`` and one database read per scrape."""

    def __init__(self, manager, service_down_time: float, clock=None):
        self.manager = manager
        self.service_down_time = service_down_time
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))

    def collect(self):
        stats = dict(self.manager.stats)
        for key, (name, help_text) in STATS.items():
            yield CounterMetricFamily(name, help_text, value=stats.get(key, 0))
        up = GaugeMetricFamily("provfw_database_up", "1 when the conductor's last scrape could read the database.")
        try:
            read = db.provider_fw_metrics_read()
        except Exception as exc:  # noqa: BLE001 - the scrape must answer; database_up says what went wrong
            LOG.debug("metrics: reading the database failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("provfw_generation", "Generation of the rule set in the database.",
                                value=read.generation)
        active = GaugeMetricFamily("provfw_active_rules", "Live, unexpired provider rules by protocol.",
                                   labels=["protocol"])
        for protocol in ("tcp", "udp", "icmp", "all"):
            active.add_metric([protocol], read.active_rules.get(protocol, 0))
        for protocol, count in read.active_rules.items():
            if protocol not in ("tcp", "udp", "icmp", "all"):
                active.add_metric([protocol], count)
        yield active
        now = self.clock()
        service_up = GaugeMetricFamily("provfw_service_up", "1 when the worker's last heartbeat is at most "
                                       "[compute] service_down_time old.", labels=["host"])
        applied = GaugeMetricFamily("provfw_service_applied_generation",
                                    "Generation the worker reported applied (-1: none yet).", labels=["host"])
        lag = GaugeMetricFamily("provfw_service_generation_lag",
                                "Generations the worker is behind the database (0: in sync).", labels=["host"])
        age = GaugeMetricFamily("provfw_service_heartbeat_age_seconds", "Seconds since the worker's last report.",
                                labels=["host"])
        for host, generation, heartbeat_at in read.services:
            seconds = None if heartbeat_at is None else (now - heartbeat_at).total_seconds()
            service_up.add_metric([host], 1 if seconds is not None and seconds <= self.service_down_time else 0)
            reported = -1 if generation is None else generation
            applied.add_metric([host], reported)
            lag.add_metric([host], max(read.generation - max(reported, 0), 0))
            if seconds is not None:
                age.add_metric([host], seconds)
        yield service_up
        yield applied
        yield lag
        yield age
        yield from self._feeds()

    @staticmethod
    def _feeds():
        """Each feed's last sync, from its row (the outcome counters are ``metrics.FEED_SYNCS``)."""
        try:
            feeds = db.feed_get_all()
        except Exception as exc:  # noqa: BLE001 - the scrape must answer
            LOG.debug("metrics: reading the feeds failed: %s", exc)
            return
        ok = GaugeMetricFamily("provfw_feed_ok", "1 when the feed's last sync applied or confirmed its list; 0 "
                               "when it failed or was refused (the last good list stays in force).",
                               labels=["feed"])
        success = GaugeMetricFamily("provfw_feed_last_success_timestamp_seconds",
                                    "When the feed's list was last downloaded or confirmed unchanged.",
                                    labels=["feed"])
        entries = GaugeMetricFamily("provfw_feed_entries", "Entries of the feed's last applied list.",
                                    labels=["feed"])
        refused = GaugeMetricFamily("provfw_feed_refused_entries",
                                    "Lines of the feed's last applied list that were refused.", labels=["feed"])
        for feed in feeds:
            ok.add_metric([feed.name], 1 if feed.last_status in ("ok", "not_modified", "unchanged") else 0)
            if feed.last_success_at is not None:
                success.add_metric([feed.name], feed.last_success_at.replace(
                    tzinfo=datetime.timezone.utc).timestamp())
            counts = json.loads(feed.last_counts) if feed.last_counts else {}
            if "entries" in counts:
                entries.add_metric([feed.name], counts["entries"])
                refused.add_metric([feed.name], counts.get("refused", 0))
        yield ok
        yield success
        yield entries
        yield refused
