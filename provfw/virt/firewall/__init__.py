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

Drivers are named by ``[compute] firewall_driver``: the name of an entry
point in the ``provfw.firewall_drivers`` group (setup.cfg declares the short
names and the seed's class names; an out-of-tree driver registers itself the
same way), or a dotted path to a class.
"""

from __future__ import annotations

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception
from provfw.virt.firewall.base import (Applied, Call, Command, FirewallDriver, NoopFirewallDriver, Plan,
                                       PlannedFirewallDriver, RuleUpdate, execute)

__all__ = ["Applied", "Call", "Command", "FirewallDriver", "NoopFirewallDriver", "Plan", "PlannedFirewallDriver",
           "RuleUpdate", "execute", "ENTRY_POINT_GROUP", "driver_class", "load_firewall_driver"]

ENTRY_POINT_GROUP = "provfw.firewall_drivers"


def load_firewall_driver(conf: cfg.ConfigOpts = provfw_conf.CONF, **kwargs) -> FirewallDriver:
    """Instantiate ``[compute] firewall_driver`` with ``conf`` and ``kwargs``.

    The name is a ``provfw.firewall_drivers`` entry point (loaded by
    stevedore, see ``provfw.plugins``) or a dotted path to a class.  Raises
    ``ConfigError`` naming it when it cannot be loaded or is not a FirewallDriver.
    """
    return driver_class(conf.compute.firewall_driver)(conf=conf, **kwargs)


def driver_class(name: str) -> type:
    """The FirewallDriver class ``name`` designates; ConfigError otherwise."""
    from provfw import plugins

    cls = plugins.driver_class(ENTRY_POINT_GROUP, name)
    if not (isinstance(cls, type) and issubclass(cls, FirewallDriver)):
        raise exception.ConfigError(f"[compute] firewall_driver {name!r} is not a FirewallDriver")
    return cls
