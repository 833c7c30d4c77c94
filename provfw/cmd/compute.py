"""provfw-compute: the per-hypervisor worker (eventlet daemon)."""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402

from provfw.cmd import common  # noqa: E402
from provfw.compute import service  # noqa: E402

LOG = logging.getLogger("provfw.compute")


def main(argv=None) -> None:
    common.prepare(argv)
    worker = service.ComputeService(common.CONF)
    stopping = threading.Event()

    def _stop(signum, _frame):
        LOG.info("signal %s: stopping (the kernel keeps the rules last applied)", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    LOG.info("provfw-compute starting on host %s (%s)", worker.manager.host, worker.manager.driver.describe())
    worker.start()
    while not stopping.wait(1.0):
        pass
    worker.stop()


if __name__ == "__main__":
    main()
