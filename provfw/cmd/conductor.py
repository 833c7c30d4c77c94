"""provfw-conductor: serves the compute workers over the bus (eventlet daemon).

With provfw-api, the only process with database access: it answers
``get_provider_fw_rules`` from cached snapshots and deltas, writes the
workers' state reports to their Service rows, and purges expired rules.
It tells systemd READY=1 once the database answers, and feeds systemd's
watchdog while its request server keeps running.

``kill -USR1 <pid>`` logs one line ``conductor counters {json}`` (requests,
cache hits, database reads and statements since start: see
``ConductorManager.counters``), for an operator or a benchmark to compare
before and after.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from provfw import metrics, systemd  # noqa: E402
from provfw.cmd import common  # noqa: E402
from provfw.conductor import service  # noqa: E402

LOG = logging.getLogger("provfw.conductor")


@common.daemon_main
def main(argv=None) -> int:
    common.prepare(argv)
    conf = common.CONF
    stopping = common.StopRequest(LOG).install()
    dump = common.SignalFlag((signal.SIGUSR1,)).install()     # see SignalFlag: its handler takes no lock
    try:
        common.wait_for_database("provfw-conductor", stopping)
    except Exception:  # noqa: BLE001 - only reached when a signal interrupted the wait
        if stopping.is_set():
            LOG.info("provfw-conductor stopped before the database answered")
            return 0
        raise
    metrics.serve_configured(conf, "conductor_port", metrics.CONDUCTOR, metrics.CONTROL, what="provfw-conductor")
    watchdog = systemd.Watchdog()
    conductor = service.ConductorService(conf, watchdog=watchdog)
    conductor.start()
    systemd.notify("READY=1", "STATUS=serving the compute workers")
    watchdog.start()
    while not stopping.wait(0.1):
        if dump.take():
            LOG.info("conductor counters %s", json.dumps(conductor.manager.counters(), sort_keys=True))
    systemd.notify("STOPPING=1")
    watchdog.stop()
    conductor.stop()
    common.close_database()
    LOG.info("provfw-conductor stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
