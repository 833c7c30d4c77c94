"""The firewall driver seam: values in, one ordered apply, what was applied out.

Design
------
The worker's reconciler (``provfw.compute.reconciler``) owns the applied
state: the rules with their ids and expiry, the applied generation, and each
driver's own record of what the kernel accepted (``Applied.state``).  A
firewall driver never reads the database or the bus and keeps no
bookkeeping between calls: it is handed values - the desired rules, the
change since its previous call, and the ``state`` it returned then - and it
returns what it applied.  A test sets up a delta by passing values, never by
writing a driver's private fields.

A driver contributes *plans*, computed by pure functions from those values
(and, for a full plan, from what the kernel holds now).  ``execute`` is the
one place that writes, always in the same order (Calico Felix's
``InternalDataplane.apply()``):

1. ``sets``      - create, fill, swap, add/del members (``ipset restore``, ...);
2. ``chains``    - what references the sets (``iptables-restore --noflush``,
   ``nft -f``, a libvirt nwfilter define, a libiptc commit);
3. ``deletions`` - sets nothing references any more; a failure here is logged
   and left for the next apply, never raised: it cannot let traffic through.

So a rule never references a set that does not exist yet and a set is never
destroyed while a rule still uses it.  A failing step runs its own
``cleanup`` (e.g. destroy a half-filled scratch set) and raises
``DriverError``; steps after it do not run, and the reconciler keeps the
previous state as applied.

The decision "this change is too large for a delta, rebuild" is the
reconciler's (it sets ``RuleUpdate.full``).  A driver's ``plan_delta`` may
only answer "not as a delta" (``None``: a set appears or empties, a mode
switch), and ``refresh_provider_fw_rules`` then plans a full rebuild; a
delta plan the kernel refuses (someone deleted an element we now delete) is
retried once as a full plan, which reads the kernel and repairs it.

Thread-safety: ``refresh_provider_fw_rules``, ``check_provider_fw_rules``,
``repair_drift`` and ``teardown`` serialise on an in-process lock and the
per-host file lock (``provfw.hostlock``), so one writer touches a dataplane
at a time even across processes.  Plans and states are immutable values.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import threading
import time
import types
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence, Union

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, hostlock, runner as runner_mod
from provfw.rules import RuleSpec

LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- values

@dataclasses.dataclass(frozen=True)
class RuleUpdate:
    """What the reconciler asks a driver to make true.

    ``desired`` is every rule spec that must be enforced after this update (a
    read-only collection; ``len()`` is O(1), iterating it is O(rules)).
    ``added``/``removed`` are the change since the driver's previous
    successful call, disjoint, already reflected in ``desired``.  With
    ``full`` the driver ignores the change and rebuilds from ``desired``
    against what the kernel holds.
    """

    desired: Collection[RuleSpec]
    added: Sequence[RuleSpec] = ()
    removed: Sequence[RuleSpec] = ()
    full: bool = False

    @classmethod
    def rebuild(cls, desired: Collection[RuleSpec]) -> "RuleUpdate":
        return cls(desired, full=True)


@dataclasses.dataclass(frozen=True)
class Applied:
    """What one call applied.

    ``state`` is the driver's own record of what the kernel accepted (set
    sizes, member counts, match mode...): opaque to the reconciler, which
    stores it and hands it back on the next call.  ``mode`` is ``full``,
    ``delta`` or ``none``; ``seconds`` is wall time including the kernel write.
    """

    state: Any
    changed: bool
    mode: str
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Command:
    """Run ``argv`` through the driver's runner, with ``input`` on stdin.

    ``cleanup`` commands run (unchecked) when this one fails, before the
    DriverError propagates - e.g. destroying scratch sets a failed fill left.
    """

    argv: tuple[str, ...]
    input: str | None = None
    cleanup: tuple[tuple[str, ...], ...] = ()
    what: str = ""

    def describe(self) -> str:
        return self.what or " ".join(self.argv[:4])


@dataclasses.dataclass(frozen=True)
class Call:
    """Run ``func()`` (a libvirt define, a filterref update...).

    ``func`` returns whether it changed anything (``None`` counts as a
    change); it raises ``DriverError`` on failure.  ``cleanup`` commands run
    (unchecked, through the runner) when it fails, as for ``Command``.
    """

    func: Callable[[], Any]
    what: str
    cleanup: tuple[tuple[str, ...], ...] = ()

    def describe(self) -> str:
        return self.what


Step = Union[Command, Call]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The writes of one apply, by phase, and the driver state once they succeeded."""

    state: Any
    sets: tuple[Step, ...] = ()
    chains: tuple[Step, ...] = ()
    deletions: tuple[Step, ...] = ()
    mode: str = "full"

    @property
    def empty(self) -> bool:
        return not (self.sets or self.chains or self.deletions)

    def steps(self) -> Iterable[Step]:
        yield from self.sets
        yield from self.chains
        yield from self.deletions


def execute(plan: Plan, runner: runner_mod.Runner) -> bool:
    """Write ``plan`` in the one apply order: sets, then chains, then deletions.

    Returns whether anything was written.  Raises ``DriverError`` (carrying
    the failing command and, for restore tools, the failing input line) when
    a set or chain step fails; deletion failures are logged only.
    """
    changed = False
    for step in plan.sets + plan.chains:
        changed = _run(step, runner) or changed
    for step in plan.deletions:
        try:
            changed = _run(step, runner) or changed
        except exception.DriverError as exc:
            LOG.warning("deferred to the next apply: %s failed: %s", step.describe(), exc)
    return changed


def _run(step: Step, runner: runner_mod.Runner) -> bool:
    try:
        if isinstance(step, Call):
            result = step.func()
            return True if result is None else bool(result)
        runner(list(step.argv), input=step.input)
        return True
    except Exception:
        # Scratch objects the failed step left (a half-filled set) must not outlive it;
        # a cleanup that fails too must not hide the step's own error.
        for cleanup in step.cleanup:
            try:
                runner(list(cleanup), check=False)
            except exception.DriverError as exc:
                LOG.warning("cleanup %s failed: %s", " ".join(cleanup[:4]), exc)
        raise


def frozen_mapping(mapping: Mapping) -> Mapping:
    """A read-only view of a private copy, for driver states: a state handed out never changes under its holder."""
    return types.MappingProxyType(dict(mapping))


# --------------------------------------------------------------------------- drivers

class FirewallDriver:
    """Base class of firewall drivers (kept from the seed: it does nothing itself).

    Every method raises NotImplementedError here; the compute manager records
    that as "not implemented" on the host's service state and keeps running.
    """

    name = "base"

    def refresh_provider_fw_rules(self, update: RuleUpdate, state: Any = None) -> Applied:
        """Make the kernel enforce ``update.desired``; return what was applied.

        Raises ``DriverError`` when the kernel (or libvirt) refused; the
        previous kernel state then stays in force.
        """
        raise NotImplementedError()

    def check_provider_fw_rules(self, specs: Collection[RuleSpec]) -> None:
        """Raise ``DriverError`` if the kernel would refuse ``specs``; change nothing live.

        The reconciler bisects a refused update with this to find the rules a
        host cannot enforce (quarantine) while the rest apply.
        """
        raise NotImplementedError()

    def repair_drift(self, desired: Collection[RuleSpec], state: Any = None) -> Applied:
        """Re-read the kernel and rewrite what someone else changed; ``changed`` says if anything was."""
        raise NotImplementedError()

    def after_stop(self) -> str:
        """What stays enforced once the worker stopped (the stop line of the log): the kernel's rules stay
        until a worker changes them or ``provfw-manage dataplane teardown`` removes them."""
        return "the kernel keeps the rules last applied"

    def teardown(self) -> None:
        """Remove everything this driver put in the kernel."""
        raise NotImplementedError()

    def close(self) -> None:
        """Release connections (libvirt)."""


class PlannedFirewallDriver(FirewallDriver, abc.ABC):
    """A real driver: pure plans, written by ``execute`` under the per-host lock."""

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None):
        self.conf = conf
        self.runner = runner or runner_mod.Runner(conf.compute.dataplane_netns)
        self._lock = threading.RLock()
        self._lock_name = "apply-" + (conf.compute.dataplane_netns or "host")
        self._writes = 0          # times the dataplane lock was taken to write: see repair_drift

    # ------------------------------------------------------------ what a driver provides

    @abc.abstractmethod
    def plan_full(self, desired: Collection[RuleSpec]) -> Plan:
        """Read the kernel and plan the writes that make it hold exactly ``desired``.

        An empty plan means the kernel already matches.  The plan's ``state``
        describes the kernel once the plan is written.
        """

    def plan_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec], state: Any,
                   desired_count: int) -> Plan | None:
        """Plan ``added``/``removed`` from ``state`` alone (no kernel read); ``None`` = do a full plan.

        ``desired_count`` is how many specs are desired after the change.
        The default: every change is a full plan (the linear chain).
        """
        return None

    @abc.abstractmethod
    def plan_check(self, specs: Collection[RuleSpec]) -> Plan:
        """A plan that makes the kernel tools parse ``specs`` without changing what is enforced.

        (``iptables-restore --test``, ``nft -c``, a scratch ipset or nwfilter
        that the plan also removes.)
        """

    # ------------------------------------------------------------ the one apply path

    @contextlib.contextmanager
    def applying(self):
        """The in-process lock and the per-host file lock: one writer per dataplane."""
        with self._lock, hostlock.external_lock(provfw_conf.lock_dir(self.conf), self._lock_name):
            self._writes += 1
            yield

    def refresh_provider_fw_rules(self, update: RuleUpdate, state: Any = None) -> Applied:
        started = time.monotonic()
        with self.applying():
            if not update.full and state is not None:
                if not update.added and not update.removed:
                    return Applied(state, False, "none", time.monotonic() - started)
                plan = self.plan_delta(update.added, update.removed, state, len(update.desired))
                if plan is not None:
                    try:
                        changed = execute(plan, self.runner)
                        return Applied(plan.state, changed, "delta", time.monotonic() - started)
                    except exception.DriverError as exc:
                        LOG.warning("%s: delta refused (%s); applying the full state instead", self.name, exc)
            plan = self.plan_full(update.desired)
            changed = execute(plan, self.runner)
            return Applied(plan.state, changed, "full", time.monotonic() - started)

    def repair_drift(self, desired: Collection[RuleSpec], state: Any = None) -> Applied:
        """Re-read the kernel and rewrite what someone else changed, without holding up applies meanwhile.

        The kernel is read and the plan made outside the dataplane lock: at 120k rules the read alone takes
        0.5 s (``ipset save``) to 1.5 s (``nft list``), and a change arriving meanwhile used to wait for it
        (the end-to-end bench's +1 CIDR p99 was the drift check's time).  The plan is written only if nothing
        took the lock since it was read; otherwise what was read may be older than the kernel, the check
        gives up (mode ``none``: nothing written, ``state`` unchanged) and the next one looks again.
        """
        started = time.monotonic()
        seen = self._writes
        plan = self.plan_full(desired)
        with self.applying():
            if self._writes != seen + 1:
                LOG.info("%s: drift check skipped: an apply ran while the kernel was being read", self.name)
                return Applied(state, False, "none", time.monotonic() - started)
            changed = execute(plan, self.runner)
        if changed:
            LOG.warning("%s: kernel state had drifted from what was applied; repaired", self.name)
        return Applied(plan.state, changed, "full", time.monotonic() - started)

    def check_provider_fw_rules(self, specs: Collection[RuleSpec]) -> None:
        with self.applying():
            execute(self.plan_check(specs), self.runner)


class NoopFirewallDriver(PlannedFirewallDriver):
    """Enforces nothing (API-only hosts, tests of the reconciler); every plan is empty."""

    name = "noop"

    def plan_full(self, desired: Collection[RuleSpec]) -> Plan:
        return Plan(state=len(desired))

    def plan_delta(self, added, removed, state, desired_count) -> Plan:
        return Plan(state=desired_count, mode="delta")

    def plan_check(self, specs: Collection[RuleSpec]) -> Plan:
        return Plan(state=None)

    def after_stop(self) -> str:
        return "nothing was enforced (the noop firewall driver)"

    def teardown(self) -> None:
        pass
