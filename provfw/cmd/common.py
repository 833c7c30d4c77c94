"""Start-up shared by the provfw daemons and tools: config, logging, and (for those allowed) the database.

Logging is oslo.log's (``oslo_log.log.setup``): ``log_file`` / ``log_dir``,
``use_journal``, ``use_syslog``, ``use_json`` (oslo.log's JSONFormatter),
``debug`` and ``default_log_levels`` come from the configuration file or the
command line, and every line logged while an API request is handled carries
its request id through oslo.context (``provfw.api.middleware``).  Without a
log file or journald, lines go to standard output (captured by journald under
systemd).  The ``[api] audit_log`` file is one more handler, on the
``provfw.audit`` logger only, writing the bare JSON audit lines.
"""

from __future__ import annotations

import logging
import signal
import threading

from oslo_log import log as oslo_log

import provfw
from provfw import conf as provfw_conf
from provfw import exception, systemd
from provfw.retrying import retrying

CONF = provfw_conf.CONF
LOG = logging.getLogger(__name__)

_audit_handler: logging.Handler | None = None


def setup_logging(conf=CONF) -> None:
    """Configure logging from ``conf`` (oslo.log's options, already parsed); add the audit file if set."""
    global _audit_handler
    oslo_log.setup(conf, "provfw", provfw.__version__)
    audit = logging.getLogger("provfw.audit")
    if _audit_handler is not None:
        audit.removeHandler(_audit_handler)
        _audit_handler.close()
        _audit_handler = None
    if conf.api.audit_log:
        _audit_handler = logging.FileHandler(conf.api.audit_log)
        _audit_handler.setFormatter(logging.Formatter("%(message)s"))
        audit.addHandler(_audit_handler)


def prepare(argv=None, database: bool = True) -> None:
    """Parse config and set up logging; with ``database``, point the db layer at the configured database.

    Only provfw-api, provfw-conductor, provfw-manage and the all-in-one pass
    ``database=True``; the db layer is imported only then, so a compute
    worker never loads it (nor a database driver).
    """
    provfw_conf.parse_args(argv)
    setup_logging()
    if database:
        import eventlet.patcher

        if eventlet.patcher.is_monkey_patched("socket"):
            from provfw.cmd import eventlet_patch
            eventlet_patch.green_database()
        from provfw.db import api as db
        db.configure(provfw_conf.database_url(), CONF.database.pool_size)


def close_database() -> None:
    """At a clean stop, close the pooled database connections: the last close of a SQLite database
    checkpoints its write-ahead log and removes the ``-wal`` / ``-shm`` files."""
    from provfw.db import api as db

    db.dispose()


def wait_for_database(what: str, stop: threading.Event | None = None) -> int:
    """Block until the database answers; return its generation.

    Retries with backoff (0.5 s to 10 s) while it is unreachable, telling
    systemd why in ``STATUS=`` (``systemctl status`` shows it), so READY=1 is
    only ever sent by a daemon that can reach its database.  A schema that
    was never migrated is not retried: the error propagates.
    """
    from provfw.db import api as db

    def probe() -> int:
        try:
            return db.ping()
        except exception.DatabaseUnavailable as exc:
            systemd.notify(f"STATUS=waiting for the database: {exc.message}")
            raise

    return retrying(f"{what}: reaching the database", exception.DatabaseUnavailable, initial=0.5, maximum=10.0,
                    stop_event=stop, log=LOG)(probe)


def stop_on_signals(log: logging.Logger, message: str = "stopping") -> threading.Event:
    """Install SIGTERM/SIGINT handlers that set (and log) the returned event; the daemon's loop waits on it.

    The handlers only log and set a flag: anything heavier inside a signal handler could deadlock on a
    lock the interrupted code holds.  Call from the main thread (``signal.signal`` requires it).
    """
    stopping = threading.Event()

    def _stop(signum, _frame):
        log.info("signal %s: %s", signum, message)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return stopping


class StopRequest:
    """SIGTERM/SIGINT, noted for an eventlet server's main greenthread to poll (``requested``).

    The handler only logs and sets a plain attribute: no lock, no exception.  Raising SystemExit from
    the handler (what this replaced) was swallowed whenever the signal landed in a weakref callback or a
    ``__del__`` - "Exception ignored in: <function WeakKeyDictionary...>" - and the API kept serving
    until systemd's SIGKILL (found stopping the API under load in ``benchmarks/bench_api.py``).
    """

    def __init__(self, log: logging.Logger, message: str = "stopping"):
        self.requested = False
        self._log, self._message = log, message

    def install(self) -> "StopRequest":
        """Install the handlers (call from the main thread: ``signal.signal`` requires it); returns self."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self._log.info("signal %s: %s", signum, self._message)
