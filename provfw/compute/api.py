"""The compute API as seen from provfw-api: tell every worker to reload rules."""

from __future__ import annotations

import logging

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw.compute import rpc
from provfw.db import api as db

LOG = logging.getLogger(__name__)


class ComputeAPI:
    """Casts to the compute workers.  Construct once per process; thread-safe."""

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, publisher: rpc.FanoutPublisher | None = None):
        self.conf = conf
        self.publisher = publisher or rpc.FanoutPublisher(conf)

    def trigger_provider_fw_rules_refresh(self, generation: int | None = None) -> bool:
        """Cast ``trigger_provider_fw_rules {generation}`` to EVERY compute worker.

        Returns False (and logs) when the bus is unreachable: the change is
        already committed, and workers converge through their periodic
        generation check, so a lost cast delays enforcement but loses nothing.
        """
        if generation is None:
            generation = db.provider_fw_generation_get()
        try:
            self.publisher.cast("trigger_provider_fw_rules", generation=generation)
            return True
        except Exception as exc:  # noqa: BLE001 - any bus failure degrades to the periodic check
            LOG.error("could not cast trigger_provider_fw_rules(generation=%s): %s; workers will pick the "
                      "change up on their next periodic check", generation, exc)
            return False

    def close(self) -> None:
        self.publisher.close()
