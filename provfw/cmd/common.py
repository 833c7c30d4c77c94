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

import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from oslo_config import cfg
from oslo_log import log as oslo_log

import provfw
from provfw import conf as provfw_conf
from provfw import exception, systemd
from provfw.retrying import retrying

CONF = provfw_conf.CONF
LOG = logging.getLogger(__name__)

_audit_handler: logging.Handler | None = None

# Libraries whose INFO lines say nothing to an operator: alembic lists each plugin it sets up (a dozen lines
# before every provfw-manage answer) and guesses at PostgreSQL sequences during ``db check``.  WARNING unless
# ``debug`` is set or ``default_log_levels`` names them.
QUIET_LOGGERS = ("alembic.runtime.plugins", "alembic.ddl.postgresql")


def setup_logging(conf=CONF) -> None:
    """Configure logging from ``conf`` (oslo.log's options, already parsed); add the audit file if set."""
    global _audit_handler
    oslo_log.setup(conf, "provfw", provfw.__version__)
    if not conf.debug:
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:        # not named in the operator's default_log_levels
                logger.setLevel(logging.WARNING)
    audit = logging.getLogger("provfw.audit")
    if _audit_handler is not None:
        audit.removeHandler(_audit_handler)
        _audit_handler.close()
        _audit_handler = None
    if conf.api.audit_log:
        _audit_handler = logging.FileHandler(conf.api.audit_log)
        _audit_handler.setFormatter(logging.Formatter("%(message)s"))
        audit.addHandler(_audit_handler)


def program() -> str:
    """The name the process was started as (``provfw-api``), for messages that precede logging."""
    return os.path.basename(sys.argv[0]) or "provfw"


def daemon_main(function: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a daemon's ``main``: a ConfigError raised while it starts (a driver name that is no entry point, a
    malformed ``[compute] host``) ends it as ``prepare`` ends a malformed file - one line on stderr, exit
    status 2 - and not in a traceback.  The line is also logged when logs go to a file, journald or syslog."""
    @functools.wraps(function)
    def main(argv=None):
        try:
            return function(argv)
        except exception.ConfigError as exc:
            failure = exc
        print(f"{program()}: {failure.message}", file=sys.stderr)
        if CONF.log_file or CONF.use_journal or CONF.use_syslog:
            LOG.error("%s: %s", program(), failure.message)
        return 2
    return main


def prepare(argv=None, database: bool = True) -> None:
    """Parse config and set up logging; with ``database``, point the db layer at the configured database.

    A configuration that cannot be read - a missing or malformed file, a bad value (``check_values``) - is
    one line on stderr and exit status 2, not a traceback.

    Only provfw-api, provfw-conductor, provfw-manage and the all-in-one pass
    ``database=True``; the db layer is imported only then, so a compute
    worker never loads it (nor a database driver).
    """
    try:
        provfw_conf.parse_args(argv)
        provfw_conf.check_values()
    except (cfg.Error, exception.ConfigError) as exc:
        # Logging is not set up yet (its options are what failed to parse): one line on stderr, exit 2.
        print(f"{program()}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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


def wait_for_database(what: str, stop: threading.Event | SignalFlag | None = None, migrate: bool = False) -> int:
    """Block until the database answers; return its generation.

    Retries with backoff (0.5 s to 10 s) while it is unreachable, telling
    systemd why in ``STATUS=`` (``systemctl status`` shows it), so READY=1 is
    only ever sent by a daemon that can reach its database.  A database
    without provfw's schema, or with one older than this release, is not
    waited for - only ``provfw-manage db sync`` changes that: the daemon
    logs one line saying what to run (and tells systemd) and exits 1.  A
    schema newer than this release (a rolling upgrade migrated first) is
    logged and accepted.  With ``migrate`` (the all-in-one) the schema is
    created or upgraded instead, once the database answers.

    When ``stop`` is set meanwhile, the last DatabaseUnavailable is raised:
    the caller, which installed ``stop``, ends as on any stop request.
    """
    try:
        return _wait_for_database(what, stop, migrate)
    except exception.SchemaNotReady as exc:
        failure = exc
    # Logged after the except block: oslo.log appends the exception being handled to an ERROR line.
    LOG.error("%s: %s", what, failure.message)
    systemd.notify(f"STATUS={failure.message}")
    raise SystemExit(1)


def _wait_for_database(what: str, stop: threading.Event | SignalFlag | None, migrate: bool) -> int:
    from provfw.db import api as db
    from provfw.db import migration

    def probe() -> int | None:
        try:
            return db.ping()
        except exception.SchemaNotReady:
            if migrate:
                return None                 # it answers: migrate it below
            raise
        except exception.DatabaseUnavailable as exc:
            systemd.notify(f"STATUS=waiting for the database: {exc.message}")
            raise

    generation = retrying(f"{what}: reaching the database", exception.DatabaseUnavailable, initial=0.5,
                          maximum=10.0, stop_event=stop, log=LOG)(probe)
    current = migration.db_version(provfw_conf.database_url())
    if migrate and not migration.schema_newer(current):
        migration.db_sync(provfw_conf.database_url())
        return db.ping()
    if migration.schema_behind(current):
        raise exception.SchemaNotReady(f"the schema is at {current or '(empty)'}, this release's at "
                                       f"{migration.head_revision()}: run 'provfw-manage db sync'")
    if migration.schema_newer(current):
        LOG.warning("%s: the schema is at %s, which this release (at %s) does not know: a newer release "
                    "migrated it; running on", what, current, migration.head_revision())
    return generation


POLL = 0.1      # seconds: how soon a loop waiting on a SignalFlag sees a signal


class SignalFlag:
    """Signals noted by their handler as one plain attribute, for the daemon's own loop to act on.

    CPython runs a signal handler in the main thread "between bytecode instructions" of whatever runs
    there (the ``signal`` module's documentation); under eventlet that is any greenthread, or the hub.
    So the handler must not take a lock.  Under eventlet, logging's handler lock and the Condition inside
    ``threading.Event`` are green locks: if the signal lands while a greenthread is half-way through
    releasing one (``_owner`` cleared, the semaphore not yet released), the handler waits, inside that
    very greenthread, for a release only that greenthread can make once the handler returns.  That
    greenthread hangs, every greenthread that logs waits behind it, and the daemon hangs until
    systemd's SIGKILL.  CI found it (``tests/functional/test_api_stop.py``: provfw-api under load, no
    line logged after SIGTERM, still running 8 s later).  The handlers before this one logged, or set a
    ``threading.Event``, inside the handler.

    So ``_handle`` stores the signal number and does nothing else.  ``is_set`` and ``wait`` (every
    ``POLL`` seconds) read it, with the interface of ``threading.Event`` that ``provfw.retrying`` and
    the daemons' loops use; ``take`` reads and clears it, for signals that ask for one action each
    (SIGUSR1's counter dump).  The first call that sees the flag logs ``message``, if one was given.
    """

    def __init__(self, signals: tuple[int, ...], log: logging.Logger | None = None, message: str | None = None):
        self.signum: int | None = None        # the last signal noted; written only by the handler and take()
        self._signals, self._log, self._message = signals, log, message
        self._announced = False

    def install(self) -> "SignalFlag":
        """Install the handler (call from the main thread: ``signal.signal`` requires it); returns self."""
        for signum in self._signals:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum                   # one attribute store: no lock, no I/O, no exception

    def is_set(self) -> bool:
        """True once a signal was noted (and not taken); the first True logs the message."""
        signum = self.signum
        if signum is None:
            return False
        if not self._announced and self._log is not None and self._message is not None:
            self._announced = True
            self._log.info("signal %s: %s", signum, self._message)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for a signal; returns ``is_set()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = POLL if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL, left))        # green under eventlet's monkey patching
        return True

    def take(self) -> bool:
        """True if a signal was noted since the last take, and clear it (two signals close together: one)."""
        if self.signum is None:
            return False
        self.signum = None
        return True


class StopRequest(SignalFlag):
    """SIGTERM and SIGINT: the daemon's main loop stops when ``is_set()``; it logs "signal N: <message>" once."""

    def __init__(self, log: logging.Logger, message: str = "stopping"):
        super().__init__((signal.SIGTERM, signal.SIGINT), log, message)
