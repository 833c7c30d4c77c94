"""provfw-api as a WSGI application for a real web server (gunicorn, uWSGI, mod_wsgi).

    gunicorn --workers 4 --worker-class gthread --threads 4 --bind 127.0.0.1:8774 provfw.api.wsgi_app:application
    PROVFW_CONFIG_FILE=/etc/provfw/provfw.conf uwsgi --http 127.0.0.1:8774 --module provfw.api.wsgi_app:application

Configuration comes from ``$PROVFW_CONFIG_FILE`` (one path, or several
separated by commas, read in order), else ``/etc/provfw/provfw.conf`` when it
exists; the server's own command line is never parsed as provfw's.  The
module does no I/O at import beyond reading the configuration: the database
pool and the bus connection open on first use, in each worker after the
server forked it, and nothing runs in the background (expiry purges run in
provfw-conductor).  Use sync or threaded (gthread) workers: the code is
plain blocking Python, and eventlet is provfw-api's own server.  psycopg2
waits through ``provfw.cmd.psycopg_wait`` (``green=False``), so a database
server that stops answering costs a request thread 70 s, not the thread.

Metrics: with several worker processes, set ``PROMETHEUS_MULTIPROC_DIR``
and start gunicorn with ``-c python:provfw.api.gunicorn_conf``, which serves
the workers' merged request metrics on ``[metrics] api_port`` from the
master process (see docs/operations.md).
"""

from __future__ import annotations

from provfw import conf as provfw_conf


def init_application(config_files: list[str] | None = None):
    """Parse the configuration, set up logging and the database layer; return the WSGI callable.

    ``config_files`` default to ``provfw.conf.config_files_from_env()``, then to
    /etc/provfw/provfw.conf if it exists.  Raises oslo.config errors for a
    missing or invalid file and ConfigError for a malformed value
    (``provfw.conf.check_values``): the server then refuses to start the
    worker.  The schema is not checked here (no I/O at import): until
    ``provfw-manage db sync`` has run, ``/healthz`` answers 503 saying so.
    """
    from provfw.api import router
    from provfw.cmd import common, psycopg_wait
    from provfw.db import api as db

    files = config_files if config_files is not None else provfw_conf.config_files_from_env()
    provfw_conf.parse_args([arg for path in files for arg in ("--config-file", path)])
    provfw_conf.check_values()
    common.setup_logging()
    psycopg_wait.install(green=False)
    db.configure(provfw_conf.database_url(), provfw_conf.CONF.database.pool_size)
    return router.build_app(provfw_conf.CONF)


application = init_application()
