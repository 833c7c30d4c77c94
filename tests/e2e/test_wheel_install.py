"""The production install, exactly as the README shows it: a wheel built from this tree, installed WITHOUT -e
into a fresh venv, migrating SQLite and a fresh PostgreSQL database, and running provfw-all-in-one from there.

Every other test imports provfw from the source tree (``pip install -e``), so none of them notices a file the
wheel forgets (the migrations once were).  Here nothing runs from the tree: the commands run with the venv's
own interpreters from a scratch directory, and the first test proves the code came from the venv.

The shell commands below are the README's; ``test_the_readme_shows_these_commands`` keeps them in step.
The daemon is used as a black box: start it, wait for /healthz, talk to it with the venv's ``provfw`` CLI.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest
import requests

from provfw.db import migration
from tests.lib import deployment as deploy
from tests.lib import services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CIDR = "203.0.113.0/24"

# Run by bash with $DIST, $VENV, $CONF (and $URL, $STATE for the CLI) set; 'python3' is one with 'build'.
BUILD = 'python3 -m build --outdir "$DIST" .'
VENV = 'python3 -m venv "$VENV"'
INSTALL = '"$VENV/bin/pip" install "$(ls "$DIST"/provfw-*.whl)[postgresql]"'
DB_SYNC = '"$VENV/bin/provfw-manage" --config-file "$CONF" db sync'
DB_CHECK = '"$VENV/bin/provfw-manage" --config-file "$CONF" db check'
ALL_IN_ONE = '"$VENV/bin/provfw-all-in-one" --config-file "$CONF"'
BLOCK = f'"$VENV/bin/provfw" --url "$URL" --token "$(cat "$STATE/admin-token")" block {CIDR}'
RULES = '"$VENV/bin/provfw" --url "$URL" --token "$(cat "$STATE/admin-token")" rules'


def sh(command: str, env: dict, cwd: str, timeout: float = 300) -> str:
    """Run ``command`` in bash (-e -u -o pipefail); its stdout, or fail the test with both outputs."""
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def clean_env(**values: str) -> dict:
    """The environment without anything that would point Python at the source tree or another venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PROVFW_")}
    # 'python3' is the interpreter running the tests: it has 'build' (the [test] extra).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env.update(values)
    return env


def write_conf(path: str, text: str) -> str:
    with open(path, "w") as handle:
        handle.write(text)
    return path


@pytest.fixture(scope="module")
def installed():
    """A wheel built from this tree and a fresh venv with it installed; both removed at the end."""
    services.require(importlib.util.find_spec("build") is not None, "the 'build' package (pip install -e '.[test]')")
    services.require(importlib.util.find_spec("ensurepip") is not None, "python3 -m venv with ensurepip")
    root = tempfile.mkdtemp(prefix="provfw-wheel-")
    try:
        env = clean_env(DIST=os.path.join(root, "dist"), VENV=os.path.join(root, "venv"))
        sh(BUILD, env, cwd=REPO)
        sh(VENV, env, cwd=root)
        sh(INSTALL, env, cwd=root, timeout=600)
        yield {"root": root, "env": env, "venv": env["VENV"], "dist": env["DIST"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_venv_runs_provfw_from_the_wheel_with_its_migrations(installed):
    (wheel,) = [f for f in os.listdir(installed["dist"]) if f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(installed["dist"], wheel)) as archive:
        names = set(archive.namelist())
    assert {"provfw/db/migrations/env.py", "provfw/db/migrations/script.py.mako"} <= names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("provfw/db/migrations/versions/")}
    assert shipped == {f for f in os.listdir(os.path.join(migration.MIGRATIONS_DIR, "versions")) if f.endswith(".py")}
    where = sh('"$VENV/bin/python" -c "import provfw.db.migration as m; print(m.MIGRATIONS_DIR)"',
               installed["env"], cwd=installed["root"]).strip()
    assert where.startswith(installed["venv"] + os.sep), f"provfw was imported from {where}, not from the venv"


def test_the_wheel_declares_its_config_options_and_drivers_as_entry_points(installed):
    env, root = installed["env"], installed["root"]
    with open(os.path.join(REPO, "etc", "provfw", "provfw.conf.sample")) as handle:
        sample = handle.read()
    # The namespaces of etc/provfw/provfw-config-generator.conf: provfw's options and oslo.log's.
    assert sh('"$VENV/bin/oslo-config-generator" --namespace provfw --namespace oslo.log', env, cwd=root) == sample
    assert sh('"$VENV/bin/provfw-manage" config sample', env, cwd=root) == sample
    loaded = sh('"$VENV/bin/python" -c "from provfw import plugins; '
                "print(plugins.driver_class('provfw.compute_drivers', 'libvirt').__name__, "
                "plugins.driver_class('provfw.firewall_drivers', 'noop').__name__)\"", env, cwd=root)
    assert loaded.split() == ["LibvirtConnection", "NoopFirewallDriver"]


def test_the_wheel_installs_the_systemd_units_the_sample_and_the_docs_under_the_venvs_share(installed):
    # Found by stop 28's operator trial: the wheel held none of them, and the units' Documentation= named a
    # file nothing installed.
    venv = installed["venv"]
    units = sorted(os.listdir(os.path.join(REPO, "etc", "systemd")))
    assert units and sorted(os.listdir(os.path.join(venv, "share", "provfw", "systemd"))) == units
    for unit in units:
        with open(os.path.join(venv, "share", "provfw", "systemd", unit)) as handle:
            (documentation,) = [line.split("=", 1)[1].strip() for line in handle if line.startswith("Documentation=")]
        # The units run /opt/provfw/bin/...: their docs are in that venv's share/doc/provfw.
        assert documentation.startswith("file:///opt/provfw/"), documentation
        assert os.path.exists(documentation.replace("file:///opt/provfw", venv, 1)), documentation
    with open(os.path.join(REPO, "etc", "provfw", "provfw.conf.sample")) as handle:
        sample = handle.read()
    with open(os.path.join(venv, "share", "provfw", "provfw.conf.sample")) as handle:
        assert handle.read() == sample
    docs = {name for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")}
    assert set(os.listdir(os.path.join(venv, "share", "doc", "provfw"))) == docs


def head_revision() -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory(migration.MIGRATIONS_DIR).get_current_head()


def sync_and_check(installed, name: str, conf_text: str) -> None:
    conf = write_conf(os.path.join(installed["root"], f"{name}.conf"), conf_text)
    env = dict(installed["env"], CONF=conf)
    assert sh(DB_SYNC, env, cwd=installed["root"]).strip() == f"schema at {head_revision()}"
    assert "models and migrations agree" in sh(DB_CHECK, env, cwd=installed["root"])
    # A second sync on a current schema changes nothing and still succeeds (what every upgrade run does).
    assert sh(DB_SYNC, env, cwd=installed["root"]).strip() == f"schema at {head_revision()}"


def test_db_sync_and_check_from_the_wheel_on_sqlite(installed):
    state = os.path.join(installed["root"], "sqlite-state")
    sync_and_check(installed, "sqlite", f"[DEFAULT]\nstate_path = {state}\n")
    assert os.path.exists(os.path.join(state, "provfw.sqlite"))


def test_db_sync_and_check_from_the_wheel_on_a_fresh_postgresql_database(installed):
    database = services.TestDatabase("postgresql")
    try:
        sync_and_check(installed, "postgresql", f"[database]\nconnection = {database.url}\n")
    finally:
        database.drop()


def test_all_in_one_from_the_wheel_blocks_a_cidr_through_the_venvs_cli(installed):
    root = installed["root"]
    state = os.path.join(root, "aio-state")
    port = deploy.free_port()
    # noop: the daemon must not touch this host's firewall; the point here is the install, not the kernel.
    conf = write_conf(os.path.join(root, "aio.conf"), f"""[DEFAULT]
state_path = {state}
[api]
bind_port = {port}
[compute]
host = wheel-install
firewall_driver = noop
""")
    url = f"http://127.0.0.1:{port}"
    env = dict(installed["env"], CONF=conf, URL=url, STATE=state)
    log_path = os.path.join(root, "aio.log")

    def log() -> str:
        with open(log_path, errors="replace") as handle:
            return handle.read()[-4000:]

    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(["bash", "-c", "exec " + ALL_IN_ONE], env=env, cwd=root, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"provfw-all-in-one exited with {proc.returncode}:\n{log()}"
            assert time.monotonic() < deadline, f"/healthz did not answer within 120 s:\n{log()}"
            try:
                if requests.get(url + "/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        sh(BLOCK, env, cwd=root, timeout=60)
        listed = sh(RULES, env, cwd=root, timeout=60)
        assert CIDR in listed, listed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                pytest.fail(f"provfw-all-in-one ignored SIGTERM for 30 s:\n{log()}")


def test_the_readme_shows_these_commands():
    with open(os.path.join(REPO, "README.md")) as handle:
        readme = handle.read()
    for command in (BUILD, VENV, INSTALL, DB_SYNC, DB_CHECK, ALL_IN_ONE, BLOCK, RULES):
        assert command in readme, f"README.md no longer shows: {command}"
    assert not re.search(r"(?<![.\w])/work/", readme), "README.md names an absolute /work/ path"
