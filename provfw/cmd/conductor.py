"""provfw-conductor: serves the compute workers over the bus (eventlet daemon).

With provfw-api, the only process with database access: it answers
``get_provider_fw_rules`` from cached snapshots and deltas, writes the
workers' state reports to their Service rows, and purges expired rules.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from provfw.cmd import common  # noqa: E402
from provfw.conductor import service  # noqa: E402

LOG = logging.getLogger("provfw.conductor")


def main(argv=None) -> int:
    common.prepare(argv)
    conductor = service.ConductorService(common.CONF)
    stopping = threading.Event()

    def _stop(signum, _frame):
        LOG.info("signal %s: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    conductor.start()
    while not stopping.wait(1.0):
        pass
    conductor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
