"""The conductor's feed syncer: fetch each due feed and replace-sync its source ``feed:<name>``.

Design
------
A feed is a URL the operator subscribes to (Spamhaus DROP, a FireHOL
netset, IPsum, an internal SIEM export) with an interval.  Every
``[feeds] poll_interval`` seconds ``run_due`` claims the feeds that are due
(``db.feed_claim_due``: a compare-and-set lease, so of several conductors
exactly one syncs a feed) and syncs them one after the other:

1. download (``provfw.feeds.fetch``) with the last list's ETag /
   Last-Modified, bounded in size and time; a 304, or a body whose SHA-256 is
   the last applied one, only confirms the list;
2. parse (``provfw.feeds.formats``) and apply the policy
   (``provfw.feeds.importer``: protected networks, non-global ranges unless
   the feed opted in);
3. replace-sync the feed's source in ONE transaction and ONE generation
   (``db.feed_sync``), which also records the feed's state and releases the
   claim, then cast the change to the hosts.

What the operator asked for is kept when the new list is not trusted: a
failed download, a list that cannot be parsed, an empty list while the
feed holds rules, or a replace the guard refuses
(``[feeds] replace_guard_fraction``) all leave the rules of the last good
list in force and are recorded (``last_status``, ``last_error``) for the
API, the CLI and the metrics; ``provfw feed sync NAME --force`` applies a
refused list once.  A failed feed is retried after ``[feeds]
retry_interval`` (or its interval, if shorter).

TTL: a feed with ``ttl`` gives its rules that lifetime from each sync that
sees them, so rules of a feed that stops being published lapse.  A rule
is renewed only when its expiry would move by more than half the TTL
(``renew_slack``), so an hourly sync with a one-day TTL touches each rule
about twice a day rather than 24 times; and the download is made
unconditional at least every quarter TTL, so a server answering 304 for
days does not let the list lapse.

Metrics: every finished sync is counted in ``provfw_feed_syncs_total{feed,
status}`` and ``provfw_feed_sync_seconds{feed}`` (``provfw.metrics``), and
handed to each callable in ``SYNC_OBSERVERS`` (``observer(feed_name,
outcome)``) for anything else that wants it; each feed's last sync is also
exported from its row on every scrape (``provfw.conductor.metrics``).

Thread-safety: ``run_due`` runs in one conductor thread; ``stats`` is a
Counter read by others without locking (plain integer updates).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import logging
import time
from typing import Callable

import requests
from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, gcpause, metrics, rules, sources
from provfw.compute import api as compute_api_mod
from provfw.db import api as db
from provfw.feeds import fetch as fetch_mod
from provfw.feeds import importer

LOG = logging.getLogger(__name__)

REFUSED_KEPT = 20            # refused lines a feed's state keeps for `provfw feed show`
LEASE_MARGIN = 120.0         # seconds a claim outlives the download, for parsing and the sync itself


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one feed sync ended.

    ``status``: ``ok`` (a new list applied, maybe changing nothing),
    ``not_modified`` (the server said 304), ``unchanged`` (same bytes as the
    last applied list), or a failure that kept the last good list:
    ``fetch_error``, ``refused`` (unparseable, empty, guard), ``error``
    (anything else, e.g. max_rules), ``lost`` (another conductor took over).
    ``counts``: the sync's counts when a list was applied; ``seconds``: the
    whole sync's wall time.
    """

    feed: str
    status: str
    error: str | None = None
    counts: dict | None = None
    generation: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "not_modified", "unchanged")


#: Callables ``observer(feed_name: str, outcome: Outcome)`` run after every sync (the metrics hook).
SYNC_OBSERVERS: list[Callable[[str, Outcome], None]] = []


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class FeedSyncer:
    """Syncs due feeds (see the module docstring).  ``fetch`` and ``session`` may be injected."""

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF,
                 compute_api: compute_api_mod.ComputeAPI | None = None, host: str = "conductor",
                 fetch: Callable[..., fetch_mod.Fetched] = fetch_mod.fetch, session: requests.Session | None = None):
        self.conf = conf
        self.compute_api = compute_api
        self.host = host
        self.fetch = fetch
        self.session = session or requests.Session()
        self.protected = rules.parse_protected_networks(conf.protected_cidrs)
        self.stats: collections.Counter = collections.Counter()

    # ------------------------------------------------------------ the loop

    def run_due(self) -> list[Outcome]:
        """Claim the feeds that are due and sync each; return their outcomes."""
        feeds = self.conf.feeds
        lease = feeds.fetch_timeout + feeds.connect_timeout + LEASE_MARGIN
        outcomes = []
        for claim in db.feed_claim_due(self.host, lease):
            outcomes.append(self.sync(claim))
        return outcomes

    def sync(self, claim: db.FeedClaim) -> Outcome:
        """Sync one claimed feed and record the outcome (never raises for the feed's own failures)."""
        started = time.monotonic()
        feed = claim.feed
        try:
            outcome = self._sync(claim, started)
        except exception.FeedClaimLost:
            outcome = Outcome(feed.name, "lost", "another conductor took the feed over")
            LOG.warning("feed %s: another conductor took it over while this one synced it", feed.name)
        except Exception as exc:  # noqa: BLE001 - a feed's failure must not end the loop or the others
            LOG.exception("feed %s: sync failed", feed.name)
            outcome = self._failed(claim, "error", f"{type(exc).__name__}: {exc}", started)
        self.observe(outcome)
        return outcome

    def observe(self, outcome: Outcome) -> None:
        """Count the outcome (``stats``, the Prometheus metrics) and hand it to every SYNC_OBSERVERS callable."""
        self.stats[f"feed_{outcome.status}"] += 1
        metrics.FEED_SYNCS.labels(outcome.feed, outcome.status).inc()
        metrics.FEED_SYNC_SECONDS.labels(outcome.feed).observe(outcome.seconds)
        for observer in list(SYNC_OBSERVERS):
            try:
                observer(outcome.feed, outcome)
            except Exception:  # noqa: BLE001 - an observer must not break syncing
                LOG.exception("feed sync observer %r failed", observer)

    # ------------------------------------------------------------ one feed

    def _sync(self, claim: db.FeedClaim, started: float) -> Outcome:
        feed, feeds = claim.feed, self.conf.feeds
        now = _utcnow()
        ttl = feed.ttl_seconds
        renew_due = bool(ttl) and (feed.last_applied_at is None
                                   or (now - feed.last_applied_at).total_seconds() >= ttl / 4)
        conditional = not renew_due and not feed.force_next
        try:
            fetched = self.fetch(feed.url, feed.etag if conditional else None,
                                 feed.last_modified if conditional else None, max_bytes=feeds.max_bytes,
                                 connect_timeout=feeds.connect_timeout, read_timeout=feeds.read_timeout,
                                 total_timeout=feeds.fetch_timeout, session=self.session)
        except exception.FeedFetchError as exc:
            return self._failed(claim, exc.status, exc.message, started)
        next_at = now + datetime.timedelta(seconds=feed.interval_seconds)
        confirmed = {"last_success_at": now, "last_status": None, "last_error": None, "next_sync_at": next_at}
        if fetched.status == 304:
            return self._confirmed(claim, "not_modified", confirmed, fetched, started)
        assert fetched.body is not None
        digest = hashlib.sha256(fetched.body).hexdigest()
        if conditional and digest == feed.content_sha256:
            return self._confirmed(claim, "unchanged", confirmed, fetched, started)

        # Parsing, planning and the rows read back allocate per entry of lists of 120k: gcpause says why.
        with gcpause.paused():
            like = importer.template(feed.protocol, feed.from_port, feed.to_port)
            try:
                parsed, built = importer.parse_specs(fetched.body, feed.format, feed.csv_column, like, self.protected,
                                                     feed.allow_non_global or self.conf.allow_non_global)
            except exception.FeedFormatError as exc:
                return self._failed(claim, "refused", f"the list cannot be read: {exc.message}", started)
            force = bool(feed.force_next)
            if not built.specs and not force and db.provider_fw_rule_get_all(limit=1, source=db.feed_source(feed.name)):
                return self._failed(claim, "refused", f"the list has no usable entry ({parsed.lines:,} lines, "
                                                      f"{len(built.refused):,} refused); keeping the last good list",
                                    started)
            counts = {"bytes": len(fetched.body), "lines": parsed.lines, "format": parsed.format,
                      "entries": built.entries, "refused": len(built.refused), "repeated": built.duplicates,
                      "non_global_allowed": built.non_global_count,
                      "refused_lines": [r._asdict() for r in built.refused[:REFUSED_KEPT]]}
            state = {"etag": fetched.etag, "last_modified": fetched.last_modified, "content_sha256": digest,
                     "last_success_at": now, "last_applied_at": now, "last_status": "ok", "last_error": None,
                     "next_sync_at": next_at, "force_next": False}
            expires_at = now + datetime.timedelta(seconds=ttl) if ttl else None
            guard = sources.Guard(feeds.replace_guard_fraction, feeds.replace_guard_min_rules)
            audit_detail = {"url": fetch_mod.redact(feed.url), "format": parsed.format, "refused": len(built.refused)}
            if built.non_global:
                audit_detail["non_global_allowed"] = [{"line": line, "cidr": cidr, "range": hit}
                                                      for line, cidr, hit in built.non_global]
            try:
                result = db.feed_sync(claim, built.specs, state, expires_at=expires_at, guard=guard, force=force,
                                      renew_slack=ttl / 2 if ttl else 0.0, max_rules=self.conf.max_rules,
                                      audit_detail=audit_detail, counts=counts)
            except exception.ReplaceGuardTripped as exc:
                return self._failed(claim, "refused", exc.message + f" (provfw feed sync {feed.name} --force)", started)
            except exception.RuleLimitExceeded as exc:
                return self._failed(claim, "error", exc.message, started)
            counts.update(result.counts())
            if result.changed and self.compute_api is not None:
                self.compute_api.notify(result.changes)
            LOG.info("feed %s: %s lines, %d added, %d renewed, %d removed, %d refused, generation %s (%.2f s)",
                     feed.name, f"{parsed.lines:,}", result.added, result.renewed, result.removed, len(built.refused),
                     result.generation, time.monotonic() - started)
            return Outcome(feed.name, "ok", None, counts, result.generation, time.monotonic() - started)

    def _confirmed(self, claim: db.FeedClaim, status: str, state: dict, fetched: fetch_mod.Fetched,
                   started: float) -> Outcome:
        state = {**state, "last_status": status}
        if fetched.etag:
            state["etag"] = fetched.etag
        if fetched.last_modified:
            state["last_modified"] = fetched.last_modified
        if not db.feed_record(claim, state):
            raise exception.FeedClaimLost(claim.feed.name)
        LOG.debug("feed %s: %s", claim.feed.name, status)
        return Outcome(claim.feed.name, status, seconds=time.monotonic() - started)

    def _failed(self, claim: db.FeedClaim, status: str, error: str, started: float) -> Outcome:
        feed = claim.feed
        retry = min(feed.interval_seconds, self.conf.feeds.retry_interval)
        state = {"last_status": status, "last_error": error[:4000],
                 "next_sync_at": _utcnow() + datetime.timedelta(seconds=retry)}
        LOG.warning("feed %s: %s: %s; the rules of its last good list stay in force", feed.name, status, error)
        if not db.feed_record(claim, state):
            LOG.warning("feed %s: another conductor took it over; its outcome is not recorded here", feed.name)
        return Outcome(feed.name, status, error, seconds=time.monotonic() - started)
