"""Compute (virtualisation) drivers: what the worker's reconciler talks to.

As in the seed, the compute driver owns the firewall driver and forwards
``refresh_provider_fw_rules`` to it.  ``ComputeDriver`` documents the calls
every driver must implement; a driver that cannot enforce provider rules
says so by raising NotImplementedError (see ``FakeConnection``), which the
reconciler records as "not implemented" - by its type, never by its text.

Values in, values out: the calls take a ``RuleUpdate`` (the desired rules and
the change) and the driver state returned last time, and return an
``Applied`` (see ``provfw.virt.firewall.base``).  No compute driver reads the
database or the bus.
"""

from __future__ import annotations

from typing import Any, Collection

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.rules import RuleSpec
from provfw.virt.firewall import base


class ComputeDriver:
    """Interface of compute drivers; every provider-firewall call raises NotImplementedError here."""

    name = "base"

    def init_host(self) -> None:
        """Prepare the host (called once when the worker starts)."""

    def refresh_provider_fw_rules(self, update: base.RuleUpdate, state: Any = None) -> base.Applied:
        """Enforce ``update.desired`` (applying ``update``'s change where possible); DriverError if refused."""
        raise NotImplementedError()

    def check_provider_fw_rules(self, specs: Collection[RuleSpec]) -> None:
        """DriverError if the host would refuse ``specs``; changes nothing that is enforced."""
        raise NotImplementedError()

    def repair_provider_fw_drift(self, desired: Collection[RuleSpec], state: Any = None) -> base.Applied:
        """Re-read the kernel and rewrite what someone else changed."""
        raise NotImplementedError()

    def describe(self) -> str:
        """``<compute driver>/<firewall driver>``, as reported on the host's service state."""
        return self.name

    def after_stop(self) -> str:
        """What the host still enforces once its worker stopped, for the stop line of the log: a driver that
        enforces nothing must not tell an operator that the kernel keeps blocking."""
        return "nothing is enforced by this compute driver"

    def close(self) -> None:
        """Release connections."""


class FirewallComputeDriver(ComputeDriver):
    """A compute driver that enforces provider rules through the firewall driver it owns.

    As Nova's libvirt driver does with its ``firewall_driver``: the three provider-firewall calls go
    straight to ``self.firewall_driver`` (a ``provfw.virt.firewall.base.FirewallDriver``), which
    subclasses set in ``__init__``.
    """

    firewall_driver: Any

    def refresh_provider_fw_rules(self, update: base.RuleUpdate, state: Any = None) -> base.Applied:
        return self.firewall_driver.refresh_provider_fw_rules(update, state)

    def check_provider_fw_rules(self, specs: Collection[RuleSpec]) -> None:
        return self.firewall_driver.check_provider_fw_rules(specs)

    def repair_provider_fw_drift(self, desired: Collection[RuleSpec], state: Any = None) -> base.Applied:
        return self.firewall_driver.repair_drift(desired, state)

    def describe(self) -> str:
        return f"{self.name}/{self.firewall_driver.name}"

    def after_stop(self) -> str:
        return self.firewall_driver.after_stop()


def load_compute_driver(conf: cfg.ConfigOpts = provfw_conf.CONF) -> ComputeDriver:
    """Instantiate ``[compute] compute_driver``: a ``provfw.compute_drivers`` entry point or a dotted path.

    ConfigError naming the driver when it cannot be loaded (provfw.plugins.load_driver).
    """
    from provfw import plugins
    return plugins.load_driver("provfw.compute_drivers", conf.compute.compute_driver, conf=conf)
