"""provfw-api: the admin REST API server (eventlet WSGI).

Request handling only: the periodic purge of expired rules runs in
provfw-conductor.  At start it waits until the database answers, serves
its metrics on ``[metrics] api_port``, listens, and then tells systemd
READY=1 (``Type=notify``).  ``provfw.api.wsgi_app`` is the same application
for gunicorn or uWSGI.
"""

from provfw.cmd import eventlet_patch  # noqa: F401  (must come first)

import logging  # noqa: E402
from typing import Callable  # noqa: E402

import eventlet  # noqa: E402
import eventlet.wsgi  # noqa: E402

from provfw import exception, metrics, systemd  # noqa: E402
from provfw.api import router  # noqa: E402
from provfw.cmd import common  # noqa: E402

LOG = logging.getLogger("provfw.api")


STOP_POLL = 0.25        # seconds between looks at the stop request


class HttpProtocol(eventlet.wsgi.HttpProtocol):
    """eventlet's protocol, minus running a request whose answer cannot be sent because the server is stopping.

    When eventlet.wsgi.server stops it marks every connection closing and shuts down the sockets of those
    it sees idle (waiting for the next request on a keep-alive connection).  A client's next request may
    already be in such a socket's receive buffer: eventlet still reads it, runs it, and then cannot write
    the answer - a committed block whose client saw only "Remote end closed connection without response"
    and, retrying, gets 409 (found by a newcomer stopping the all-in-one under load; eventlet 0.41).  A
    request line read on a connection already marked closing is dropped here instead, unrun: the client
    sees the same closed connection and can safely send it again.  Requests in flight when the stop began
    are on connections that were not idle: they finish and are answered, and then their connections close.
    """

    def _read_request_line(self):
        line = super()._read_request_line()
        if line and self.conn_state[2] == eventlet.wsgi.STATE_CLOSE:
            return ""          # handle_one_request: no request line -> close the connection, run nothing
        return line


def serve(conf, compute=None, stop: common.StopRequest | None = None,
          on_listening: Callable[[], None] | None = None) -> None:
    """Serve the API until ``stop`` is requested (or forever); ``on_listening`` runs once the socket is bound.

    On stop the server greenthread is killed in ``accept``: idle keep-alive connections are closed,
    requests in flight finish (eventlet.wsgi.server's ``finally``), then this returns.
    """
    from provfw.compute import api as compute_api

    compute = compute or compute_api.ComputeAPI(conf)
    app = router.build_app(conf, compute)
    sock = eventlet.listen((conf.api.bind_host, conf.api.bind_port), reuse_addr=True)
    LOG.info("provfw-api listening on http://%s:%s", conf.api.bind_host, conf.api.bind_port)
    if on_listening is not None:
        on_listening()
    # The access log is provfw.api.middleware's (one line per request, with its request id and token);
    # eventlet's own would repeat it without them.
    server = eventlet.spawn(eventlet.wsgi.server, sock, app, log=logging.getLogger("provfw.api.eventlet"),
                            log_output=False, max_size=1000, keepalive=True, socket_timeout=60,
                            protocol=HttpProtocol)
    while not server.dead:
        if stop is None:
            eventlet.sleep(STOP_POLL)
        elif stop.wait(STOP_POLL):
            break
    if not server.dead:
        server.kill(SystemExit)      # caught by eventlet.wsgi.server: "wsgi exiting", then its finally
    server.wait()


@common.daemon_main
def main(argv=None) -> None:
    common.prepare(argv)
    conf = common.CONF
    stop = common.StopRequest(LOG).install()          # before the wait: a stop while waiting ends it cleanly
    try:
        common.wait_for_database("provfw-api", stop)
    except exception.DatabaseUnavailable:
        if not stop.is_set():
            raise
        LOG.info("provfw-api stopped before the database answered")
        return
    metrics.serve_configured(conf, "api_port", metrics.API, metrics.CONTROL, what="provfw-api")
    watchdog = systemd.Watchdog()            # no loop registered: pings while the eventlet hub runs

    def listening() -> None:
        systemd.notify("READY=1", f"STATUS=serving on http://{conf.api.bind_host}:{conf.api.bind_port}")
        watchdog.start()

    serve(conf, stop=stop, on_listening=listening)
    systemd.notify("STOPPING=1")
    watchdog.stop()
    common.close_database()
    LOG.info("provfw-api stopped")


if __name__ == "__main__":
    main()
