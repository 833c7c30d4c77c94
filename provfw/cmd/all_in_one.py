"""provfw-all-in-one: API + conductor + one compute worker in one process, on embedded defaults.

SQLite under ``state_path``, the in-process bus (``memory://``), the schema
migrated at start, and - when no token exists yet - a bootstrap admin token
written to ``<state_path>/admin-token`` (mode 0600) for the ``provfw`` CLI.
The worker reaches the database only through the in-process conductor, as
it would on a real hypervisor.  One metrics endpoint (``[metrics]
api_port``) serves the API's, the conductor's and the worker's metrics.
systemd hears READY=1 once the API listens and the worker's first full
apply succeeded; the watchdog watches the conductor's server and the
worker's consumer and periodic check.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
import threading  # noqa: E402

from provfw import metrics, systemd  # noqa: E402
from provfw import bootstrap, exception  # noqa: E402
from provfw.cmd import api as api_cmd  # noqa: E402
from provfw.cmd import common  # noqa: E402
from provfw.compute import api as compute_api  # noqa: E402
from provfw.compute import service  # noqa: E402
from provfw.conductor import service as conductor_service  # noqa: E402

LOG = logging.getLogger("provfw.all_in_one")


# Kept importable from here for callers of the seed-era location; it lives in provfw.bootstrap so that tests
# (and tools) can use it without importing this entry point, which monkey-patches the process with eventlet.
bootstrap_token = bootstrap.bootstrap_token


@common.daemon_main
def main(argv=None) -> None:
    common.prepare(argv)
    conf = common.CONF
    watchdog = systemd.Watchdog()
    # Built before anything else happens (the schema, the bootstrap token): its drivers and host name are where
    # a worker's configuration can be wrong, and a refused one must leave no trace.
    worker = service.ComputeService(conf, watchdog=watchdog)
    # Installed first: a stop while the database is still away ends the wait (the message is the stop's).
    signalled = common.StopRequest(LOG, "stopping the API, the worker and the conductor").install()
    try:
        common.wait_for_database("provfw-all-in-one", signalled, migrate=True)
    except exception.DatabaseUnavailable:
        if not signalled.is_set():
            raise
        LOG.info("provfw-all-in-one stopped before the database answered")
        return
    bootstrap_token(conf)
    metrics.serve_configured(conf, "api_port", metrics.API, metrics.CONTROL, metrics.CONDUCTOR, metrics.WORKER,
                             what="provfw-all-in-one")
    compute = compute_api.ComputeAPI(conf)
    conductor = conductor_service.ConductorService(conf, compute, watchdog=watchdog)
    conductor.start()
    conductor.ready.wait(10)
    worker.start()
    stop = threading.Event()

    def announce_when_ready() -> None:
        while not worker.ready.wait(1.0):
            if stop.is_set():
                return
            systemd.notify(f"STATUS=waiting for the first apply: {worker.manager.last_error or 'in progress'}")
        systemd.notify("READY=1", f"STATUS=serving on http://{conf.api.bind_host}:{conf.api.bind_port}")
        watchdog.start()

    def listening() -> None:
        threading.Thread(target=announce_when_ready, name="systemd-ready", daemon=True).start()

    kept = worker.manager.driver.after_stop()
    try:
        api_cmd.serve(conf, compute, signalled, on_listening=listening)
    finally:
        systemd.notify("STOPPING=1")
        stop.set()
        watchdog.stop()
        worker.stop()
        conductor.stop()
        common.close_database()
        LOG.info("provfw-all-in-one stopped: %s", kept)


if __name__ == "__main__":
    main()
