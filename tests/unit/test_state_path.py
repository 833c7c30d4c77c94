"""$PROVFW_STATE_PATH moves the daemons' state_path and the CLI's admin-token lookup together."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = ("from provfw import cli, conf; conf.CONF([], project='provfw', default_config_files=[]); "
         "print(conf.CONF.state_path); print(cli.state_path())")


def state_paths(env: dict) -> list[str]:
    """(the daemons' state_path, the CLI's) in a fresh interpreter: the option's default is read at import."""
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return out.stdout.split()


def test_the_daemons_and_the_cli_both_follow_provfw_state_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROVFW_STATE_PATH"}
    env.update(HOME=str(tmp_path / "home"), PROVFW_STATE_PATH=str(tmp_path / "state"))
    assert state_paths(env) == [str(tmp_path / "state")] * 2
    del env["PROVFW_STATE_PATH"]
    assert state_paths(env) == [str(tmp_path / "home" / ".local" / "state" / "provfw")] * 2
