"""Fixtures shared by every tier."""

from __future__ import annotations

import pytest

from tests.lib import services

DATABASE_KINDS = ("sqlite", "postgresql", "mariadb")


@pytest.fixture
def conf(tmp_path):
    """A fresh oslo.config object with provfw's options, state under tmp_path."""
    from oslo_config import cfg

    from provfw import conf as provfw_conf

    conf = cfg.ConfigOpts()
    provfw_conf.register_opts(conf)
    conf([], project="provfw", default_config_files=[])
    conf.set_override("state_path", str(tmp_path / "state"))
    yield conf
    conf.reset()


def _migrated(kind: str):
    from provfw.db import api as db
    from provfw.db import migration

    database = services.TestDatabase(kind)
    migration.db_sync(database.url)
    db.configure(database.url)
    return database


@pytest.fixture(scope="session")
def _session_databases():
    """One migrated database per kind for the whole run (migrating per test costs a second each)."""
    databases: dict = {}
    yield databases
    for database in databases.values():
        database.drop()


def _empty(databases: dict, kind: str):
    """The session's database of ``kind``, emptied and configured as provfw's database."""
    import sqlalchemy as sa

    from provfw.db import api as db
    from provfw.db.sqlalchemy import models

    if kind not in databases:
        databases[kind] = _migrated(kind)
    database = databases[kind]
    engine = db.configure(database.url)
    with engine.begin() as conn:
        for table in reversed(models.Base.metadata.sorted_tables):
            conn.execute(table.delete())
        conn.execute(sa.insert(models.FirewallGeneration.__table__).values(id=1, generation=0, live_rules=0))
    return database


@pytest.fixture(params=DATABASE_KINDS)
def any_db(request, _session_databases):
    """An empty, migrated database of each kind (SQLite, PostgreSQL, MariaDB), configured as provfw's database."""
    yield _empty(_session_databases, request.param)


@pytest.fixture
def sqlite_db(_session_databases):
    yield _empty(_session_databases, "sqlite")


@pytest.fixture
def pg_db(_session_databases):
    yield _empty(_session_databases, "postgresql")


@pytest.fixture
def fresh_db(request):
    """A brand-new database of the kind given by indirect parametrisation (default sqlite), migrated from empty."""
    database = _migrated(getattr(request, "param", "sqlite"))
    yield database
    database.drop()


# Modules whose tests need only the databases (each test's own, or a per-process session database with a
# random name) and servers run inside the test process: under ``pytest -n N --dist loadgroup`` (what
# tools/run-tests.sh runs) xdist spreads them over every worker.  Every other test - network namespaces, the
# kernel's tools, libvirtd's process-wide nwfilters, the real daemons, RabbitMQ users - is in the xdist group
# "host" and runs on one worker in collection order, as it did before xdist, so no two of them ever overlap.
SPREAD_MODULES = frozenset({
    "tests/functional/test_api.py", "tests/functional/test_api_contract.py", "tests/functional/test_api_feeds.py",
    "tests/functional/test_api_operations.py", "tests/functional/test_bootstrap_token.py",
    "tests/functional/test_cli.py", "tests/functional/test_cli_feeds.py", "tests/functional/test_db.py",
    "tests/functional/test_db_generation_lock.py", "tests/functional/test_db_group_commit.py",
    "tests/functional/test_db_sources.py", "tests/functional/test_feed_fetch.py",
    "tests/functional/test_feed_sync.py",
})


def pytest_itemcollected(item):
    """Put every test outside ``SPREAD_MODULES`` and ``tests/unit`` in the xdist group "host" (as it is
    collected: xdist's worker reads the marks into the test ids in its pytest_collection_modifyitems)."""
    module = item.nodeid.split("::", 1)[0]
    if module not in SPREAD_MODULES and not module.startswith("tests/unit/"):
        item.add_marker(pytest.mark.xdist_group("host"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under ``--dist loadgroup`` stop at once if xdist did not write the groups into the test ids.

    pytest 9.2 stores node ids where pytest-xdist 3.8 does not write them (pytest-xdist#1386): the groups are
    then silently ignored and host tests overlap (two workers creating the same RabbitMQ user, defining
    nwfilters at once).  setup.cfg keeps pytest below 9.2 until xdist follows; this says so if it ever does not.
    """
    if node.config.getoption("dist", "no") != "loadgroup":
        return
    lost = [nodeid for nodeid in ids if "@" not in nodeid and nodeid.split("::", 1)[0] not in SPREAD_MODULES
            and not nodeid.startswith("tests/unit/")]
    if lost:
        pytest.exit(f"pytest-xdist ignored the xdist_group of {len(lost)} tests (e.g. {lost[0]}): pytest and "
                    "pytest-xdist disagree on node ids (pytest-xdist#1386); install the versions setup.cfg's test "
                    "extra names, or run with -n 0", returncode=3)


def pytest_collection_finish(session):
    """Fail at once if collecting imported a daemon entry point: it monkey-patches this process with eventlet.

    Under eventlet the test process's threads, sockets and locks turn green, and tests that run real
    threads (in-process servers, consumers) hang instead of failing.  Import what a daemon uses from its
    own module (e.g. provfw.bootstrap), or run the daemon as a subprocess.
    """
    import sys

    if "provfw.cmd.eventlet_patch" in sys.modules:
        raise pytest.UsageError("a test module imported a provfw daemon entry point (provfw.cmd.api/compute/"
                                "conductor/all_in_one), which monkey-patches the test process with eventlet")
