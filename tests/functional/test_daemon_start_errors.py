"""What the daemons and provfw-manage say when they cannot start: one line naming the problem and what to do,
an exit status a unit or a script can act on, never a traceback.

* A configuration that cannot be read (missing or malformed file, a malformed value, ``use_journal`` without
  the systemd bindings): ``<program>: <what>`` on stderr, exit status 2, before anything is started.
* A database without provfw's schema, or with one older than this release: provfw-api and provfw-conductor
  log ``run 'provfw-manage db sync'`` and exit 1 at once, instead of retrying forever as if the database were
  down (SQLite reports a missing table as an OperationalError) or ending in SQLAlchemy's traceback
  (PostgreSQL, MariaDB).

Every daemon runs as a subprocess of the installed entry point, against real databases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from provfw.db import migration
from tests.lib import services

pytestmark = pytest.mark.functional

BIN = os.path.dirname(sys.executable)
DAEMONS = ("provfw-api", "provfw-conductor", "provfw-compute", "provfw-all-in-one")


def run(program: str, config, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([os.path.join(BIN, program), "--config-file", str(config), *args], capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - started


def write(path, text: str):
    path.write_text(text)
    return path


def base(tmp_path) -> str:
    """Nothing that could bind a shared port or touch this host's firewall, should a daemon get that far."""
    return (f"[DEFAULT]\nstate_path = {tmp_path}/state\n[api]\nbind_port = 0\n[metrics]\napi_port = 0\n"
            "conductor_port = 0\ncompute_port = 0\n[compute]\nfirewall_driver = noop\n")


def assert_one_line(result: subprocess.CompletedProcess, program: str, status: int, *words: str) -> None:
    assert result.returncode == status, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stdout + result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("program", [*DAEMONS, "provfw-manage"])
def test_a_malformed_value_stops_every_program_at_start_naming_the_option_and_file(program, tmp_path):
    config = write(tmp_path / "bad.conf", base(tmp_path).replace("bind_port = 0", "bind_port = eighty"))
    result, _ = run(program, config, *(["db", "version"] if program == "provfw-manage" else []))
    assert_one_line(result, program, 2, "[api] bind_port", str(config), "invalid literal for int()")


@pytest.mark.parametrize("case", ["missing file", "malformed file", "unknown choice", "command-line option",
                                  "substitution"])
def test_a_configuration_that_cannot_be_read_is_one_line_and_status_two(case, tmp_path):
    if case == "command-line option":      # oslo.config checked it itself: its own line, no file, status 1
        config = write(tmp_path / "debug.conf", base(tmp_path).replace("[DEFAULT]\n", "[DEFAULT]\ndebug = maybe\n"))
        words = ("[DEFAULT] debug", "debug.conf", "Invalid Boolean value: maybe")
    elif case == "substitution":           # oslo.config named the option read, not the one it refers to
        config = write(tmp_path / "subst.conf", base(tmp_path) + "[iptables]\nbackend = $fastest\n")
        words = ("[iptables] backend", "subst.conf", "it refers to $fastest, which is no option")
    elif case == "missing file":
        config, words = tmp_path / "absent.conf", ("Failed to find some config files", "absent.conf")
    elif case == "malformed file":
        config = write(tmp_path / "broken.conf", "[DEFAULT\nstate_path = /x\n")
        words = ("Failed to parse", "broken.conf", "Invalid section")
    else:
        config = write(tmp_path / "choice.conf", base(tmp_path) + "[iptables]\nbackend = fastest\n")
        words = ("[iptables] backend", "Valid values are [auto, nft, legacy], but found 'fastest'")
    result, _ = run("provfw-compute", config)
    assert_one_line(result, "provfw-compute", 2, *words)


@pytest.fixture
def empty_database(request, tmp_path):
    """A database of the parametrised kind with no tables at all."""
    database = services.TestDatabase(request.param)
    yield database
    database.drop()


def head_minus_one() -> str:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migration.alembic_config("sqlite://"))
    return scripts.get_revision(scripts.get_current_head()).down_revision


@pytest.mark.parametrize("empty_database", ["sqlite", "postgresql", "mariadb"], indirect=True)
@pytest.mark.parametrize("program", ["provfw-api", "provfw-conductor"])
def test_without_a_schema_the_daemons_say_to_run_db_sync_and_exit_at_once(program, empty_database, tmp_path):
    config = write(tmp_path / "p.conf", base(tmp_path) + f"[database]\nconnection = {empty_database.url}\n")
    result, took = run(program, config)
    assert result.returncode == 1 and took < 30, (result.returncode, took, result.stdout[-2000:])
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert f"{program}: the database has no provfw schema: run 'provfw-manage db sync'" in output, output[-3000:]
    assert "reaching the database failed" not in output          # not taken for a database that is down


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_with_a_schema_older_than_this_release_the_api_says_how_far_behind_and_exits(empty_database, tmp_path):
    older = head_minus_one()
    migration.db_sync(empty_database.url, older)                  # a real schema of the previous release
    config = write(tmp_path / "p.conf", base(tmp_path) + f"[database]\nconnection = {empty_database.url}\n")
    result, _ = run("provfw-api", config)
    assert result.returncode == 1, result.stdout[-2000:]
    assert (f"provfw-api: the schema is at {older}, this release's at {migration.head_revision()}: "
            "run 'provfw-manage db sync'") in result.stdout + result.stderr


@pytest.mark.parametrize("program, option, words", [
    ("provfw-compute", "host = bad host!", ("[compute] host 'bad host!' must be",)),
    ("provfw-compute", "firewall_driver = nosuch", ("unknown provfw.firewall_drivers 'nosuch'", "ipset")),
    ("provfw-all-in-one", "firewall_driver = nosuch", ("unknown provfw.firewall_drivers 'nosuch'",)),
])
def test_a_worker_configuration_provfw_itself_refuses_is_one_line_and_status_two(program, option, words, tmp_path):
    """Checked by provfw, not oslo.config (a driver that is no entry point, a host name a bus user cannot
    carry): the same answer as a malformed file.  The all-in-one does nothing first (no schema, no token, no
    conductor)."""
    config = write(tmp_path / "w.conf", base(tmp_path) + option + "\n")     # base ends in [compute]
    result, _ = run(program, config)
    assert_one_line(result, program, 2, *words)
    assert "conductor" not in result.stdout
    state = tmp_path / "state"                          # no schema, no bootstrap token: nothing was done
    database = state / "provfw.sqlite"                  # (created empty, mode 0600, when the engine is set up)
    assert not (state / "admin-token").exists() and (not database.exists() or database.stat().st_size == 0)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WAITING_DAEMONS = ("provfw-api", "provfw-conductor", "provfw-all-in-one")


@pytest.mark.parametrize("program, signal_name, away",
                         [(program, signal_name, "refused") for program in WAITING_DAEMONS
                          for signal_name in ("SIGTERM", "SIGINT")]
                         + [(program, "SIGTERM", "silent") for program in WAITING_DAEMONS])
def test_a_stop_while_the_database_is_away_ends_the_wait_cleanly(program, signal_name, away, tmp_path):
    """Refused: nothing listens.  Silent: a server accepts and never answers (provfw.cmd.psycopg_wait gives each
    connect 5 s, so the wait is seen and the stop taken between attempts)."""
    import signal

    from tests.lib.silent import Silent

    silent = Silent() if away == "silent" else None
    port = silent.port if silent else free_port()                                        # nothing listens
    unreachable = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/provfw"
    config = write(tmp_path / "down.conf", base(tmp_path) + f"[database]\nconnection = {unreachable}\n")
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([os.path.join(BIN, program), "--config-file", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "reaching the database failed" not in log.read_text():           # it waits, not exits
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(getattr(signal, signal_name))
        assert proc.wait(10) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if silent:
            silent.close()
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert f"{program} stopped before the database answered" in text, text[-3000:]


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_the_all_in_one_waits_for_its_database_then_creates_the_schema_and_serves(empty_database, tmp_path):
    import requests

    from tests.lib.tcpproxy import TcpProxy

    with TcpProxy("127.0.0.1", 5432) as proxy:
        proxy.cut()                                                          # the database is away at start
        url = empty_database.url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert url != empty_database.url, empty_database.url
        port = free_port()
        config = write(tmp_path / "aio.conf", base(tmp_path).replace("bind_port = 0", f"bind_port = {port}")
                       + f"[database]\nconnection = {url}\n")
        log = tmp_path / "out.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([os.path.join(BIN, "provfw-all-in-one"), "--config-file", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while "reaching the database failed" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            proxy.restore()
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                try:
                    health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    if health.status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            assert health.json()["status"] == "ok"
            assert migration.db_version(empty_database.url) == migration.head_revision()
        finally:
            proc.terminate()
            proc.wait(20)


def test_provfw_manage_says_a_schema_newer_than_this_release_is_not_its_to_sync_or_check(tmp_path):
    """A rolling upgrade migrated first: db check must not advise a sync, and db sync must not end in alembic's
    "Can't locate revision" traceback."""
    import sqlalchemy as sa

    config = write(tmp_path / "m.conf", base(tmp_path))
    synced, _ = run("provfw-manage", config, "db", "sync")
    assert synced.returncode == 0, synced.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path}/state/provfw.sqlite")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for action in ("check", "sync"):
        result, _ = run("provfw-manage", config, "db", action)
        assert_one_line(result, "provfw-manage", 1, "the schema is at 9999, which this release (at "
                        f"{migration.head_revision()}) does not know: a newer release migrated it")
