"""Traffic for functional tests: a UDP flood from the attacker and a packet counter at the instance.

Used to prove "no window": a rebuild that lets even one blocked packet through
shows up as a non-zero count at the instance.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.lib.netns import netns_exec

UDP_PORT = 9999

_FLOOD = r"""
import signal, socket, sys, time
src, dst, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
burst, pause = int(sys.argv[5]), float(sys.argv[6])
sent = 0
stop = False
def finish(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, finish)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
print("ready", flush=True)
deadline = time.monotonic() + seconds
while not stop and time.monotonic() < deadline:
    for _ in range(burst):
        try:
            s.sendto(b"provfw-test-flood", (dst, port))
            sent += 1
        except OSError:
            pass
    if pause:
        time.sleep(pause)
print(sent, flush=True)
"""


class InstanceCounter:
    """An nftables counter in the instance namespace: UDP packets that reached the instance."""

    def __init__(self, topo):
        self.ns = topo.instance
        netns_exec(self.ns, "nft", "-f", "-", input=(
            "add table inet pfwtest\nadd counter inet pfwtest hits\n"
            "add chain inet pfwtest input { type filter hook input priority 0; policy accept; }\n"
            f"add rule inet pfwtest input udp dport {UDP_PORT} counter name hits\n"))

    def packets(self) -> int:
        out = netns_exec(self.ns, "nft", "-j", "list", "counter", "inet", "pfwtest", "hits").stdout
        return next(i["counter"]["packets"] for i in json.loads(out)["nftables"] if "counter" in i)


class Flood:
    """UDP from ``src`` to the instance until ``stop()`` (or ``seconds``).

    As fast as one core sends by default; ``pause`` seconds after every
    ``burst`` packets paces it, where several floods share two cores with the
    processes under test (1 ms after 20 packets: ~10-20k packets/s).
    """

    def __init__(self, topo, src: str, seconds: float = 60.0, burst: int = 200, pause: float = 0.0):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.attacker, sys.executable, "-c", _FLOOD, src, topo.INSTANCE4,
             str(UDP_PORT), str(seconds), str(burst), str(pause)], stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        return int(out.strip().splitlines()[-1])
