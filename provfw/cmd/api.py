"""provfw-api: the admin REST API server (eventlet WSGI).

Request handling only: the periodic purge of expired rules runs in
provfw-conductor.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
import threading  # noqa: E402

import eventlet  # noqa: E402
import eventlet.wsgi  # noqa: E402

from provfw.api import router  # noqa: E402
from provfw.cmd import common  # noqa: E402

LOG = logging.getLogger("provfw.api")


def serve(conf, compute=None, stop: threading.Event | None = None) -> None:
    from provfw.compute import api as compute_api

    compute = compute or compute_api.ComputeAPI(conf)
    app = router.build_app(conf, compute)
    sock = eventlet.listen((conf.api.bind_host, conf.api.bind_port), reuse_addr=True)
    LOG.info("provfw-api listening on http://%s:%s", conf.api.bind_host, conf.api.bind_port)
    eventlet.wsgi.server(sock, app, log=logging.getLogger("provfw.api.access"), log_output=conf.debug,
                         max_size=1000, keepalive=True, socket_timeout=60)


def main(argv=None) -> None:
    common.prepare(argv)
    serve(common.CONF)


if __name__ == "__main__":
    main()
