"""The shipped systemd units parse (systemd-analyze verify) and say what docs/operations.md promises:
Type=notify with a watchdog, hardening, and only the dataplane's capabilities on the hosts that need them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.lib import services

pytestmark = pytest.mark.functional

UNITS = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "systemd")
BIN = os.path.dirname(sys.executable)
NAMES = ("provfw-api", "provfw-conductor", "provfw-compute", "provfw-all-in-one")


def settings(name: str, kind: str = "service") -> dict[str, str]:
    values: dict[str, str] = {}
    with open(os.path.join(UNITS, f"{name}.{kind}")) as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                values[key] = value
    return values


@pytest.mark.parametrize("name", NAMES)
def test_the_unit_passes_systemd_analyze_verify(name, tmp_path):
    services.require_tools("systemd-analyze")
    with open(os.path.join(UNITS, f"{name}.service")) as handle:
        text = handle.read()
    # verify insists that ExecStart exists: point it at this venv's entry point instead of /opt/provfw.
    assert "ExecStart=/opt/provfw/bin/" in text
    (tmp_path / f"{name}.service").write_text(text.replace("/opt/provfw/bin/", BIN + "/"))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / f"{name}.service")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_every_unit_is_notify_with_a_watchdog_and_hardened(name):
    unit = settings(name)
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert int(unit["WatchdogSec"]) >= 30
    assert unit["StateDirectory"] == "provfw"
    assert unit["ProtectSystem"] == "strict" and unit["NoNewPrivileges"] == "yes"


@pytest.mark.parametrize("name", ("provfw-api", "provfw-conductor"))
def test_the_control_plane_runs_unprivileged_without_capabilities(name):
    unit = settings(name)
    assert unit["User"] == "provfw"
    assert unit["CapabilityBoundingSet"] == "" and unit["AmbientCapabilities"] == ""


@pytest.mark.parametrize("name", ("provfw-compute", "provfw-all-in-one"))
def test_the_dataplane_keeps_only_the_network_capabilities(name):
    unit = settings(name)
    assert set(unit["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"}
    assert unit["AmbientCapabilities"] == unit["CapabilityBoundingSet"]
    assert unit["TimeoutStartSec"] == "infinity"       # waits for its first apply, however long


def test_the_daily_purge_verifies_runs_unprivileged_and_purges_only_old_deletions(tmp_path):
    services.require_tools("systemd-analyze")
    for kind in ("service", "timer"):
        with open(os.path.join(UNITS, f"provfw-db-purge.{kind}")) as handle:
            (tmp_path / f"provfw-db-purge.{kind}").write_text(handle.read().replace("/opt/provfw/bin/", BIN + "/"))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "provfw-db-purge.timer"),
                             str(tmp_path / "provfw-db-purge.service")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    unit, timer = settings("provfw-db-purge"), settings("provfw-db-purge", "timer")
    assert unit["Type"] == "oneshot" and unit["User"] == "provfw" and unit["CapabilityBoundingSet"] == ""
    assert unit["TimeoutStartSec"] == "2h"               # a oneshot's default is no limit
    assert unit["ExecStart"].endswith("db purge --older-than-days 30")
    assert unit["ProtectSystem"] == "strict" and unit["NoNewPrivileges"] == "yes"
    assert (timer["OnCalendar"], timer["Persistent"]) == ("daily", "true")
