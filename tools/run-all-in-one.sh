#!/usr/bin/env bash
# Install provfw into .venv and run provfw-all-in-one on embedded defaults:
# SQLite under ~/.local/state/provfw, the in-process bus, the API on 127.0.0.1:8774,
# and one compute worker managing this host's iptables (needs root).
# Extra arguments go to provfw-all-in-one (e.g. --config-file etc/provfw/provfw.conf).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v iptables-restore >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# pip runs quietly; say what the first half-minute is (a newcomer took the silence for a hang).
echo "run-all-in-one: installing provfw into .venv (about 30 s the first time)..." >&2
.venv/bin/pip install -q -e . 2>&1 | grep -v -E "^WARNING: Location|is ignored" || true
# What stays enforced after a stop depends on the firewall driver; the daemon's own stop line says which.
echo "run-all-in-one: starting provfw-all-in-one on http://127.0.0.1:8774 (Ctrl-C stops it; its last log line says what stays enforced)" >&2
exec .venv/bin/provfw-all-in-one "$@"
