"""Network namespaces for functional tests: real hosts, real packets.

``RoutedTopology`` builds three namespaces joined by veth pairs::

    attacker (198.18.1.2 and .3, 2001:db8:18:1::2 and ::3: benchmarking and documentation ranges, which the API's
    non-global policy lets a rule block, as it would an attacker on the internet)
        |  veth
    hypervisor (forwards; provfw's dataplane runs here)
        |  veth
    instance (198.18.2.2, 2001:db8:18:2::2; a TCP listener on port 8080)

All traffic stays inside these namespaces.  ``close()`` (or leaving the
``with`` block) deletes every namespace, which removes the veths, firewall
state and processes inside them.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time

TCP_PORT = 8080

# A tiny dual-stack TCP server that accepts and closes connections.
_LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

_CONNECT = r"""
import socket, sys
src, dst, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(timeout)
s.bind((src, 0))
try:
    s.connect((dst, port))
except OSError:
    sys.exit(1)
sys.exit(0)
"""


def run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, input=input)


def add_namespace(name: str) -> None:
    """Create network namespace ``name`` with ``lo`` up and duplicate address detection off for the links
    made in it afterwards: their IPv6 link-local addresses would stay tentative for about a second, and the
    first IPv6 packet across a new topology be lost to neighbour discovery (a ping's whole timeout)."""
    run("ip", "netns", "add", name)
    netns_exec(name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    netns_exec(name, "ip", "link", "set", "lo", "up")


def netns_exec(ns: str, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", ns, *cmd, check=check, input=input)


def save_rule_set(text: str) -> list[str]:
    """The rule set of an ``iptables-save`` text, for comparing two saves: no comment lines (they stamp the
    time) and no chain counters (``:FORWARD ACCEPT [2:104]``: the topology's own IPv6 neighbour traffic
    moves them while a test runs)."""
    return [re.sub(r" ?\[\d+:\d+\]$", "", line) for line in text.splitlines() if not line.startswith("#")]


def unique_tag() -> str:
    return secrets.token_hex(3)


class AttackerProbes:
    """Reachability probes run from ``self.attacker`` (a namespace name), and the clean-up shared by the
    topologies (their instance listener and every namespace they made); mixed into the topologies."""

    attacker: str
    _listener: subprocess.Popen | None
    _namespaces: list[str]

    def build(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._close_namespaces()

    def __enter__(self):
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close_namespaces(self) -> None:
        if self._listener is not None:
            try:
                os.killpg(self._listener.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._listener.wait(5)
            self._listener = None
        for ns in reversed(self._namespaces):
            kill_namespace_processes(ns)
            run("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()

    def can_ping(self, src: str, dst: str, timeout: float = 1.0) -> bool:
        # iputils ping (20221126) takes a fractional -W, so a "blocked" verdict costs only ``timeout``.
        cmd = ["ping", "-6" if ":" in dst else "-4", "-c", "1", "-W", f"{timeout:g}", "-I", src, dst]
        return netns_exec(self.attacker, *cmd, check=False).returncode == 0

    def can_connect(self, src: str, dst: str, port: int = TCP_PORT, timeout: float = 1.0) -> bool:
        result = netns_exec(self.attacker, sys.executable, "-c", _CONNECT, src, dst, str(port), str(timeout),
                            check=False)
        return result.returncode == 0

    def reachable(self, src: str, dst: str, timeout: float = 1.0) -> bool:
        """True when both ping and a TCP connect from ``src`` to ``dst`` succeed."""
        return self.can_ping(src, dst, timeout) and self.can_connect(src, dst, timeout=timeout)

    def blocked(self, src: str, dst: str, timeout: float = 1.0) -> bool:
        """True when neither ping nor a TCP connect from ``src`` gets through."""
        return not self.can_ping(src, dst, timeout) and not self.can_connect(src, dst, timeout=timeout)


class RoutedTopology(AttackerProbes):
    """attacker -- hypervisor -- instance, routed, dual stack."""

    ATTACKER4 = ("198.18.1.2", "198.18.1.3")
    ATTACKER6 = ("2001:db8:18:1::2", "2001:db8:18:1::3")
    INSTANCE4 = "198.18.2.2"
    INSTANCE6 = "2001:db8:18:2::2"

    def __init__(self, tag: str | None = None, listener: bool = True):
        self.tag = tag or unique_tag()
        self.hv = f"pfw-{self.tag}-hv"
        self.instance = f"pfw-{self.tag}-vm"
        self.attacker = f"pfw-{self.tag}-atk"
        self._listener: subprocess.Popen | None = None
        self._want_listener = listener
        self._namespaces: list[str] = []

    # ------------------------------------------------------------ life cycle

    def _add_ns(self, name: str) -> None:
        add_namespace(name)
        self._namespaces.append(name)

    def build(self) -> None:
        for ns in (self.hv, self.instance, self.attacker):
            self._add_ns(ns)
        # veth names must be <= 15 characters and unique on the host while being moved.
        a_out, a_in = f"pa{self.tag}", f"pb{self.tag}"
        i_out, i_in = f"pc{self.tag}", f"pd{self.tag}"
        run("ip", "link", "add", a_out, "netns", self.attacker, "type", "veth", "peer", "name", a_in,
            "netns", self.hv)
        run("ip", "link", "add", i_out, "netns", self.instance, "type", "veth", "peer", "name", i_in,
            "netns", self.hv)
        self.hv_attacker_if, self.hv_instance_if = a_in, i_in
        for ns, dev in ((self.attacker, a_out), (self.hv, a_in), (self.hv, i_in), (self.instance, i_out)):
            netns_exec(ns, "ip", "link", "set", dev, "up")
        netns_exec(self.hv, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        netns_exec(self.hv, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        # Attacker side
        netns_exec(self.hv, "ip", "addr", "add", "198.18.1.1/24", "dev", a_in)
        netns_exec(self.hv, "ip", "-6", "addr", "add", "2001:db8:18:1::1/64", "dev", a_in, "nodad")
        for addr in self.ATTACKER4:
            netns_exec(self.attacker, "ip", "addr", "add", f"{addr}/24", "dev", a_out)
        for addr in self.ATTACKER6:
            netns_exec(self.attacker, "ip", "-6", "addr", "add", f"{addr}/64", "dev", a_out, "nodad")
        netns_exec(self.attacker, "ip", "route", "add", "default", "via", "198.18.1.1")
        netns_exec(self.attacker, "ip", "-6", "route", "add", "default", "via", "2001:db8:18:1::1")
        # Instance side
        netns_exec(self.hv, "ip", "addr", "add", "198.18.2.1/24", "dev", i_in)
        netns_exec(self.hv, "ip", "-6", "addr", "add", "2001:db8:18:2::1/64", "dev", i_in, "nodad")
        netns_exec(self.instance, "ip", "addr", "add", f"{self.INSTANCE4}/24", "dev", i_out)
        netns_exec(self.instance, "ip", "-6", "addr", "add", f"{self.INSTANCE6}/64", "dev", i_out, "nodad")
        netns_exec(self.instance, "ip", "route", "add", "default", "via", "198.18.2.1")
        netns_exec(self.instance, "ip", "-6", "route", "add", "default", "via", "2001:db8:18:2::1")
        if self._want_listener:
            self.start_listener()
        self.wait_reachable()

    def start_listener(self) -> None:
        self._listener = subprocess.Popen(
            ["ip", "netns", "exec", self.instance, sys.executable, "-c", _LISTENER, str(TCP_PORT)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        assert self._listener.stdout is not None
        line = self._listener.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError("TCP listener in the instance namespace did not start")

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """IPv6 neighbour discovery and routes take a moment; wait until both families pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.can_ping(self.ATTACKER4[0], self.INSTANCE4) and self.can_ping(self.ATTACKER6[0], self.INSTANCE6):
                return
            time.sleep(0.1)
        raise RuntimeError("topology never became reachable")

    def close(self) -> None:
        self._close_namespaces()


def kill_namespace_processes(ns: str) -> None:
    result = run("ip", "netns", "pids", ns, check=False)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def wait_until(predicate, timeout: float, interval: float = 0.05) -> float | None:
    """Poll ``predicate`` until true; return the seconds it took, or None on timeout."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(interval)
