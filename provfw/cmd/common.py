"""Start-up shared by the provfw daemons and tools: config, logging, database."""

from __future__ import annotations

import logging
import sys

from provfw import conf as provfw_conf
from provfw.db import api as db

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


def prepare(argv=None, description: str = "") -> None:
    """Parse config, set up logging, point the db layer at the configured database."""
    provfw_conf.parse_args(argv)
    setup_logging()
    db.configure(provfw_conf.database_url(), CONF.database.pool_size)
