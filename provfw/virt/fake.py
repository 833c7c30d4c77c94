"""A compute driver that manages no hypervisor.

Kept from the seed: it defines ``refresh_provider_fw_rules`` only to raise
NotImplementedError, so that authors of other drivers see the call they must
implement.  The compute manager records that error on the Service row.
"""

from __future__ import annotations

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.virt import driver


class FakeConnection(driver.ComputeDriver):
    name = "fake"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF):
        self.conf = conf

    def refresh_provider_fw_rules(self, full: bool = False):
        raise NotImplementedError("FakeConnection does not implement refresh_provider_fw_rules")

    def repair_provider_fw_drift(self) -> bool:
        raise NotImplementedError("FakeConnection does not implement repair_provider_fw_drift")
