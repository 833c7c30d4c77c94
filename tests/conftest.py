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


@pytest.fixture(params=DATABASE_KINDS)
def any_db(request):
    """A migrated, empty database of each kind, configured as provfw's database."""
    database = _migrated(request.param)
    yield database
    database.drop()


@pytest.fixture
def sqlite_db():
    database = _migrated("sqlite")
    yield database
    database.drop()


@pytest.fixture
def pg_db():
    database = _migrated("postgresql")
    yield database
    database.drop()
