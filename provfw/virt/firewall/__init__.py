"""Firewall drivers: turn the provider rules in the database into kernel state.

Design
------
``FirewallDriver`` is the seed's interface: ``refresh_provider_fw_rules``
raises NotImplementedError on the base class.  ``ProviderFirewallBase`` holds
what every real driver shares:

* it reads rules only through ``provfw.db.api`` - a full snapshot at start,
  when forced, or when the delta is large; otherwise only the changes since
  the generation it applied;
* it keeps ``self._rules`` (spec -> expiry), the state the kernel last
  accepted, and updates it only after the driver's apply step succeeded, so
  a failed apply leaves both kernel and bookkeeping on the previous state;
* it removes expired rules from the kernel at their expiry without asking
  the database (``expire_rules``), so expiry holds while the API or the
  database is down;
* it serialises applies with an in-process lock and a per-host file lock
  (one writer per dataplane).

A concrete driver implements ``apply_full(specs)`` - compute the desired
state from ``specs``, diff it against the kernel, write the difference in
one atomic step, return whether anything was written - and optionally
``apply_delta(added, removed)``.  ``repair_drift`` re-runs ``apply_full`` with
the bookkeeping, which writes nothing when the kernel still matches.

Thread-safety: all public methods may be called from any thread/greenthread;
they serialise on ``self._lock``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from typing import Iterable, Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, hostlock, runner as runner_mod
from provfw.db import api as db
from provfw.rules import RuleSpec
from provfw.virt import iptables

LOG = logging.getLogger(__name__)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    """What one refresh did."""

    generation: int
    rule_count: int
    changed: bool
    mode: str            # "full", "delta", "none", "expiry", "repair"
    seconds: float = 0.0


class FirewallDriver:
    """Base class of firewall drivers (kept from the seed: it does nothing itself)."""

    name = "base"

    def refresh_provider_fw_rules(self, full: bool = False) -> ApplyResult:
        """Bring the kernel in line with the provider rules in the database."""
        raise NotImplementedError()

    def repair_drift(self) -> bool:
        """Re-check the kernel against what was applied; rewrite it if someone changed it."""
        raise NotImplementedError()

    def expire_rules(self) -> ApplyResult | None:
        """Stop enforcing rules whose expiry has passed (no database access)."""
        return None

    def next_expiry(self) -> datetime.datetime | None:
        return None

    @property
    def applied_generation(self) -> int | None:
        return None

    def teardown(self) -> None:
        """Remove everything this driver put in the kernel."""
        raise NotImplementedError()


class ProviderFirewallBase(FirewallDriver):
    """Shared database reading, bookkeeping, locking and expiry for real drivers."""

    supports_delta = False

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None):
        self.conf = conf
        self.runner = runner or runner_mod.Runner(conf.compute.dataplane_netns)
        self._lock = threading.RLock()
        self._rules: dict[RuleSpec, datetime.datetime | None] = {}
        # The subset of _rules that expires: what the expiry timer scans.
        self._expiring: dict[RuleSpec, datetime.datetime] = {}
        self._generation: int | None = None
        self._lock_name = "apply-" + (conf.compute.dataplane_netns or "host")

    # ------------------------------------------------------------ driver hooks

    def apply_full(self, specs: Sequence[RuleSpec]) -> bool:
        """Make the kernel hold exactly ``specs``; return True if anything was written."""
        raise NotImplementedError()

    def apply_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec]) -> bool:
        """Add and remove specs in one step (drivers with ``supports_delta``)."""
        raise NotImplementedError()

    # ------------------------------------------------------------ public API

    @property
    def applied_generation(self) -> int | None:
        return self._generation

    @property
    def rule_count(self) -> int:
        return len(self._rules)

    def applied_specs(self) -> list[RuleSpec]:
        with self._lock:
            return list(self._rules)

    def next_expiry(self) -> datetime.datetime | None:
        with self._lock:
            return min(self._expiring.values()) if self._expiring else None

    def _commit(self, generation: int | None, removed=(), added: dict | None = None,
                replace: dict | None = None) -> None:
        """Record what the kernel now holds; called only after the driver's apply succeeded.

        Deltas mutate the bookkeeping in place instead of copying it: at 120k
        rules a copy and a scan for expiries cost more than the kernel write.
        """
        if replace is not None:
            self._rules = replace
            self._expiring = {s: e for s, e in replace.items() if e is not None}
        for spec in removed:
            self._rules.pop(spec, None)
            self._expiring.pop(spec, None)
        for spec, expires in (added or {}).items():
            self._rules[spec] = expires
            if expires is None:
                self._expiring.pop(spec, None)
            else:
                self._expiring[spec] = expires
        if generation is not None:
            self._generation = generation

    def refresh_provider_fw_rules(self, full: bool = False) -> ApplyResult:
        started = time.monotonic()
        with self._lock, hostlock.external_lock(provfw_conf.lock_dir(self.conf), self._lock_name):
            now = utcnow()
            if full or self._generation is None or not self.supports_delta:
                return self._full_from_db(now, started)
            changes = db.provider_fw_changes_since(self._generation)
            current = self._rules
            removed = [s for s in changes.removed if s in current]
            removed_set = set(removed)
            added: list[RuleSpec] = []
            arriving: dict[RuleSpec, datetime.datetime | None] = {}
            for spec, expires in changes.added:
                if expires is not None and expires <= now:
                    continue
                if spec not in current or spec in removed_set:
                    added.append(spec)
                arriving[spec] = expires
            # Only rules that carry an expiry are looked at, not every rule.
            expired = [s for s, e in self._expiring.items()
                       if e <= now and s not in removed_set and s not in arriving]
            removed += expired
            # A spec deleted and created again inside the window is still wanted and the
            # kernel already holds it: passing it as both added and removed would let a
            # driver that applies removals last unblock it.
            readded = set(added) & set(removed)
            if readded:
                added = [s for s in added if s not in readded]
                removed = [s for s in removed if s not in readded]
            if len(added) + len(removed) > self.conf.sets.full_rebuild_delta:
                return self._full_from_db(now, started)
            changed = bool(added or removed) and self.apply_delta(added, removed)
            self._commit(changes.generation, removed=[s for s in removed if s not in arriving], added=arriving)
            return ApplyResult(changes.generation, len(self._rules), changed,
                               "delta" if changed else "none", time.monotonic() - started)

    def _full_from_db(self, now: datetime.datetime, started: float) -> ApplyResult:
        snapshot = db.provider_fw_snapshot(now)
        desired = dict(snapshot.rules)
        changed = self.apply_full(list(desired))
        self._commit(snapshot.generation, replace=desired)
        return ApplyResult(snapshot.generation, len(desired), changed, "full", time.monotonic() - started)

    def expire_rules(self) -> ApplyResult | None:
        started = time.monotonic()
        with self._lock:
            now = utcnow()
            expired = [s for s, e in self._expiring.items() if e <= now]
            if not expired or self._generation is None:
                return None
            with hostlock.external_lock(provfw_conf.lock_dir(self.conf), self._lock_name):
                if self.supports_delta:
                    self.apply_delta([], expired)
                else:
                    gone = set(expired)
                    self.apply_full([s for s in self._rules if s not in gone])
                self._commit(None, removed=expired)
            LOG.info("stopped enforcing %d expired rule(s)", len(expired))
            return ApplyResult(self._generation, len(self._rules), True, "expiry", time.monotonic() - started)

    def repair_drift(self) -> bool:
        with self._lock:
            if self._generation is None:
                return False
            with hostlock.external_lock(provfw_conf.lock_dir(self.conf), self._lock_name):
                repaired = self.apply_full(list(self._rules))
        if repaired:
            LOG.warning("%s: kernel state had drifted from generation %s; repaired", self.name, self._generation)
        return repaired


class NoopFirewallDriver(ProviderFirewallBase):
    """Tracks rules and generations but touches no kernel state (for API-only or test hosts)."""

    name = "noop"
    supports_delta = True

    def apply_full(self, specs: Sequence[RuleSpec]) -> bool:
        return False

    def apply_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec]) -> bool:
        return False

    def teardown(self) -> None:
        self._commit(None, replace={})


class IptablesFirewallDriver(ProviderFirewallBase):
    """The seed's layout: FORWARD -> nova-provider (DROPs ... -j nova-local), for IPv4 and IPv6.

    Each apply reads ``iptables-save -t filter``, renders the provider chain,
    and writes only when the kernel differs, as ONE ``iptables-restore
    --noflush`` transaction per family.  The linear chain costs one rule per
    spec per packet; the set-based drivers are for large block lists.
    """

    name = "iptables"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, runner: runner_mod.Runner | None = None):
        super().__init__(conf, runner)
        self.layout = iptables.ChainLayout(conf.iptables.provider_chain, conf.iptables.local_chain,
                                           conf.iptables.forward_chain)

    def _tool(self, version: int, action: str) -> list[str]:
        base = "iptables" if version == 4 else "ip6tables"
        backend = self.conf.iptables.backend
        flavour = "" if backend == "auto" else f"-{backend}"
        cmd = [f"{base}{flavour}-{action}"]
        if action == "restore":
            cmd += ["--noflush", "--wait", str(self.conf.iptables.wait_seconds)]
        else:
            cmd += ["-t", "filter"]
        return cmd

    def kernel_state(self, version: int) -> iptables.TableState:
        return iptables.parse_save(self.runner(self._tool(version, "save")))

    def apply_full(self, specs: Sequence[RuleSpec]) -> bool:
        changed = False
        for version in (4, 6):
            desired = iptables.desired_provider_rules(specs, version, self.layout)
            restore = iptables.build_restore(self.kernel_state(version), desired, self.layout)
            if restore is None:
                continue
            self.runner(self._tool(version, "restore"), input=restore)
            changed = True
        return changed

    def teardown(self) -> None:
        with self._lock:
            for version in (4, 6):
                removal = iptables.build_removal(self.kernel_state(version), self.layout)
                if removal:
                    self.runner(self._tool(version, "restore"), input=removal)
            self._commit(None, replace={})
            self._generation = None


FIREWALL_DRIVER_ALIASES = {
    "iptables": "provfw.virt.firewall.IptablesFirewallDriver",
    "IptablesFirewallDriver": "provfw.virt.firewall.IptablesFirewallDriver",
    "noop": "provfw.virt.firewall.NoopFirewallDriver",
    "nwfilter": "provfw.virt.nwfilter.NWFilterFirewall",
    "NWFilterFirewall": "provfw.virt.nwfilter.NWFilterFirewall",
    "ipset": "provfw.virt.ipset_driver.IpsetFirewallDriver",
    "nftables": "provfw.virt.nftables_driver.NftablesFirewallDriver",
    "iptc": "provfw.virt.iptc_driver.IptcFirewallDriver",
}


def import_class(path: str):
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise exception.ConfigError(f"{path!r} is neither a known alias nor a dotted path")
    import importlib
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise exception.ConfigError(f"cannot load {path!r}: {exc}") from None


def load_firewall_driver(conf: cfg.ConfigOpts = provfw_conf.CONF, **kwargs) -> FirewallDriver:
    """Instantiate ``[compute] firewall_driver``: a ``provfw.firewall_drivers`` entry point or a dotted path.

    ConfigError naming the driver when it cannot be loaded (provfw.plugins.load_driver).
    """
    from provfw import plugins
    return plugins.load_driver("provfw.firewall_drivers", conf.compute.firewall_driver, conf=conf, **kwargs)


def specs_for_family(specs: Iterable[RuleSpec], version: int) -> list[RuleSpec]:
    return [s for s in specs if s.version == version]
