"""gunicorn settings for provfw.api.wsgi_app, with the workers' metrics merged on one port.

    PROVFW_CONFIG_FILE=/etc/provfw/provfw.conf \\
        gunicorn -c python:provfw.api.gunicorn_conf provfw.api.wsgi_app:application

Defaults, each overridable on gunicorn's command line: ``bind`` from
``[api] bind_host``/``bind_port``; ``worker_class = gthread`` (keep-alive;
sync workers close every connection), ``threads = 2``, ``workers`` =
``$PROVFW_API_WORKERS`` or one per CPU, ``control_socket`` (gunicorn's
``gunicornc``) ``<state_path>/gunicorn-api.ctl``.

Metrics: every worker process counts its own requests, so the workers write
them to files in ``$PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multi-process mode; a fresh temporary directory when unset, emptied at
start, removed at exit when it was made here) and the master serves their sum on ``[metrics] bind_host`` /
``api_port`` (``GET /metrics``); a worker that exits is marked dead so its
gauges go.  Only the API's and the control plane's metrics are exported
(``provfw_api_*``, ``provfw_casts_*``, ``provfw_db_*``): the worker's and
the conductor's belong to their own daemons.

This module runs in gunicorn's master before any worker starts; it sets the
environment before prometheus_client is imported anywhere, which is what
multi-process mode needs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile

LOG = logging.getLogger("provfw.api.gunicorn")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXPORTED_PREFIXES = ("provfw_api_", "provfw_casts_", "provfw_db_")

_OWN_MULTIPROC_DIR = None          # the temporary directory made here, removed at exit (on_exit)
if not os.environ.get(MULTIPROC_ENV):
    _OWN_MULTIPROC_DIR = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="provfw-api-metrics-")


def _provfw_conf():
    from provfw import conf as provfw_conf

    files = provfw_conf.config_files_from_env()
    provfw_conf.parse_args([arg for path in files for arg in ("--config-file", path)])
    return provfw_conf.CONF


_conf = _provfw_conf()

bind = [f"{_conf.api.bind_host}:{_conf.api.bind_port}"]
worker_class = "gthread"
threads = 2
# One per core: each worker forms its own group commits, so more processes only queue longer on the generation
# row lock (docs/benchmarks.md, "CPU or the lock?").
workers = int(os.environ.get("PROVFW_API_WORKERS") or multiprocessing.cpu_count())
# gunicorn 25.1+ listens for gunicornc on $XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl, one path for
# every instance of the user: each provfw API gets its own, in its state_path (older gunicorns ignore this).
control_socket = os.path.join(_conf.state_path, "gunicorn-api.ctl")
keepalive = 30
graceful_timeout = 10
_metrics_server = None


def on_starting(server) -> None:
    """Empty the multi-process directory: files of an earlier run's workers would be summed in."""
    path = os.environ[MULTIPROC_ENV]
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            os.unlink(target)


class _Exported:
    """The multi-process metrics restricted to the API's and the control plane's names."""

    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        for family in self.collector.collect():
            if family.name.startswith(EXPORTED_PREFIXES):
                yield family


def when_ready(server) -> None:
    """Serve the workers' merged metrics from the master on ``[metrics] api_port`` (0: none)."""
    global _metrics_server
    port = _conf.metrics.api_port
    if not port:
        return
    from prometheus_client import CollectorRegistry, multiprocess
    from prometheus_client.exposition import start_http_server

    registry = CollectorRegistry()
    registry.register(_Exported(multiprocess.MultiProcessCollector(None)))
    try:
        _metrics_server = start_http_server(port, addr=_conf.metrics.bind_host, registry=registry)
    except OSError as exc:
        server.log.error("provfw-api: cannot serve metrics on %s:%s (%s)", _conf.metrics.bind_host, port, exc)
        return
    server.log.info("provfw-api metrics (all workers) on http://%s:%s/metrics", _conf.metrics.bind_host, port)


def on_exit(server) -> None:
    """Remove the multi-process directory when this module made it (a directory the operator named stays)."""
    if _OWN_MULTIPROC_DIR:
        shutil.rmtree(_OWN_MULTIPROC_DIR, ignore_errors=True)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
