"""Firewall drivers: values in (the desired rules and their change), kernel state out.

The seam lives in ``firewall.base`` and is re-exported here; each kernel
concern has its own module:

=================  ==========================================================
``base``           RuleUpdate, Applied, Plan/Command/Call, ``execute`` (sets ->
                   chains -> deletions), FirewallDriver, PlannedFirewallDriver,
                   NoopFirewallDriver
``iptables``       render / parse / restore transactions, tool names,
                   IptablesFirewallDriver (the seed's linear chain)
``sets``           grouping by match key (family, protocol, ports)
``ipset``          one module for every ipset user: parse, plan, deltas,
                   sizes; IpsetFirewallDriver
``nftables``       NftablesFirewallDriver and its pure planning
``iptc``           IptcFirewallDriver and its libiptc helper process
``nwfilter``       NWFilterFirewall, ensure_filter_refs
``nwfilter_xml``   pure nwfilter XML
=================  ==========================================================

Drivers are named by ``[compute] firewall_driver``: an alias below, the name
of an entry point in the ``provfw.firewall_drivers`` group (how an
out-of-tree driver registers itself), or a dotted path to a class.
"""

from __future__ import annotations

from importlib import metadata

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception
from provfw.virt.firewall.base import (Applied, Call, Command, FirewallDriver, NoopFirewallDriver, Plan,
                                       PlannedFirewallDriver, RuleUpdate, execute, import_class)

__all__ = ["Applied", "Call", "Command", "FirewallDriver", "NoopFirewallDriver", "Plan", "PlannedFirewallDriver",
           "RuleUpdate", "execute", "FIREWALL_DRIVER_ALIASES", "ENTRY_POINT_GROUP", "driver_path",
           "load_firewall_driver"]

ENTRY_POINT_GROUP = "provfw.firewall_drivers"

# setup.cfg declares the short aliases as entry points too; a unit test keeps the two in step.
FIREWALL_DRIVER_ALIASES = {
    "iptables": "provfw.virt.firewall.iptables.IptablesFirewallDriver",
    "IptablesFirewallDriver": "provfw.virt.firewall.iptables.IptablesFirewallDriver",
    "noop": "provfw.virt.firewall.base.NoopFirewallDriver",
    "NoopFirewallDriver": "provfw.virt.firewall.base.NoopFirewallDriver",
    "nwfilter": "provfw.virt.firewall.nwfilter.NWFilterFirewall",
    "NWFilterFirewall": "provfw.virt.firewall.nwfilter.NWFilterFirewall",
    "ipset": "provfw.virt.firewall.ipset.IpsetFirewallDriver",
    "IpsetFirewallDriver": "provfw.virt.firewall.ipset.IpsetFirewallDriver",
    "nftables": "provfw.virt.firewall.nftables.NftablesFirewallDriver",
    "NftablesFirewallDriver": "provfw.virt.firewall.nftables.NftablesFirewallDriver",
    "iptc": "provfw.virt.firewall.iptc.IptcFirewallDriver",
    "IptcFirewallDriver": "provfw.virt.firewall.iptc.IptcFirewallDriver",
}


def driver_path(name: str) -> str:
    """The dotted class path ``name`` stands for: an alias, an installed entry point, or ``name`` itself."""
    if name in FIREWALL_DRIVER_ALIASES:
        return FIREWALL_DRIVER_ALIASES[name]
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        module, _, attr = entry_point.value.partition(":")
        return f"{module}.{attr}"
    return name


def load_firewall_driver(conf: cfg.ConfigOpts = provfw_conf.CONF, **kwargs) -> FirewallDriver:
    """Instantiate ``[compute] firewall_driver`` with ``conf`` and ``kwargs``.

    Raises ``ConfigError`` naming the option's value when it is neither an
    alias, an entry point nor a loadable dotted path to a FirewallDriver.
    """
    name = conf.compute.firewall_driver
    cls = import_class(driver_path(name))
    if not (isinstance(cls, type) and issubclass(cls, FirewallDriver)):
        raise exception.ConfigError(f"[compute] firewall_driver {name!r} is not a FirewallDriver")
    return cls(conf=conf, **kwargs)
