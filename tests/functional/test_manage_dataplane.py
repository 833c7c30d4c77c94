"""``provfw-manage dataplane apply`` and ``teardown``: an operator's one-shot commands, on a real namespace.

``apply`` failed with "cannot unpack non-iterable Rule object" from the day
``Rule`` stopped being a tuple, and no test ran it; ``teardown`` printed only
"removed".  Both run here as the operator runs them: the command, its config
file and a database, then real packets from the attacker namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from provfw import rules
from provfw.db import api as db
from tests.lib import services
from tests.lib.netns import RoutedTopology, netns_exec

pytestmark = pytest.mark.functional

BIN = os.path.dirname(sys.executable)
ATTACKER, BYSTANDER = RoutedTopology.ATTACKER4


@pytest.fixture
def topo():
    services.require_root_netns()
    services.require_tools("iptables-restore", "ip6tables-restore")
    with RoutedTopology() as topology:
        yield topology


def manage(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "provfw-manage"), "--config-file", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def test_apply_then_teardown_from_the_command_line(topo, tmp_path):
    config = tmp_path / "provfw.conf"
    config.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\ntransport_url = memory://\n"
                      f"[compute]\ndataplane_netns = {topo.hv}\nfirewall_driver = iptables\n")
    assert manage(config, "db", "sync").returncode == 0
    db.configure(f"sqlite:///{tmp_path}/state/provfw.sqlite")
    try:
        result = db.provider_fw_rules_sync("manual", rules.external_block_specs(f"{ATTACKER}/32"))
    finally:
        db.dispose()
    assert topo.reachable(ATTACKER, topo.INSTANCE4)

    applied = manage(config, "dataplane", "apply")
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout) | {"seconds": 0} == {"generation": result.generation, "rules": 3,
                                                           "changed": True, "mode": "full", "seconds": 0}
    assert topo.blocked(ATTACKER, topo.INSTANCE4) and topo.reachable(BYSTANDER, topo.INSTANCE4)

    removed = manage(config, "dataplane", "teardown")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == (f"removed provfw's iptables rules from network namespace {topo.hv}; "
                                      "nova-local, the security groups' chain, is left in place")
    assert "nova-provider" not in netns_exec(topo.hv, "iptables-save").stdout
    assert topo.reachable(ATTACKER, topo.INSTANCE4)
