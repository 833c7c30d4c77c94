"""LibvirtConnection: the compute driver of libvirt hypervisors.

It forwards provider-firewall calls to the configured firewall driver.  The
libvirt connection is opened lazily and only for drivers that need it
(NWFilterFirewall); an iptables- or set-based host runs without libvirtd.
If libvirtd goes away the connection is dropped and reopened on next use.

Thread-safety: ``get_connection`` serialises on a lock; libvirt connections
themselves are thread-safe.
"""

from __future__ import annotations

import logging
import threading

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception
from provfw.virt import driver, firewall

LOG = logging.getLogger(__name__)


class LibvirtConnection(driver.ComputeDriver):
    name = "libvirt"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, firewall_driver: firewall.FirewallDriver | None = None):
        self.conf = conf
        self._conn = None
        self._conn_lock = threading.Lock()
        self.firewall_driver = firewall_driver or firewall.load_firewall_driver(conf, **self._firewall_kwargs())

    def _firewall_kwargs(self) -> dict:
        name = self.conf.compute.firewall_driver
        path = firewall.FIREWALL_DRIVER_ALIASES.get(name, name)
        if path.endswith("NWFilterFirewall"):
            return {"get_connection": self.get_connection}
        return {}

    def get_connection(self):
        """An open libvirt connection, reopened if libvirtd restarted."""
        import libvirt  # imported lazily: hosts without libvirt-python can still use iptables drivers

        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                self._conn = libvirt.open(self.conf.libvirt.uri)
            except libvirt.libvirtError as exc:
                raise exception.DriverError(f"cannot connect to libvirt at {self.conf.libvirt.uri}: {exc}") from None
            LOG.info("connected to libvirt at %s", self.conf.libvirt.uri)
            return self._conn

    def refresh_provider_fw_rules(self, full: bool = False) -> firewall.ApplyResult:
        return self.firewall_driver.refresh_provider_fw_rules(full=full)

    def repair_provider_fw_drift(self) -> bool:
        return self.firewall_driver.repair_drift()

    def expire_provider_fw_rules(self):
        return self.firewall_driver.expire_rules()

    def next_provider_fw_expiry(self):
        return self.firewall_driver.next_expiry()

    def describe(self) -> str:
        return f"{self.name}/{self.firewall_driver.name}"

    def close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 - closing a dead connection must not fail shutdown
                    pass
                self._conn = None
