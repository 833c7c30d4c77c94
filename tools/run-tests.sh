#!/usr/bin/env bash
# Install everything the tests need (apt packages, libvirtd, the venv) and run the whole suite:
# unit, functional (real PostgreSQL/MariaDB/SQLite, RabbitMQ, iptables/ipset/nft in namespaces, libvirtd)
# and end-to-end (the real daemons).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup-test-env.sh
# The user's own state directory (the all-in-one's database and token, the drivers' apply lock): tests keep
# their state under tmp_path, so a file that appears here during the run is a test that forgot to.
user_state="${PROVFW_STATE_PATH:-$HOME/.local/state/provfw}"
state_before=$(find "$user_state" 2>/dev/null | sort || true)
set +e
# The style check first (setup.cfg's [flake8]); a warning fails the run, after the suite has run anyway.
.venv/bin/flake8 provfw tests benchmarks tools
lint=$?
# Two workers (pytest-xdist): the database-only modules spread over both, every test that touches the host
# (namespaces, kernel tools, libvirtd, daemons) runs on one of them in order (tests/conftest.py,
# SPREAD_MODULES).  Pass -n 0 to run everything in this process.
.venv/bin/python -m pytest -p no:cacheprovider --timeout=600 -ra -n 2 --dist loadgroup tests "$@"
rc=$?
set -e
if [ "$lint" -ne 0 ]; then
    echo "run-tests: flake8 found the warnings above" >&2
    [ "$rc" -ne 0 ] || rc=1
fi
if [ "$rc" -eq 5 ]; then
    echo "run-tests: pytest collected no tests" >&2
    exit 1
fi
leftover=$(ip netns list 2>/dev/null | grep -c '^pfw-' || true)
if [ "$leftover" -ne 0 ]; then
    echo "run-tests: $leftover test namespace(s) left behind:" >&2
    ip netns list | grep '^pfw-' >&2
    exit 1
fi
# RabbitMQ vhosts and users the tests create (tests/lib/bus.py) must be gone too.
bus_left=$( (rabbitmqctl -q list_vhosts name; rabbitmqctl -q list_users) 2>/dev/null \
            | grep -E '^(provfw-test-|provfw-compute-|provfw-control-)' || true)
if [ -n "$bus_left" ]; then
    echo "run-tests: RabbitMQ vhosts/users left behind:" >&2
    echo "$bus_left" >&2
    exit 1
fi
# ... and so must their directories (configurations with bus passwords, daemon logs).
dirs_left=$(ls -d /tmp/provfw-bus-* /tmp/provfw-e2e-* 2>/dev/null || true)
if [ -n "$dirs_left" ] && [ "${PROVFW_KEEP_E2E_DIRS:-}" != "1" ]; then
    echo "run-tests: test directories left behind:" >&2
    echo "$dirs_left" >&2
    exit 1
fi
state_new=$(comm -13 <(echo "$state_before") <(find "$user_state" 2>/dev/null | sort) || true)
if [ -n "$state_new" ]; then
    echo "run-tests: the suite wrote to the user's state directory (tests keep theirs under tmp_path):" >&2
    echo "$state_new" >&2
    exit 1
fi
exit "$rc"
