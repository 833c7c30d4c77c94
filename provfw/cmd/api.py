"""provfw-api: the admin REST API server (eventlet WSGI)."""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
import threading  # noqa: E402

import eventlet  # noqa: E402
import eventlet.wsgi  # noqa: E402

from provfw.api import router  # noqa: E402
from provfw.cmd import common  # noqa: E402
from provfw.db import api as db  # noqa: E402

LOG = logging.getLogger("provfw.api")
PURGE_INTERVAL = 60


def purge_expired_forever(stop: threading.Event, compute) -> None:
    """Soft-delete expired rules (hosts already stopped enforcing them at expiry) and tell the workers."""
    while not stop.wait(PURGE_INTERVAL):
        try:
            count, generation = db.provider_fw_rule_purge_expired()
            if count:
                LOG.info("purged %d expired rule(s) at generation %s", count, generation)
                compute.trigger_provider_fw_rules_refresh(generation)
        except Exception:  # noqa: BLE001 - keep serving; try again next interval
            LOG.exception("purging expired rules failed")


def serve(conf, compute=None, stop: threading.Event | None = None) -> None:
    from provfw.compute import api as compute_api

    compute = compute or compute_api.ComputeAPI(conf)
    app = router.build_app(conf, compute)
    stop = stop or threading.Event()
    threading.Thread(target=purge_expired_forever, args=(stop, compute), daemon=True).start()
    sock = eventlet.listen((conf.api.bind_host, conf.api.bind_port), reuse_addr=True)
    LOG.info("provfw-api listening on http://%s:%s", conf.api.bind_host, conf.api.bind_port)
    eventlet.wsgi.server(sock, app, log=logging.getLogger("provfw.api.access"), log_output=conf.debug,
                         max_size=1000, keepalive=True, socket_timeout=60)


def main(argv=None) -> None:
    common.prepare(argv)
    serve(common.CONF)


if __name__ == "__main__":
    main()
