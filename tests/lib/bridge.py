"""A bridged hypervisor for nwfilter tests: real ports, real packets.

``BridgeTopology`` builds, in the HOST network namespace (where libvirtd and
its nwfilter driver live), one Linux bridge with two veth ports::

    attacker ns (two addresses per family)          instance ns (TCP listener :8080)
        eth0 ===veth=== pfa<tag> ──┐        ┌── pfi<tag> ===veth=== eth0
                                   bridge pfbr<tag>
                                   (no address: the host only switches)

The host-side veth ends play the role of an instance's tap device: libvirt's
nwfilter binds filters to them by name (``<portdev name='pfi<tag>'/>``).
Bridged IPv4/IPv6 traffic goes through the host's iptables/ip6tables
because the topology sets ``net.bridge.bridge-nf-call-iptables=1`` (and the
ip6tables one); it never resets them, since other tests rely on the same
host-wide setting.

Safety: the bridge carries no host address and the host-side ports have IPv6
disabled, so the host never takes part in the traffic and every probe stays
between the two namespaces this topology created.  ``close()`` deletes the
namespaces (which deletes the veth pairs and the processes inside) and the
bridge.  Names carry a random tag so concurrent runs never collide.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.lib.netns import _LISTENER, TCP_PORT, AttackerProbes, add_namespace, netns_exec, run, unique_tag


def _write_sysctl(name: str, value: str) -> None:
    path = "/proc/sys/" + name.replace(".", "/")
    with open(path, "w") as handle:
        handle.write(value)


class BridgeTopology(AttackerProbes):
    """attacker ns -- host bridge -- instance ns, one L2 segment, dual stack."""

    INSTANCE4 = "198.18.7.2"
    ATTACKER4 = ("198.18.7.3", "198.18.7.4")
    INSTANCE6 = "fd00:18:7::2"
    ATTACKER6 = ("fd00:18:7::3", "fd00:18:7::4")
    PREFIX4 = 24
    PREFIX6 = 64
    INSTANCE_MAC = "52:54:00:7e:00:02"
    ATTACKER_MAC = "52:54:00:7e:00:03"

    def __init__(self, tag: str | None = None, listener: bool = True):
        self.tag = tag or unique_tag()
        self.bridge = f"pfbr{self.tag}"
        self.instance_port = f"pfi{self.tag}"      # the instance's "tap" on the host
        self.attacker_port = f"pfa{self.tag}"
        self.instance = f"pfw-{self.tag}-bvm"
        self.attacker = f"pfw-{self.tag}-batk"
        self._want_listener = listener
        self._listener: subprocess.Popen | None = None
        self._namespaces: list[str] = []
        self._bridge_made = False

    # ------------------------------------------------------------ life cycle

    def build(self) -> None:
        # Bridged packets must reach iptables/ip6tables, where libvirt's nwfilter puts its rules.
        _write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
        _write_sysctl("net.bridge.bridge-nf-call-ip6tables", "1")
        run("ip", "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0", "stp_state", "0",
            "forward_delay", "0")
        self._bridge_made = True
        _write_sysctl(f"net.ipv6.conf.{self.bridge}.disable_ipv6", "1")
        run("ip", "link", "set", self.bridge, "up")
        for ns in (self.instance, self.attacker):
            add_namespace(ns)
            self._namespaces.append(ns)
        self._add_port(self.instance, self.instance_port, self.INSTANCE_MAC)
        self._add_port(self.attacker, self.attacker_port, self.ATTACKER_MAC)
        netns_exec(self.instance, "ip", "addr", "add", f"{self.INSTANCE4}/{self.PREFIX4}", "dev", "eth0")
        netns_exec(self.instance, "ip", "-6", "addr", "add", f"{self.INSTANCE6}/{self.PREFIX6}", "dev", "eth0",
                   "nodad")
        for addr in self.ATTACKER4:
            netns_exec(self.attacker, "ip", "addr", "add", f"{addr}/{self.PREFIX4}", "dev", "eth0")
        for addr in self.ATTACKER6:
            netns_exec(self.attacker, "ip", "-6", "addr", "add", f"{addr}/{self.PREFIX6}", "dev", "eth0", "nodad")
        if self._want_listener:
            self.start_listener()
        self.wait_reachable()

    def _add_port(self, ns: str, host_end: str, mac: str) -> None:
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", f"pfn{self.tag}", "netns", ns)
        netns_exec(ns, "ip", "link", "set", f"pfn{self.tag}", "name", "eth0")
        netns_exec(ns, "ip", "link", "set", "eth0", "address", mac)
        netns_exec(ns, "ip", "link", "set", "eth0", "up")
        _write_sysctl(f"net.ipv6.conf.{host_end}.disable_ipv6", "1")
        run("ip", "link", "set", host_end, "master", self.bridge)
        run("ip", "link", "set", host_end, "up")

    def start_listener(self) -> None:
        self._listener = subprocess.Popen(
            ["ip", "netns", "exec", self.instance, sys.executable, "-c", _LISTENER, str(TCP_PORT)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        assert self._listener.stdout is not None
        if self._listener.stdout.readline().strip() != "ready":
            raise RuntimeError("TCP listener in the instance namespace did not start")

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Neighbour discovery takes a moment; wait until every attacker address reaches the instance."""
        deadline = time.monotonic() + timeout
        pending = [(a, self.INSTANCE4) for a in self.ATTACKER4] + [(a, self.INSTANCE6) for a in self.ATTACKER6]
        while pending and time.monotonic() < deadline:
            pending = [(src, dst) for src, dst in pending if not self.can_ping(src, dst)]
            if pending:
                time.sleep(0.1)
        if pending:
            raise RuntimeError(f"bridge topology never became reachable: {pending}")

    def close(self) -> None:
        self._close_namespaces()
        # Deleting the namespaces deleted the veth pairs; the bridge lives in the host namespace.
        for dev in (self.instance_port, self.attacker_port):
            run("ip", "link", "del", dev, check=False)
        if self._bridge_made:
            run("ip", "link", "del", self.bridge, check=False)
            self._bridge_made = False

    # ------------------------------------------------------------ probes (attacker -> instance)

    def can_udp(self, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
        """Send one UDP datagram and wait for the instance's echo (needs ``start_udp_echo``)."""
        result = netns_exec(self.attacker, sys.executable, "-c", _UDP_PROBE, src, dst, str(port), str(timeout),
                            check=False)
        return result.returncode == 0

    def start_udp_echo(self, port: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.instance, sys.executable, "-c", _UDP_ECHO, str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("UDP echo in the instance namespace did not start")
        return proc


_UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

_UDP_PROBE = r"""
import socket, sys
src, dst, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
s.bind((src, 0))
s.sendto(b"probe", (dst, port))
try:
    s.recvfrom(2048)
except OSError:
    sys.exit(1)
sys.exit(0)
"""
