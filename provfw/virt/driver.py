"""Compute (virtualisation) drivers: what the compute manager talks to.

As in the seed, the compute driver owns the firewall driver and forwards
``refresh_provider_fw_rules`` to it.  ``ComputeDriver`` documents the calls
every driver must implement; drivers that cannot enforce provider rules must
say so by raising NotImplementedError (see ``FakeConnection``).
"""

from __future__ import annotations

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.virt import firewall

COMPUTE_DRIVER_ALIASES = {
    "libvirt": "provfw.virt.libvirt_conn.LibvirtConnection",
    "LibvirtConnection": "provfw.virt.libvirt_conn.LibvirtConnection",
    "fake": "provfw.virt.fake.FakeConnection",
    "FakeConnection": "provfw.virt.fake.FakeConnection",
}


class ComputeDriver:
    """Interface of compute drivers."""

    name = "base"

    def init_host(self) -> None:
        """Prepare the host (called once when the worker starts)."""

    def refresh_provider_fw_rules(self, full: bool = False) -> firewall.ApplyResult:
        """Rebuild the provider firewall from the database's rules."""
        raise NotImplementedError()

    def repair_provider_fw_drift(self) -> bool:
        raise NotImplementedError()

    def expire_provider_fw_rules(self) -> firewall.ApplyResult | None:
        return None

    def next_provider_fw_expiry(self):
        return None

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        """Release connections."""


def load_compute_driver(conf: cfg.ConfigOpts = provfw_conf.CONF) -> ComputeDriver:
    """Instantiate ``[compute] compute_driver`` (alias or dotted path)."""
    name = conf.compute.compute_driver
    return firewall.import_class(COMPUTE_DRIVER_ALIASES.get(name, name))(conf=conf)
