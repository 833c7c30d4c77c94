"""What the worker's reconciler keeps for one firewall driver, for tests and benchmarks that drive a driver.

``AppliedRules`` holds the desired rules and the driver's state and hands
both back on every call, exactly as ``provfw.compute.reconciler`` does, minus
generations, expiry and the bus.  It records a call's outcome only when the
driver returned (a ``DriverError`` leaves the previous rules and state), so a
test sees what the reconciler would see.  The driver is real; nothing here
writes a driver's private fields.
"""

from __future__ import annotations

from typing import Any, Iterable

from provfw.rules import RuleSpec
from provfw.virt.firewall import Applied, FirewallDriver, RuleUpdate


class AppliedRules:
    def __init__(self, driver: FirewallDriver, state: Any = None):
        self.driver = driver
        self.desired: frozenset[RuleSpec] = frozenset()
        self.state = state
        self.last: Applied | None = None

    def apply(self, added: Iterable[RuleSpec] = (), removed: Iterable[RuleSpec] = ()) -> Applied:
        """The change since the previous successful call, as a delta where the driver can."""
        added = tuple(s for s in dict.fromkeys(added) if s not in self.desired)
        removed = tuple(s for s in dict.fromkeys(removed) if s in self.desired)
        desired = (self.desired - set(removed)) | set(added)
        return self._record(desired, self.driver.refresh_provider_fw_rules(
            RuleUpdate(desired, added, removed), self.state))

    def block(self, *specs: RuleSpec) -> Applied:
        return self.apply(added=specs)

    def unblock(self, *specs: RuleSpec) -> Applied:
        return self.apply(removed=specs)

    def rebuild(self, specs: Iterable[RuleSpec]) -> Applied:
        """Make the driver hold exactly ``specs`` with a full plan (RuleUpdate.rebuild)."""
        desired = frozenset(specs)
        return self._record(desired, self.driver.refresh_provider_fw_rules(RuleUpdate.rebuild(desired), self.state))

    def repair(self) -> Applied:
        """The periodic drift check: the driver re-reads the kernel against what was applied."""
        return self._record(self.desired, self.driver.repair_drift(self.desired, self.state))

    def _record(self, desired: frozenset, applied: Applied) -> Applied:
        self.desired, self.state, self.last = desired, applied.state, applied
        return applied
