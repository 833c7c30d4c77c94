"""The worker's reconciler: the one owner of what this host enforces.

Design
------
Everything a worker knows about its rules lives here, nowhere else:

* ``rules``: spec -> ``Rule`` (id, expiry) for every rule the kernel enforces;
* ``quarantine``: spec -> (``Rule``, reason) for the rules this host's kernel
  refused - reported by id, never enforced, never stalling the others;
* ``generation``: the rule-set generation the kernel reflects (None until the
  first sync);
* ``driver_state``: what the firewall driver returned last time, handed back
  on its next call (drivers keep no bookkeeping).

Inputs are values - a ``Snapshot`` (from the conductor) or a ``Changes``
(from a cast, or a conductor delta) - never database rows.  The reconciler
turns them into one ``RuleUpdate`` for the compute driver:

* rows are matched by id: a removal only removes the spec if the host enforces
  it under that id, so a spec deleted and created again (or renewed with a new
  expiry) never leaves the kernel even if the two arrive out of order;
* rules already past their expiry are never sent to the kernel, and enforced
  rules are removed at their expiry by ``expire()`` (a heap of expiries; no
  conductor, bus or database needed);
* the decision "this change is too large for a delta, rebuild"
  (``[sets] full_rebuild_delta``) is taken here, once, for every driver.

State changes only after the driver returned: a refused apply leaves the
previous state (and the kernel, which drivers never leave half-written)
in force.  When the kernel refuses an update, the rules responsible are
found by bisecting the candidates with ``check_provider_fw_rules`` (which
changes nothing enforced), quarantined, and the update is applied without
them; new rules are searched first, so one bad rule among 120k costs a few
checks of small sets.  A failure that is not a rule's (the check of the
known-good ``PROBES`` fails too: a module gone, a lock held, libvirtd away)
is not quarantined: it propagates and the previous state stays.  Quarantined rules are retried on every full
apply (start-up, gap, drift repair of a changed host) and dropped when their
rule is deleted.

Thread-safety: every public method serialises on ``self._lock`` (the cast
consumer, the periodic check and the expiry loop call in concurrently).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import heapq
import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception
from provfw.rules import ANY, Changes, Rule, RuleSpec, Snapshot
from provfw.virt import driver as virt_driver
from provfw.virt.firewall.base import Applied, RuleUpdate

LOG = logging.getLogger(__name__)

MAX_REASON = 500
# Rules every working host takes (documentation networks, RFC 5737 / RFC 3849), one per family: the
# baseline that tells a rule's refusal from the host's.  Checks change nothing enforced.
PROBES = {4: RuleSpec("192.0.2.0/24", "all", ANY, ANY), 6: RuleSpec("2001:db8::/32", "all", ANY, ANY)}


class GenerationGap(Exception):
    """A change does not follow the applied generation; the caller must fetch from the conductor."""


class AlreadyApplied(GenerationGap):
    """A change whose generation is already applied (another path applied it first, e.g. the conductor's
    delta while the cast waited for the lock): nothing to do and nothing to fetch."""


@dataclasses.dataclass(frozen=True)
class Quarantined:
    rule: Rule
    reason: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one reconciliation did (for the state report, metrics and logs).

    ``mode``: ``full``, ``delta``, ``none``, ``expiry`` or ``repair``;
    ``seconds``: wall time of the driver call(s), quarantine search included.
    """

    generation: int | None
    rule_count: int
    changed: bool
    mode: str
    seconds: float
    quarantined: int
    newly_quarantined: tuple[RuleSpec, ...] = ()


class _PendingSpecs(collections.abc.Collection):
    """``base`` minus ``removed`` plus ``added``, without copying ``base`` (120k specs cost a copy per delta).

    Invariants the reconciler keeps: ``added`` is disjoint from ``base``,
    ``removed`` is a subset of ``base``.
    """

    def __init__(self, base: Mapping[RuleSpec, Any] | collections.abc.Set, added: Iterable[RuleSpec] = (),
                 removed: collections.abc.Set = frozenset()):
        self._base = base
        self._added = list(added)
        self._removed = removed

    def __len__(self) -> int:
        return len(self._base) - len(self._removed) + len(self._added)

    def __iter__(self) -> Iterator[RuleSpec]:
        removed = self._removed
        if removed:
            yield from (spec for spec in self._base if spec not in removed)
        else:
            yield from self._base
        yield from self._added

    def __contains__(self, spec: object) -> bool:
        return (spec in self._base and spec not in self._removed) or spec in self._added


class Reconciler:
    """Applies snapshots and changes through a compute driver and owns the applied state."""

    def __init__(self, compute_driver: virt_driver.ComputeDriver, conf: cfg.ConfigOpts = provfw_conf.CONF,
                 clock: Callable[[], float] = time.time):
        self.driver = compute_driver
        self.conf = conf
        self.clock = clock
        self._lock = threading.RLock()
        self._rules: dict[RuleSpec, Rule] = {}
        self._quarantine: dict[RuleSpec, Quarantined] = {}
        self._expiries: list[tuple[float, int, RuleSpec]] = []       # heap; stale entries skipped lazily
        self.generation: int | None = None
        self.driver_state: Any = None
        self._commits = 0          # driver states recorded; a drift check only records over the one it read

    # ------------------------------------------------------------ reads

    @property
    def rule_count(self) -> int:
        return len(self._rules)

    def enforced(self) -> dict[RuleSpec, Rule]:
        """A copy of spec -> Rule for what the kernel enforces."""
        with self._lock:
            return dict(self._rules)

    def quarantine(self) -> list[dict]:
        """``[{"id", "cidr", "protocol", "from_port", "to_port", "reason"}]``, sorted by id."""
        with self._lock:
            return sorted(({"id": q.rule.id, **q.rule.spec.as_dict(), "reason": q.reason}
                           for q in self._quarantine.values()), key=lambda item: item["id"])

    def next_expiry(self) -> float | None:
        """POSIX seconds of the earliest expiry of an enforced rule, or None."""
        with self._lock:
            self._drop_stale_expiries()
            return self._expiries[0][0] if self._expiries else None

    # ------------------------------------------------------------ inputs

    def apply_snapshot(self, snapshot: Snapshot, again: bool = False) -> Outcome:
        """Make the host enforce exactly ``snapshot`` (a full rebuild against the kernel).

        AlreadyApplied when ``snapshot`` is of the applied generation, unless
        ``again``: the periodic check and a cast's catch-up both asked the
        conductor during a bulk import, one applied the snapshot, and the other
        rebuilt the same 120k rules again, holding this lock for its whole
        length (0.5-0.65 s) while the next cast's one-rule change waited
        (found by bench_e2e_scale.py: the first +1 CIDR after the import).
        """
        with self._lock:
            if not again and self.generation is not None and snapshot.generation == self.generation:
                raise AlreadyApplied(f"snapshot of generation {snapshot.generation} is applied already")
            now = self.clock()
            desired = {rule.spec: rule for rule in snapshot.rules
                       if rule.expires_at is None or rule.expires_at > now}
            enforced = self._rules

            def candidates() -> list[list[RuleSpec]]:
                # The rules new to this host first: a refusal is more likely theirs.
                return [[s for s in desired if s not in enforced], [s for s in desired if s in enforced]]

            started = time.monotonic()
            applied, refused = self._refresh(lambda excluded: RuleUpdate.rebuild(
                _PendingSpecs(desired, (), excluded)), candidates)
            self._rules = {s: r for s, r in desired.items() if s not in refused} if refused else desired
            self._quarantine = {s: Quarantined(desired[s], reason) for s, reason in refused.items()}
            self._rebuild_expiries()
            return self._commit(snapshot.generation, applied, started, refused)

    def apply_change(self, change: Changes) -> Outcome:
        """Apply ``change``, which must follow the applied generation; GenerationGap otherwise (its subclass
        AlreadyApplied when the change's generation is applied already)."""
        with self._lock:
            if self.generation is not None and change.generation <= self.generation:
                raise AlreadyApplied(f"change {change.since}->{change.generation}: generation {self.generation} "
                                     "is applied already")
            if self.generation is None or change.since != self.generation:
                raise GenerationGap(f"change {change.since}->{change.generation} does not follow the applied "
                                    f"generation {self.generation}")
            now = self.clock()
            rules, quarantine = self._rules, self._quarantine
            kernel_remove: set[RuleSpec] = set()
            quarantine_drop: set[RuleSpec] = set()
            for rule in change.removed:
                current = rules.get(rule.spec)
                if current is not None and current.id == rule.id:
                    kernel_remove.add(rule.spec)
                held = quarantine.get(rule.spec)
                if held is not None and held.rule.id == rule.id:
                    quarantine_drop.add(rule.spec)
            kernel_add: dict[RuleSpec, Rule] = {}
            relabel: dict[RuleSpec, Rule] = {}         # same spec, new id or expiry: the kernel keeps it
            requarantine: dict[RuleSpec, Rule] = {}
            for rule in change.added:
                spec = rule.spec
                if rule.expires_at is not None and rule.expires_at <= now:
                    continue
                if spec in quarantine and spec not in quarantine_drop:
                    requarantine[spec] = rule
                elif spec in kernel_remove:
                    kernel_remove.discard(spec)
                    relabel[spec] = rule
                elif spec in rules:
                    relabel[spec] = rule
                else:
                    kernel_add[spec] = rule
            started = time.monotonic()
            full = len(kernel_add) + len(kernel_remove) > self.conf.sets.full_rebuild_delta

            def update(excluded: collections.abc.Set) -> RuleUpdate:
                adding = [s for s in kernel_add if s not in excluded]
                view = _PendingSpecs(rules, adding, kernel_remove)
                return RuleUpdate(view, adding, sorted(kernel_remove), full=full)

            def candidates() -> list[list[RuleSpec]]:
                if full:
                    return [list(kernel_add), [s for s in rules if s not in kernel_remove]]
                return [list(kernel_add)]

            applied, refused = self._refresh(update, candidates)
            for spec in kernel_remove:
                del rules[spec]
            for spec in quarantine_drop:
                del quarantine[spec]
            for spec, rule in kernel_add.items():
                if spec in refused:
                    quarantine[spec] = Quarantined(rule, refused[spec])
                else:
                    rules[spec] = rule
                    self._push_expiry(rule)
            for spec, rule in relabel.items():
                rules[spec] = rule
                self._push_expiry(rule)
            for spec, rule in requarantine.items():
                quarantine[spec] = Quarantined(rule, quarantine[spec].reason)
            return self._commit(change.generation, applied, started, refused)

    def expire(self) -> Outcome | None:
        """Stop enforcing rules whose expiry has passed; None when none has."""
        with self._lock:
            now = self.clock()
            due: list[RuleSpec] = []
            while self._expiries and self._expiries[0][0] <= now:
                expires, rule_id, spec = heapq.heappop(self._expiries)
                current = self._rules.get(spec)
                if current is not None and current.id == rule_id and current.expires_at == expires:
                    due.append(spec)
            for spec, held in list(self._quarantine.items()):
                if held.rule.expires_at is not None and held.rule.expires_at <= now:
                    del self._quarantine[spec]
            if not due or self.generation is None:
                return None
            started = time.monotonic()
            gone = set(due)
            applied = self.driver.refresh_provider_fw_rules(
                RuleUpdate(_PendingSpecs(self._rules, (), gone), (), due), self.driver_state)
            for spec in due:
                del self._rules[spec]
            self.driver_state = applied.state
            self._commits += 1
            LOG.info("stopped enforcing %d expired rule(s)", len(due))
            return Outcome(self.generation, len(self._rules), True, "expiry", time.monotonic() - started,
                           len(self._quarantine))

    def repair_drift(self) -> Outcome | None:
        """Re-read the kernel and rewrite what someone else changed; None before the first sync."""
        with self._lock:
            if self.generation is None:
                return None
            started = time.monotonic()
            # A copy, and the lock released while the driver reads the kernel: a cast arriving meanwhile is
            # applied at once (the driver then drops this check instead of writing what it read before).
            desired, state, commits = frozenset(self._rules), self.driver_state, self._commits
        applied: Applied = self.driver.repair_provider_fw_drift(desired, state)
        with self._lock:
            if self._commits != commits:
                return Outcome(self.generation, len(self._rules), False, "none", time.monotonic() - started,
                               len(self._quarantine))
            self.driver_state = applied.state
            self._commits += 1
            return Outcome(self.generation, len(self._rules), applied.changed,
                           "none" if applied.mode == "none" else "repair",
                           time.monotonic() - started, len(self._quarantine))

    # ------------------------------------------------------------ internals

    def _refresh(self, make_update: Callable[[collections.abc.Set], RuleUpdate],
                 candidates: Callable[[], list[list[RuleSpec]]]) -> tuple[Applied, dict[RuleSpec, str]]:
        """Call the driver; on a refusal, quarantine the rules responsible and apply the rest.

        ``candidates`` makes the groups of specs to bisect, only on a refusal
        (two 120k-spec lists per snapshot cost 0.05 s otherwise).
        """
        try:
            return self.driver.refresh_provider_fw_rules(make_update(frozenset()), self.driver_state), {}
        except exception.DriverError as refusal:
            refused = self._find_refused(candidates(), refusal)
            if not refused:
                raise
            LOG.error("the kernel refused %d rule(s); quarantining them and applying the rest: %s", len(refused),
                      "; ".join(f"{spec.cidr} {spec.protocol} {spec.from_port}:{spec.to_port}"
                                for spec in list(refused)[:10]))
            return self.driver.refresh_provider_fw_rules(make_update(frozenset(refused)), self.driver_state), refused

    def _find_refused(self, groups: list[list[RuleSpec]], refusal: exception.DriverError) -> dict[RuleSpec, str]:
        """The candidates the kernel refuses, by spec, with the tool's message; {} when the host is at fault."""
        versions = {spec.version for group in groups for spec in group}
        if not versions:
            return {}
        # A rule is to blame only if the host takes a rule it must take: when the check of the known-good
        # probes fails too (a kernel module gone, the xtables lock held, libvirtd away), nothing is
        # quarantined and the update fails as a whole, to be retried.  An empty check would prove nothing
        # (the kernel drivers run no tool for it), and "every candidate refused" is no sign of a host
        # problem: block_ips of one bad CIDR is three rules, all refused.
        try:
            self.driver.check_provider_fw_rules([PROBES[version] for version in sorted(versions)])
        except exception.DriverError as exc:
            LOG.warning("a check of known-good rules fails too: the refusal is the host's, not a rule's (%s; %s)",
                        exc, refusal)
            return {}
        refused: dict[RuleSpec, str] = {}
        for group in groups:
            self._bisect(group, refused)
        return refused

    def _bisect(self, specs: list[RuleSpec], refused: dict[RuleSpec, str]) -> None:
        if not specs:
            return
        try:
            self.driver.check_provider_fw_rules(specs)
            return
        except exception.DriverError as exc:
            if len(specs) == 1:
                refused[specs[0]] = str(exc)[:MAX_REASON]
                return
        middle = len(specs) // 2
        self._bisect(specs[:middle], refused)
        self._bisect(specs[middle:], refused)

    def _commit(self, generation: int, applied: Applied, started: float,
                refused: Mapping[RuleSpec, str]) -> Outcome:
        self.generation = generation
        self.driver_state = applied.state
        self._commits += 1
        return Outcome(generation, len(self._rules), applied.changed or bool(refused), applied.mode,
                       time.monotonic() - started, len(self._quarantine), tuple(refused))

    def _push_expiry(self, rule: Rule) -> None:
        if rule.expires_at is not None:
            heapq.heappush(self._expiries, (rule.expires_at, rule.id, rule.spec))

    def _rebuild_expiries(self) -> None:
        self._expiries = [(r.expires_at, r.id, s) for s, r in self._rules.items() if r.expires_at is not None]
        heapq.heapify(self._expiries)

    def _drop_stale_expiries(self) -> None:
        while self._expiries:
            expires, rule_id, spec = self._expiries[0]
            current = self._rules.get(spec)
            if current is not None and current.id == rule_id and current.expires_at == expires:
                return
            heapq.heappop(self._expiries)
