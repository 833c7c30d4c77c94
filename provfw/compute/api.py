"""The compute API as seen from provfw-api and provfw-conductor: tell every worker that rules changed.

Thread-safety: one ``ComputeAPI`` per process, shared by all request
threads; the publisher serialises casts.
"""

from __future__ import annotations

import logging
from typing import Sequence

from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import metrics, rpc
from provfw.rules import Changes, Rule

LOG = logging.getLogger(__name__)


class ComputeAPI:
    """Casts to the compute workers.  Construct once per process; thread-safe."""

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, publisher: rpc.FanoutPublisher | None = None):
        self.conf = conf
        self.publisher = publisher or rpc.FanoutPublisher(conf)

    def trigger_provider_fw_rules_refresh(self, generation: int, previous_generation: int | None = None,
                                          added: Sequence[Rule] | None = None,
                                          removed: Sequence[Rule] | None = None) -> bool:
        """Cast ``trigger_provider_fw_rules`` to EVERY compute worker.

        The cast carries ``{generation, previous_generation, added, removed}``
        (rules in ``Rule`` wire form) when the change is known and at most
        ``max_cast_changes`` rules; otherwise ``added``/``removed`` are null and
        every worker fetches the change from the conductor.

        Returns False (and logs) when the bus is unreachable: the change is
        already committed, and workers converge through their periodic check,
        so a lost cast delays enforcement but loses nothing.
        """
        carry = (added is not None and removed is not None and previous_generation is not None
                 and len(added) + len(removed) <= self.conf.max_cast_changes)
        args = {"generation": generation, "previous_generation": previous_generation,
                "added": [r.to_wire() for r in added] if carry else None,
                "removed": [r.to_wire() for r in removed] if carry else None}
        try:
            self.publisher.cast("trigger_provider_fw_rules", **args)
            return True
        except Exception as exc:  # noqa: BLE001 - any bus failure degrades to the periodic check
            failure = exc
        # Logged outside the except: oslo.log appends the exception being handled to an ERROR line.
        metrics.CASTS_FAILED.inc()
        LOG.error("could not cast trigger_provider_fw_rules(generation=%s): %s; workers will pick the "
                  "change up on their next periodic check", generation, failure)
        return False

    def notify(self, changes: Changes) -> bool:
        """``trigger_provider_fw_rules_refresh`` for one mutation's ``Changes``."""
        return self.trigger_provider_fw_rules_refresh(changes.generation, changes.since, changes.added,
                                                      changes.removed)

    def close(self) -> None:
        self.publisher.close()
