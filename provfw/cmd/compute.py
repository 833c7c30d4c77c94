"""provfw-compute: the per-hypervisor worker (eventlet daemon).

It holds bus credentials only.  A hypervisor runs strangers' virtual
machines; credentials that can change rules, tokens or the audit log do not
belong on it, so a configuration with ``[database] connection`` is refused
at start (the conductor serves the rules).

It tells systemd READY=1 only after its first full apply succeeded (until
then ``STATUS=`` says what it waits for), and feeds systemd's watchdog while
its cast consumer and periodic check keep running.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
import sys  # noqa: E402

from provfw import metrics, systemd  # noqa: E402
from provfw.cmd import common  # noqa: E402
from provfw.compute import service  # noqa: E402

LOG = logging.getLogger("provfw.compute")

NO_DATABASE = ("provfw-compute: refusing to start: [database] connection is set in its configuration. "
               "Compute workers hold no database credentials - provfw-conductor serves them the rules over the "
               "bus - so a compromised hypervisor cannot change rules, tokens or the audit log. Remove the "
               "[database] section from this host's configuration.")


@common.daemon_main
def main(argv=None) -> int:
    common.prepare(argv, database=False)
    if common.CONF.database.connection:
        print(NO_DATABASE, file=sys.stderr)
        return 2
    metrics.serve_configured(common.CONF, "compute_port", metrics.WORKER, what="provfw-compute")
    watchdog = systemd.Watchdog()
    worker = service.ComputeService(common.CONF, watchdog=watchdog)
    kept = worker.manager.driver.after_stop()            # what stays enforced once this process is gone
    stopping = common.StopRequest(LOG, f"stopping; {kept}").install()
    LOG.info("provfw-compute starting on host %s (%s)", worker.manager.host, worker.manager.driver.describe())
    worker.start()
    ready_sent, status = False, None
    while not stopping.wait(1.0):
        if not ready_sent and worker.ready.is_set():
            ready_sent = True
            systemd.notify("READY=1", f"STATUS=enforcing generation {worker.manager.applied_generation}")
            watchdog.start()
        elif not ready_sent:
            waiting = f"STATUS=waiting for the first apply: {worker.manager.last_error or 'in progress'}"
            if waiting != status:
                status = waiting
                systemd.notify(waiting)
    systemd.notify("STOPPING=1")
    watchdog.stop()
    worker.stop()
    LOG.info("provfw-compute stopped: %s", kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
