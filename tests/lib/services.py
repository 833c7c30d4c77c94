"""Real services for tests: databases, RabbitMQ, libvirtd, kernel tools.

``require`` skips a test when a component is missing on a developer's
machine, but FAILS it when ``CI=true``: in CI a missing component is a
broken set-up, never a reason to run less.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess

import pytest

PG_ADMIN_URL = os.environ.get("PROVFW_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URL = os.environ.get("PROVFW_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/")
RABBIT_URL = os.environ.get("PROVFW_TEST_RABBIT", "rabbit://guest:guest@127.0.0.1:5672//")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, what: str) -> None:
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true and {what} is missing: the test set-up must provide it")
    pytest.skip(f"{what} is not available on this machine")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_root_netns() -> None:
    require(os.geteuid() == 0 and shutil.which("ip") is not None, "root with iproute2 (network namespaces)")


def require_tools(*tools: str) -> None:
    for tool in tools:
        require(shutil.which(tool) is not None, f"the '{tool}' command")


def require_rabbitmq() -> str:
    require(port_open("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    return RABBIT_URL


class TestDatabase:
    """A fresh database on a real server, dropped at ``drop()``."""

    def __init__(self, kind: str):
        import sqlalchemy as sa

        self.kind = kind
        self.name = f"provfw_test_{secrets.token_hex(4)}"
        self._admin = None
        if kind == "sqlite":
            import tempfile
            self._dir = tempfile.mkdtemp(prefix="provfw-test-")
            self.url = f"sqlite:///{self._dir}/provfw.sqlite"
        elif kind == "postgresql":
            require(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
            self._admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with self._admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{self.name}"')
            self.url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.name}"
        elif kind == "mariadb":
            require(port_open("127.0.0.1", 3306), "MariaDB on 127.0.0.1:3306")
            self._admin = sa.create_engine(MYSQL_ADMIN_URL)
            with self._admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
            self.url = MYSQL_ADMIN_URL.rstrip("/") + f"/{self.name}?charset=utf8mb4"
        else:
            raise ValueError(kind)

    def drop(self) -> None:
        from provfw.db import api as db

        db.dispose()
        if self.kind == "sqlite":
            shutil.rmtree(self._dir, ignore_errors=True)
            return
        assert self._admin is not None
        with self._admin.connect() as conn:
            if self.kind == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{self.name}`")
                conn.commit()
        self._admin.dispose()


def libvirtd_running() -> bool:
    return subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0
