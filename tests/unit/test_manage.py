"""``provfw-manage`` commands that need no database: they run where no database library is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Runs manage.main in a fresh interpreter in which importing SQLAlchemy, alembic or a database driver fails,
# as on a broker node or a hypervisor without them.
_WITHOUT_DB = """
import sys
for name in ("sqlalchemy", "alembic", "psycopg2", "pymysql"):
    sys.modules[name] = None
from provfw.cmd import manage
code = manage.main(sys.argv[1:])
assert not any(name.startswith("provfw.db") for name in sys.modules), sorted(sys.modules)
sys.exit(code)
"""


def _manage(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    conf = tmp_path / "provfw.conf"
    conf.write_text(f"[DEFAULT]\nstate_path = {tmp_path / 'state'}\n")
    return subprocess.run([sys.executable, "-c", _WITHOUT_DB, "--config-file", str(conf), *argv],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", [
    ["bus", "permissions", "--role", "compute", "--host", "hv-1"],
    ["bus", "create-user", "--role", "compute", "--host", "hv-1", "--print"],
    ["config", "sample"],
])
def test_bus_and_config_commands_run_without_a_database_library(argv, tmp_path):
    result = _manage(tmp_path, *argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout


def test_a_database_command_still_needs_the_database_library(tmp_path):
    result = _manage(tmp_path, "db", "version")
    assert result.returncode != 0 and "import of sqlalchemy halted" in result.stderr, result.stderr


def test_a_compute_user_the_conductor_would_not_take_reports_from_is_created_with_a_warning(tmp_path):
    # Found by stop 28's operator trial: --user for a compute user named otherwise than compute_user_prefix +
    # host was created silently, and every report of that host was then refused by the conductor.
    result = _manage(tmp_path, "bus", "create-user", "--role", "compute", "--host", "hv-1", "--user", "ops-hv-1",
                     "--print")
    assert result.returncode == 0, result.stderr
    assert ("warning: the conductor accepts hv-1's reports only from the user 'provfw-compute-hv-1' "
            "([conductor] compute_user_prefix + host)") in result.stderr
    named = _manage(tmp_path, "bus", "create-user", "--role", "compute", "--host", "hv-1", "--user",
                    "provfw-compute-hv-1", "--print")
    assert named.returncode == 0 and "warning" not in named.stderr, named.stderr
