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


_quiet_installed = False


def import_libvirt():
    """Import libvirt-python lazily (iptables-only hosts need not have it) and silence its stderr printer."""
    global _quiet_installed
    try:
        import libvirt
    except ImportError:
        raise exception.DriverError("the nwfilter driver needs libvirt-python (pip install 'provfw[libvirt]')") \
            from None
    if not _quiet_installed:
        # libvirt prints every error to stderr by default; we turn each into a DriverError instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quiet_installed = True
    return libvirt


class LibvirtConnector:
    """A lazily opened libvirt connection that is reopened when libvirtd went away.

    Used when the driver is not given ``get_connection`` (LibvirtConnection
    passes its own).  Thread-safety: ``__call__`` serialises on a lock.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._conn = None
        self._lock = threading.Lock()

    def __call__(self):
        libvirt = import_libvirt()
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._close()
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise exception.DriverError(f"cannot connect to libvirt at {self.uri}: {exc}") from None
            LOG.info("connected to libvirt at %s", self.uri)
            return self._conn

    def _close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - a dead connection may fail to close; we drop it either way
            pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._close()


class LibvirtConnection(driver.FirewallComputeDriver):
    name = "libvirt"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, firewall_driver: firewall.FirewallDriver | None = None):
        self.conf = conf
        self._connector = LibvirtConnector(conf.libvirt.uri)
        self.firewall_driver = firewall_driver or firewall.load_firewall_driver(conf, **self._firewall_kwargs())

    def _firewall_kwargs(self) -> dict:
        cls = firewall.driver_class(self.conf.compute.firewall_driver)
        if getattr(cls, "uses_libvirt", False):
            # One connection per host: the firewall driver borrows ours.
            return {"get_connection": self.get_connection}
        return {}

    def get_connection(self):
        """An open libvirt connection, reopened if libvirtd restarted."""
        return self._connector()

    def close(self) -> None:
        self._connector.close()
        close = getattr(self.firewall_driver, "close", None)
        if close is not None:
            close()
