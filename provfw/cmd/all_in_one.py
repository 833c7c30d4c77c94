"""provfw-all-in-one: API + conductor + one compute worker in one process, on embedded defaults.

SQLite under ``state_path``, the in-process bus (``memory://``), the schema
migrated at start, and - when no token exists yet - a bootstrap admin token
written to ``<state_path>/admin-token`` (mode 0600) for the ``provfw`` CLI.
The worker reaches the database only through the in-process conductor, as
it would on a real hypervisor.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402

from provfw import conf as provfw_conf  # noqa: E402
from provfw.cmd import api as api_cmd  # noqa: E402
from provfw.cmd import common  # noqa: E402
from provfw.compute import api as compute_api  # noqa: E402
from provfw.compute import service  # noqa: E402
from provfw.conductor import service as conductor_service  # noqa: E402
from provfw.db import api as db  # noqa: E402
from provfw.db import migration  # noqa: E402

LOG = logging.getLogger("provfw.all_in_one")


def bootstrap_token(conf) -> None:
    if db.api_token_get_all():
        return
    secret = db.api_token_create("bootstrap-admin", "admin")
    path = os.path.join(conf.state_path, "admin-token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    LOG.info("created the bootstrap admin token; it is in %s (the provfw CLI reads it from there)", path)


def main(argv=None) -> None:
    common.prepare(argv)
    conf = common.CONF
    migration.db_sync(provfw_conf.database_url(conf))
    bootstrap_token(conf)
    compute = compute_api.ComputeAPI(conf)
    conductor = conductor_service.ConductorService(conf, compute)
    conductor.start()
    conductor.ready.wait(10)
    worker = service.ComputeService(conf)
    worker.start()
    stop = threading.Event()
    try:
        api_cmd.serve(conf, compute, stop)
    finally:
        stop.set()
        worker.stop()
        conductor.stop()


if __name__ == "__main__":
    main()
