"""A compute driver that manages no hypervisor.

Kept from the seed: it defines the provider-firewall calls only to raise
NotImplementedError, so that authors of other drivers see the calls they
must implement.  The worker records that as "not implemented" on its
service state and keeps heartbeating.
"""

from __future__ import annotations

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.virt import driver


class FakeConnection(driver.ComputeDriver):
    name = "fake"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF):
        self.conf = conf

    def refresh_provider_fw_rules(self, update, state=None):
        raise NotImplementedError("FakeConnection does not implement refresh_provider_fw_rules")

    def check_provider_fw_rules(self, specs):
        raise NotImplementedError("FakeConnection does not implement check_provider_fw_rules")

    def repair_provider_fw_drift(self, desired, state=None):
        raise NotImplementedError("FakeConnection does not implement repair_provider_fw_drift")
