"""ComputeManager: what a compute worker does when told (or when it notices) that provider rules changed.

Design: the database is the truth, the conductor serves it, casts are
hints.  A ``trigger_provider_fw_rules`` cast carries
``{generation, previous_generation, added, removed}``: when
``previous_generation`` is the generation this host applied, the change is
applied straight from the message (no round trip); otherwise (a missed cast,
a bulk import whose cast carries only generations) the manager asks the
conductor for what changed since its generation.  It also asks at start and
on every periodic check, so a host that missed every cast still converges;
when nothing changed, the periodic check repairs kernel drift instead.

The manager holds no rule state of its own: the reconciler does
(``provfw.compute.reconciler``).  It never touches the database: after every
apply, and on every heartbeat, it casts its state to the conductor, which
writes the host's Service row.  Every failure - a driver that does not
implement the calls (NotImplementedError, decided by type), a kernel refusal,
an unreachable conductor - is recorded in that state instead of crashing the
worker, and the previously applied rules stay in force.

Thread-safety: methods are called from the cast applier, the periodic loop,
the heartbeat loop and the expiry loop concurrently; the reconciler
serialises applies, ``_state_lock`` guards the recorded outcome.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, gcpause, metrics, rpc
from provfw.compute import reconciler as reconciler_mod
from provfw.conductor import api as conductor_api
from provfw.rules import Changes, Snapshot, compose_changes, rules_from_wire
from provfw.virt import driver as virt_driver

LOG = logging.getLogger(__name__)

#: Snapshots of more rules than this are applied under ``gcpause.kept`` (see ``sync``).
KEEP_ABOVE_RULES = 8192

DRIFT_CHECK_SPACING = 10
MAX_ERROR = 4000

# Casts the consumer may dispatch; anything else is logged and dropped.
RPC_METHODS = frozenset({"trigger_provider_fw_rules"})


class ComputeManager:
    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, driver: virt_driver.ComputeDriver | None = None,
                 host: str | None = None, conductor: conductor_api.ConductorAPI | None = None,
                 clock: Callable[[], float] = time.time):
        self.conf = conf
        self.host = rpc.check_host(host or conf.compute.host)
        self.driver = driver or virt_driver.load_compute_driver(conf)
        self.reconciler = reconciler_mod.Reconciler(self.driver, conf, clock=clock)
        self.conductor = conductor or conductor_api.ConductorAPI(conf, self.host)
        self.last_outcome: reconciler_mod.Outcome | None = None
        self.last_error: str | None = None
        self.not_implemented = False
        self.applied_at: float | None = None
        self._state_lock = threading.Lock()
        self._report_soon: Callable[[], None] | None = None
        self._next_drift_check = 0.0
        self._driver_label = conf.compute.firewall_driver         # bounded metric label: the configured name
        # Exported as 0 from the start, so that increase() in an alert rule has a series before the first failure.
        metrics.DATAPLANE_APPLY_FAILURES.labels(self._driver_label)
        metrics.DATAPLANE_DRIFT_REPAIRS.labels(self._driver_label)

    # ----------------------------------------------------------------- RPC

    def dispatch(self, method: str, args: dict) -> None:
        """Entry point of the cast consumer for one cast."""
        self.dispatch_many([(method, args)])

    def dispatch_many(self, casts: Sequence[tuple[str, dict]]) -> None:
        """Entry point of the cast consumer: the casts that arrived while the last ones were applied.

        Unknown methods are logged and dropped; the ``trigger_provider_fw_rules``
        casts are applied together (``apply_casts``).
        """
        triggers = []
        for method, args in casts:
            if method not in RPC_METHODS:
                LOG.error("ignoring unknown cast %r", method)
            elif not isinstance(args, dict):
                LOG.error("ignoring cast %s with arguments %r", method, args)
            else:
                triggers.append(args)
        if triggers:
            self.apply_casts(triggers)

    def trigger_provider_fw_rules(self, generation: int | None = None, previous_generation: int | None = None,
                                  added: list | None = None, removed: list | None = None, **_ignored
                                  ) -> reconciler_mod.Outcome | None:
        """Seed API: rules changed.  ``apply_casts`` of this one cast."""
        return self.apply_casts([{"generation": generation, "previous_generation": previous_generation,
                                  "added": added, "removed": removed}])

    def apply_casts(self, casts: Sequence[Mapping[str, Any]]) -> reconciler_mod.Outcome | None:
        """Apply ``trigger_provider_fw_rules`` casts (their arguments) as ONE change where they chain.

        Each cast is ``{generation, previous_generation, added, removed}``;
        ``added``/``removed`` are rules in wire form (``provfw.rules.Rule``),
        both None when the change was too large to carry.  Casts for
        generations already applied are ignored.  The others, in generation
        order, are composed while each follows the one before it, starting
        at the applied generation (``rules.compose_changes``), and applied in
        one driver call: a worker whose driver is slower than the rate of
        changes (nwfilter's rules mode redefines a whole filter per apply)
        catches up with one apply instead of one per cast.  Anything that does not
        chain (a gap, a change too large to carry, a malformed one) makes the
        host ask the conductor once, for at least the newest generation seen.
        """
        applied = self.reconciler.generation
        if applied is None:
            return None             # the start-up sync has not run yet; it fetches everything
        chain: list[Changes] = []
        newest: int | None = None
        ask = False
        ordered = casts if len(casts) == 1 else sorted(
            casts, key=lambda c: c.get("generation") if _is_int(c.get("generation")) else -1)
        for cast in ordered:
            generation = cast.get("generation")
            if not _is_int(generation):
                ask = True
                continue
            newest = generation if newest is None else max(newest, generation)
            if generation <= applied or ask:
                if generation <= applied:
                    LOG.debug("cast for generation %s ignored: %s already applied", generation, applied)
                continue
            if chain and generation == chain[-1].generation:
                continue                            # the same cast twice (a publisher's retry)
            follows = chain[-1].generation if chain else applied
            added, removed = cast.get("added"), cast.get("removed")
            if cast.get("previous_generation") != follows or not isinstance(added, list) \
                    or not isinstance(removed, list):
                ask = True
                continue
            try:
                chain.append(Changes(follows, generation, rules_from_wire(added), rules_from_wire(removed)))
            except ValueError as exc:
                LOG.error("cast for generation %s carries a malformed change (%s); asking the conductor",
                          generation, exc)
                ask = True
        outcome = None
        if chain:
            change = compose_changes(chain)
            what = "cast" if len(chain) == 1 else f"{len(chain)} casts"
            outcome = self._reconcile(lambda: self.reconciler.apply_change(change), what)
        if ask:
            return self.sync(min_generation=newest)
        return outcome

    # ----------------------------------------------------------------- work

    @property
    def applied_generation(self) -> int | None:
        return self.reconciler.generation

    def init_host(self) -> reconciler_mod.Outcome:
        """Called at start: prepare the host, then apply everything before serving casts.

        Raises what stopped it (NotImplementedError, ConductorUnavailable,
        DriverError) after recording it, so the caller can retry.
        """
        self.driver.init_host()
        outcome = self.sync(full=True)
        if outcome is None:
            raise _LastError(self.last_error or "the initial sync failed")
        return outcome

    def sync(self, full: bool = False, min_generation: int | None = None,
             fresh: bool = False) -> reconciler_mod.Outcome | None:
        """Ask the conductor what changed since the applied generation (everything with ``full``); apply it.

        ``fresh``: see ``ConductorAPI.get_provider_fw_rules`` (after the cast consumer (re)connects).
        """
        since = None if full else self.reconciler.generation
        failed = None
        try:
            reply = self.conductor.get_provider_fw_rules(since, min_generation, fresh=fresh)
        except exception.RpcClientClosed:
            LOG.info("stopping: not asking the conductor")     # not an error to record or report
            return None
        except exception.ConductorUnavailable as exc:
            failed = f"ConductorUnavailable: {exc}"
        except exception.ProvfwError as exc:
            failed = f"conductor: {exc}"
        if failed is not None:
            # Recorded (and logged) outside the except: oslo.log appends the exception being handled to an
            # ERROR line, which would repeat the message.
            self._record_error(failed)
            return None
        applied = self.reconciler.generation
        if applied is not None and reply.generation < applied:
            # Generations only grow: an older answer (a conductor's stale cache, a database restored from a
            # backup) must never roll the kernel back.  Keep what is enforced; the next check asks again.
            self._record_error(f"the conductor answered generation {reply.generation}, older than the applied "
                               f"generation {applied}; keeping generation {applied}")
            return None
        if isinstance(reply, Snapshot):
            # The applied state of a large snapshot lives until the next one: built with the collector paused,
            # then frozen (gcpause.kept), as its rules were decoded.
            with gcpause.kept() if len(reply.rules) > KEEP_ABOVE_RULES else contextlib.nullcontext():
                return self._reconcile(lambda: self.reconciler.apply_snapshot(reply, again=full), "snapshot")
        if reply.since == reply.generation == self.reconciler.generation and not reply.size:
            return self._record_success(reconciler_mod.Outcome(reply.generation, self.reconciler.rule_count,
                                                               False, "none", 0.0, len(self.reconciler.quarantine())))
        if reply.since != self.reconciler.generation:
            # Another thread applied something meanwhile; the next cast or check converges.
            LOG.info("conductor delta %s->%s no longer follows generation %s; fetching again", reply.since,
                     reply.generation, self.reconciler.generation)
            return self.sync(full=self.reconciler.generation is None, min_generation=min_generation, fresh=fresh)
        return self._reconcile(lambda: self.reconciler.apply_change(reply), "conductor delta")

    def periodic_check(self, fresh: bool = False) -> None:
        """Converge on the conductor's generation; if already there (and due), repair kernel drift.

        ``fresh``: ask for a generation read after the request (see ``sync``).
        """
        before = self.reconciler.generation
        outcome = self.sync(full=before is None, fresh=fresh)
        if outcome is None or self.last_error or outcome.generation != before or outcome.mode != "none":
            return
        if time.monotonic() < self._next_drift_check:
            return
        started = time.monotonic()
        try:
            repaired = self.reconciler.repair_drift()
        except NotImplementedError:
            repaired = None
        except Exception as exc:  # noqa: BLE001 - record, keep running
            LOG.exception("drift check failed")
            metrics.DATAPLANE_APPLY_FAILURES.labels(self._driver_label).inc()
            self._record_error(f"drift check: {type(exc).__name__}: {exc}")
            repaired = None
        if repaired is not None:
            metrics.DATAPLANE_APPLY_SECONDS.labels(self._driver_label, repaired.mode).observe(repaired.seconds)
        if repaired is not None and repaired.changed:
            metrics.DATAPLANE_DRIFT_REPAIRS.labels(self._driver_label).inc()
            LOG.warning("kernel state had drifted from generation %s; repaired", repaired.generation)
            self._record_success(repaired)
        # Reading the kernel back is cheap for sets but takes seconds for a
        # 100k-rule linear chain (iptables-nft's save); spacing the checks by
        # DRIFT_CHECK_SPACING times their cost keeps them under ~10% of a core.
        self._next_drift_check = time.monotonic() + DRIFT_CHECK_SPACING * (time.monotonic() - started)

    def expire_rules(self) -> reconciler_mod.Outcome | None:
        """Stop enforcing expired rules (no conductor, bus or database needed)."""
        return self._reconcile(self.reconciler.expire, "expiry")

    def next_expiry(self) -> float | None:
        return self.reconciler.next_expiry()

    def report_state(self) -> bool:
        """Cast this host's state to the conductor (also the heartbeat); False when the bus is unreachable."""
        with self._state_lock:
            state = {
                "applied_generation": -1 if self.reconciler.generation is None else self.reconciler.generation,
                "rule_count": self.reconciler.rule_count, "driver": self.driver.describe(),
                "last_error": self.last_error, "quarantine": self.reconciler.quarantine(),
                "applied_at": self.applied_at,
            }
        try:
            self.conductor.report_provider_fw_state(**state)
            return True
        except exception.RpcClientClosed:
            LOG.debug("stopping: not reporting the state of %s", self.host)    # as in sync: not a warning
            return False
        except Exception as exc:  # noqa: BLE001 - the bus may be down; the kernel keeps its rules
            LOG.warning("could not report the state of %s: %s", self.host, exc)
            return False

    heartbeat = report_state

    def report_via(self, wake: Callable[[], None] | None) -> None:
        """Send the reports that follow an apply or an error through ``wake`` (``ComputeService``'s reporter,
        which coalesces them), or, with None, at once from the thread that applied."""
        self._report_soon = wake

    def request_report(self) -> None:
        """Report this host's state after an apply or an error: through the reporter when one runs, else now."""
        wake = self._report_soon
        if wake is None:
            self.report_state()
        else:
            wake()

    # ----------------------------------------------------------------- outcomes

    def _reconcile(self, func: Callable[[], Any], what: str) -> reconciler_mod.Outcome | None:
        try:
            outcome = func()
        except reconciler_mod.AlreadyApplied as exc:
            # A cast and the conductor's answer raced for the lock and the other one won: not a gap.
            LOG.debug("%s: %s", what, exc)
            return None
        except reconciler_mod.GenerationGap as exc:
            LOG.info("%s: %s; asking the conductor", what, exc)
            return self.sync()
        except NotImplementedError as exc:
            with self._state_lock:
                self.not_implemented = True
            metrics.DATAPLANE_APPLY_FAILURES.labels(self._driver_label).inc()
            self._record_error(f"{type(self.driver).__name__} does not implement the provider firewall: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - record, keep running, keep the old rules in force
            LOG.exception("%s: applying provider rules failed; the previously applied rules stay in force", what)
            metrics.DATAPLANE_APPLY_FAILURES.labels(self._driver_label).inc()
            self._record_error(f"{type(exc).__name__}: {exc}")
            return None
        if outcome is None:
            return None
        metrics.DATAPLANE_APPLY_SECONDS.labels(self._driver_label, outcome.mode).observe(outcome.seconds)
        return self._record_success(outcome)

    def _record_success(self, outcome: reconciler_mod.Outcome) -> reconciler_mod.Outcome:
        with self._state_lock:
            changed_generation = self.last_outcome is None or self.last_outcome.generation != outcome.generation
            had_error = self.last_error is not None
            self.last_outcome = outcome
            self.last_error = None
            if outcome.changed or changed_generation:
                self.applied_at = time.time()
        if outcome.changed or outcome.newly_quarantined:
            LOG.info("applied generation %s: %d rules (%d quarantined), %s in %.4fs", outcome.generation,
                     outcome.rule_count, outcome.quarantined, outcome.mode, outcome.seconds)
        if outcome.changed or changed_generation or had_error or outcome.newly_quarantined:
            self.request_report()
        return outcome

    def _record_error(self, message: str) -> None:
        with self._state_lock:
            repeated = self.last_error == message[:MAX_ERROR]
            self.last_error = message[:MAX_ERROR]
        if not repeated:
            LOG.error("%s", message)
            self.request_report()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _LastError(exception.ProvfwError):
    """The initial sync failed; the reason was recorded (and reported) already."""
