"""Start-up shared by the provfw daemons and tools: config, logging, and (for those allowed) the database."""

from __future__ import annotations

import logging
import sys

from provfw import conf as provfw_conf

CONF = provfw_conf.CONF


def setup_logging(conf=CONF) -> None:
    logging.basicConfig(level=logging.DEBUG if conf.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqp", "kombu", "sqlalchemy", "routes", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if conf.api.audit_log:
        handler = logging.FileHandler(conf.api.audit_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("provfw.audit").addHandler(handler)


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
