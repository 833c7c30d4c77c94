"""ConductorManager: serves the compute workers over the bus; with provfw-api, the only process with database access.

Design
------
Hypervisors run strangers' virtual machines and are the hosts most likely to
be compromised, so they hold bus credentials only (Nova moved compute nodes
off the database to nova-conductor for this; Calico's Felix reads through
Typha).  The conductor answers exactly two things, and nothing a compute
user sends can create, change or delete a rule, a token or an audit record:

* ``get_provider_fw_rules(host, since_generation, min_generation, fresh)`` (a call):
  the rules added and removed since the host's generation, or - when that
  delta is larger than ``[conductor] max_delta_rules`` or the generation is
  unknown - a full snapshot.  Replies are encoded once (zlib JSON) and cached:
  a snapshot per generation, a delta per (since, generation) pair (or the
  fact that it is too large), so 1,000 hosts starting together cost ONE
  database read, 1,000 hosts asking for the same change cost one, and 1,000
  hosts catching up on a bulk import cost one delta read and one snapshot
  read.  "Nothing changed" is answered from a cached generation at most
  ``generation_cache_ttl`` seconds old (or read again if the host knows of a
  newer one from a cast), so periodic checks of a whole fleet cost at most
  one tiny query per second.
* ``report_provider_fw_state(host, applied_generation, rule_count, driver,
  last_error, quarantine, applied_at)`` (a cast, also the heartbeat): the
  reporting host is the broker-validated AMQP ``user_id``
  (``compute_user_prefix`` + host); a report claiming another host, or from a
  bus user that is not a compute user, is rejected and logged.  Reports are
  written in batches - one transaction for all pending hosts - within 50 ms
  when a host's generation, error or quarantine changed (the rest of the
  fleet's reports of the same change join the batch), else every
  ``report_flush_interval`` seconds.

It also soft-deletes expired rules every ``purge_interval`` seconds and casts
the removal (hosts stopped enforcing them at expiry on their own).

Thread-safety: ``handle`` runs in the server's consumer thread (requests are
served one at a time, which also makes snapshot building single-flight);
reports are handed to the flush thread through ``_pending`` under ``_lock``;
the caches are touched only by ``handle``.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import threading
import time
from typing import Any

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import rpc
from provfw.compute import api as compute_api_mod
from provfw.db import api as db

LOG = logging.getLogger(__name__)

MAX_ERROR = 4000
MAX_QUARANTINE = 1000
MAX_REASON = 500


# Cached in place of a delta reply that would exceed max_delta_rules: answer with the snapshot.
_TOO_LARGE = rpc.Reply(b"", {"kind": "too-large"})


def _utc(epoch: float | None) -> datetime.datetime | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).replace(tzinfo=None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ConductorManager:
    """The conductor's request handlers, caches and report batching (see the module docstring)."""

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF,
                 compute_api: compute_api_mod.ComputeAPI | None = None):
        self.conf = conf
        self.compute_api = compute_api
        self.trusted_bus = conf.transport_url.startswith("memory")
        self._generation: tuple[int, float] | None = None          # (generation, monotonic time read)
        self._snapshots: collections.OrderedDict[int, rpc.Reply] = collections.OrderedDict()
        self._deltas: collections.OrderedDict[tuple[int, int], rpc.Reply] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[str, dict] = {}
        self._written: dict[str, tuple] = {}
        self.flush_now = threading.Event()
        self.stats: collections.Counter = collections.Counter()

    # ------------------------------------------------------------ dispatch

    def handle(self, incoming: rpc.Incoming) -> rpc.Reply | dict | None:
        """The server's handler: one request or cast from a worker."""
        args = incoming.args
        if incoming.method == "get_provider_fw_rules":
            since, minimum = args.get("since_generation"), args.get("min_generation")
            fresh = args.get("fresh", False)
            if (not (since is None or _is_int(since)) or not (minimum is None or _is_int(minimum))
                    or not isinstance(fresh, bool)):
                LOG.warning("get_provider_fw_rules from bus user %r with malformed arguments %r",
                            incoming.user_id, args)
                return {"error": "since_generation and min_generation must be integers or null, fresh a boolean"}
            self.stats["requests"] += 1
            try:
                reply = self.get_provider_fw_rules(since, minimum, incoming.received_at, fresh=fresh)
            except Exception as exc:  # noqa: BLE001 - answer at once rather than let the worker time out
                LOG.exception("get_provider_fw_rules(since=%s) failed", since)
                return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            self.stats["reply_bytes"] += len(reply.body)
            return reply
        if incoming.method == "report_provider_fw_state":
            host = self.identify(args.get("host"), incoming.user_id)
            if host is not None:
                self.record_report(host, incoming.user_id, args)
            return None
        self.stats["rejected"] += 1
        LOG.warning("rejected %r from bus user %r: the conductor serves only get_provider_fw_rules and "
                    "report_provider_fw_state", incoming.method, incoming.user_id)
        return {"error": f"unknown method {incoming.method!r}"} if incoming.reply_to else None

    def counters(self) -> dict[str, int]:
        """This conductor's counters since it started, for logs and benchmarks.

        ``requests``, ``reply_bytes`` (compressed bytes of the answers),
        ``snapshot_reads`` / ``delta_reads`` / ``generation_reads`` (database
        reads), ``snapshot_hits`` / ``delta_hits`` / ``delta_too_large_hits``
        / ``unchanged`` (answered from the caches), ``reports``,
        ``report_flushes``, ``rejected*``; and
        ``db_statements``, ``db_transactions``, ``db_rows_read``: everything
        this process asked of the database (``provfw.db.api.statement_counts``).
        """
        counters = dict(self.stats)
        counters.update({f"db_{key}": value for key, value in db.statement_counts().items()})
        return counters

    # ------------------------------------------------------------ rules

    def current_generation(self, at_least: int | None = None, read_after: float | None = None) -> int:
        """The database generation, cached for ``generation_cache_ttl`` seconds unless ``at_least`` is newer.

        With ``read_after`` (a ``time.monotonic()`` value) the cache is used only if it was read at or
        after that moment, whatever its age; otherwise the generation is read (one single-row read).
        """
        cached = self._generation
        if read_after is not None:
            usable = cached is not None and cached[1] >= read_after
        else:
            usable = (cached is not None and time.monotonic() - cached[1] < self.conf.conductor.generation_cache_ttl
                      and (at_least is None or cached[0] >= at_least))
        if usable:
            return cached[0]
        generation = db.provider_fw_generation_get()
        self.stats["generation_reads"] += 1
        self._generation = (generation, time.monotonic())
        return generation

    def note_generation(self, generation: int) -> None:
        """A mutation this process made (purge): the cache may skip a read."""
        cached = self._generation
        if cached is None or generation > cached[0]:
            self._generation = (generation, time.monotonic())

    def get_provider_fw_rules(self, since: int | None, min_generation: int | None = None,
                              received_at: float | None = None, fresh: bool = False) -> rpc.Reply:
        """A delta since ``since`` or a snapshot, encoded (and cached) for the wire.

        ``received_at``: ``time.monotonic()`` when the request reached this process (None: now).
        ``fresh``: the generation compared with ``since`` is one read after
        ``received_at`` (a worker catching up after its bus connection came
        back: a cast it missed may be younger than the cached generation's
        ``generation_cache_ttl``, and "unchanged" would leave it behind until
        its next periodic check).
        """
        # A host that already applied ``since`` knows the database is at least there: a cached generation
        # older than that is stale and must be read again (answering from it would roll the host back).
        known = max((g for g in (since, min_generation) if g is not None), default=None)
        if since is None:
            current = -1
        elif fresh:
            current = self.current_generation(read_after=received_at if received_at is not None else time.monotonic())
        else:
            current = self.current_generation(known)
        if since is not None and since == current:
            self.stats["unchanged"] += 1
            return self._encode({"kind": "delta", "since": since, "generation": current, "added": [],
                                 "removed": []})
        if since is not None and 0 <= since < current:
            cached = self._newest(self._deltas, lambda key: key[0] == since and key[1] >= current)
            if cached is _TOO_LARGE:
                self.stats["delta_too_large_hits"] += 1
            elif cached is not None:
                self.stats["delta_hits"] += 1
                return cached
            else:
                # Count first: a delta too large to send is never read (a 120k import would otherwise be
                # read twice, once as a delta thrown away and once as the snapshot).
                # None from either: rules deleted after `since` were purged (provfw-manage db purge), so only a
                # snapshot can tell this host what to stop enforcing.
                changes = None
                count = db.provider_fw_changes_count_since(since)
                if count is not None and count <= self.conf.conductor.max_delta_rules:
                    changes = db.provider_fw_changes_since(since)
                    self.stats["delta_reads"] += 1
                    if changes is not None:
                        self.note_generation(changes.generation)
                    if changes is not None and changes.size <= self.conf.conductor.max_delta_rules:
                        reply = self._encode({"kind": "delta", "since": since, "generation": changes.generation,
                                              "added": [r.to_wire() for r in changes.added],
                                              "removed": [r.to_wire() for r in changes.removed]})
                        self._remember(self._deltas, (since, changes.generation), reply,
                                       self.conf.conductor.delta_cache_size)
                        return reply
                # Remember that this delta is a snapshot's job: after a bulk import every
                # host asks for the same (since, generation), and counting (or reading) again
                # per host only to find the delta too large again costs the fleet N queries.
                self._remember(self._deltas, (since, changes.generation if changes else current), _TOO_LARGE,
                               self.conf.conductor.delta_cache_size)
        # A snapshot replaces everything a host enforces, so it must be at least as new as anything the host
        # could have applied before it asked (a host restarting after a change would otherwise drop rules its
        # kernel still holds - found by the SIGKILL resilience test, where a restarted worker was served the
        # snapshot of a generation cached 0.8 s earlier and unblocked an attacker).  Whatever a host applied,
        # it applied before sending this request, so a generation read after the request reached this
        # process is new enough: a burst of 1,000 starting hosts costs a handful of reads, not one each.
        current = self.current_generation(read_after=received_at if received_at is not None else time.monotonic())
        cached = self._newest(self._snapshots, lambda generation: generation >= current)
        if cached is not None:
            self.stats["snapshot_hits"] += 1
            return cached
        generation, wire = db.provider_fw_snapshot_wire()
        self.stats["snapshot_reads"] += 1
        self.note_generation(generation)
        reply = self._encode({"kind": "snapshot", "generation": generation, "rules": wire})
        self._remember(self._snapshots, generation, reply, self.conf.conductor.snapshot_cache_size)
        LOG.info("built the snapshot of generation %s: %d rules, %d bytes compressed", generation, len(wire),
                 len(reply.body))
        return reply

    @staticmethod
    def _encode(payload: dict) -> rpc.Reply:
        return rpc.Reply(rpc.encode_reply(payload), {"kind": payload["kind"], "generation": payload["generation"]})

    @staticmethod
    def _newest(cache: collections.OrderedDict, wanted) -> rpc.Reply | None:
        for key in reversed(cache):
            if wanted(key):
                cache.move_to_end(key)
                return cache[key]
        return None

    @staticmethod
    def _remember(cache: collections.OrderedDict, key, reply: rpc.Reply, size: int) -> None:
        if size <= 0:
            return
        cache[key] = reply
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)

    # ------------------------------------------------------------ state reports

    def identify(self, claimed: Any, user_id: str | None) -> str | None:
        """The host a report may speak for: the bus user's host; None (logged) when it may not."""
        if not isinstance(claimed, str) or not rpc.HOST_RE.match(claimed):
            self.stats["rejected_reports"] += 1
            LOG.warning("rejected a state report from bus user %r: malformed host %r", user_id, claimed)
            return None
        prefix = self.conf.conductor.compute_user_prefix
        if user_id and prefix and user_id.startswith(prefix) and len(user_id) > len(prefix):
            verified = user_id[len(prefix):]
            if verified != claimed:
                self.stats["rejected_reports"] += 1
                LOG.warning("rejected a state report from bus user %r claiming host %r: that user may only "
                            "report for host %r", user_id, claimed, verified)
                return None
            return verified
        if self.trusted_bus or self.conf.conductor.trust_unverified_hosts:
            return claimed
        self.stats["rejected_reports"] += 1
        LOG.warning("rejected a state report for host %r from bus user %r, which is not a compute user "
                    "(%s<host>); create one with 'provfw-manage bus create-user --role compute --host %s' or set "
                    "[conductor] trust_unverified_hosts", claimed, user_id, prefix, claimed)
        return None

    def record_report(self, host: str, user_id: str | None, args: dict) -> None:
        """Validate a report and queue it for the next batch (at once when something important changed)."""
        generation, count = args.get("applied_generation"), args.get("rule_count")
        if not _is_int(generation) or not _is_int(count) or count < 0:
            self.stats["rejected_reports"] += 1
            LOG.warning("rejected a malformed state report from %s: %r", host, args)
            return
        error = args.get("last_error")
        error = error[:MAX_ERROR] if isinstance(error, str) else None
        driver = args.get("driver")
        driver = driver[:255] if isinstance(driver, str) else None
        raw = args.get("quarantine")
        quarantine = []
        for item in raw[:MAX_QUARANTINE] if isinstance(raw, list) else []:
            if isinstance(item, dict) and _is_int(item.get("id")):
                quarantine.append({"id": item["id"], "cidr": str(item.get("cidr", ""))[:64],
                                   "reason": str(item.get("reason", ""))[:MAX_REASON]})
        quarantine_text = json.dumps(quarantine, sort_keys=True) if quarantine else None
        applied_at = args.get("applied_at")
        values = {"driver": driver, "heartbeat_at": db_now(), "applied_generation": generation,
                  "applied_at": _utc(applied_at) if isinstance(applied_at, (int, float)) else None,
                  "rule_count": count, "last_error": error, "quarantine": quarantine_text,
                  "bus_user": (user_id or "")[:255] or None}
        key = (generation, error, quarantine_text)
        with self._lock:
            self._pending[host] = values
            urgent = self._written.get(host) != key
        self.stats["reports"] += 1
        if urgent:
            self.flush_now.set()

    def flush_reports(self) -> int:
        """Write every pending report in one transaction; return how many (0 when the database is down)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        failure = None
        try:
            written = db.service_update_many(batch)
        except Exception as exc:  # noqa: BLE001 - keep them for the next flush, newer reports win
            failure = exc
        if failure is not None:
            # Logged outside the except: oslo.log appends the exception being handled to a WARNING line.
            LOG.warning("could not write %d state report(s): %s", len(batch), failure)
            with self._lock:
                for host, values in batch.items():
                    self._pending.setdefault(host, values)
            return 0
        with self._lock:
            for host, values in batch.items():
                self._written[host] = (values["applied_generation"], values["last_error"], values["quarantine"])
        self.stats["report_flushes"] += 1
        return written

    # ------------------------------------------------------------ housekeeping

    def purge_expired(self) -> int:
        """Soft-delete expired rules and cast the removal; return how many."""
        changes = db.provider_fw_rule_purge_expired()
        if changes is None:
            return 0
        self.note_generation(changes.generation)
        LOG.info("purged %d expired rule(s) at generation %s", len(changes.removed), changes.generation)
        if self.compute_api is not None:
            self.compute_api.notify(changes)
        return len(changes.removed)


def db_now() -> datetime.datetime:
    """Naive UTC, as every timestamp column stores it."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
