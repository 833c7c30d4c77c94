#!/usr/bin/env bash
# Install and start everything the test suite needs on a fresh Debian machine (run as root).
# Idempotent: re-running it only starts what is not running.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iptables ipset nftables iproute2 iputils-ping iperf3 procps socat openssl
              libvirt-daemon libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
              python3-venv python3-dev gcc systemd
              wrk)                 # wrk: benchmarks/bench_api.py's load clients

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-test-env: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd: qemu.conf needs a user/group that exist; libvirt-daemon-system creates libvirt-qemu,
# fall back to root where it does not exist.  /var/log/libvirt must exist.
mkdir -p /var/log/libvirt /var/run/libvirt
if ! id libvirt-qemu >/dev/null 2>&1 && [ -f /etc/libvirt/qemu.conf ]; then
    grep -q '^user = "root"' /etc/libvirt/qemu.conf || printf 'user = "root"\ngroup = "root"\n' >> /etc/libvirt/qemu.conf
fi
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d
fi
for _ in $(seq 1 50); do
    virsh -c qemu:///system nwfilter-list >/dev/null 2>&1 && break
    sleep 0.2
done
virsh -c qemu:///system nwfilter-list >/dev/null

# Bridged traffic must traverse iptables for the nwfilter tests.
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
sysctl -qw net.bridge.bridge-nf-call-ip6tables=1 2>/dev/null || true

# Python environment.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v -E "^WARNING: Location|is ignored" || true
.venv/bin/python -c "import provfw, libvirt, iptc, psycopg2, pymysql" 
echo "setup-test-env: ready"
