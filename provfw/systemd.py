"""systemd service notification (sd_notify) and a watchdog fed by the loops that matter.

Design
------
``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a unix
datagram socket; a leading ``@`` names the abstract namespace), exactly as
``sd_notify(3)`` does, with the standard library only.  Outside systemd
(no ``NOTIFY_SOCKET``) every call is a no-op that returns False, so the
daemons call it unconditionally.

A daemon is healthy when each of its essential loops keeps finishing rounds,
not merely when some thread can still send a datagram.  ``Watchdog`` keeps
one timestamp per registered loop (``beat(name)``, called by the loop each
round) and a pinger thread sends ``WATCHDOG=1`` every ``WatchdogSec/2`` only
while every loop has beaten within its allowed silence.  When a loop goes
silent (a cast consumer stuck in a call, a periodic check wedged on a kernel
tool), the pings stop, the reason is logged and published as ``STATUS=``,
and systemd kills and restarts the service after ``WatchdogSec``.  A process
whose scheduler is blocked outright (an eventlet hub stuck in a blocking
call) stops pinging too, because the pinger is one of its threads.  Without
``$WATCHDOG_USEC`` (no ``WatchdogSec=``, or not under systemd) nothing is
started.

Thread-safety: ``notify`` opens a socket per call; ``Watchdog.beat`` is a
dict assignment (atomic), read by the pinger thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

LOG = logging.getLogger(__name__)


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path[0] not in ("/", "@"):
        LOG.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket name; not notifying systemd", path)
        return None
    # "@name" is the abstract namespace: a leading NUL byte on the wire.
    return "\0" + path[1:] if path[0] == "@" else path


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ``"WATCHDOG=1"``, ``"STATUS=text"``...) to systemd in one datagram.

    Returns True when sent, False outside systemd or when the socket refused
    it (logged; a notification is never worth failing the daemon for).
    """
    address = _address()
    if address is None or not states:
        return False
    message = "\n".join(states).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
        return True
    except OSError as exc:
        LOG.warning("could not notify systemd (%s): %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def watchdog_seconds() -> float | None:
    """``WatchdogSec`` of this service in seconds, or None when systemd expects no pings from this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None                         # meant for another process (a parent that exec'd us)
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds if seconds > 0 else None


class Watchdog:
    """Pings systemd's watchdog while every registered loop keeps beating (see the module docstring)."""

    def __init__(self, interval: float | None = None, clock=time.monotonic):
        timeout = watchdog_seconds() if interval is None else interval * 2
        self.interval = None if timeout is None else timeout / 2
        self.clock = clock
        self._loops: dict[str, tuple[float, float]] = {}      # name -> (last beat, allowed silence)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._withheld: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def register(self, name: str, max_silence: float) -> None:
        """Watch loop ``name``: it must ``beat(name)`` at least every ``max_silence`` seconds."""
        self._loops[name] = (self.clock(), max_silence)

    def unregister(self, name: str) -> None:
        self._loops.pop(name, None)

    def beat(self, name: str) -> None:
        """Loop ``name`` finished a round (cheap: call it every iteration)."""
        entry = self._loops.get(name)
        if entry is not None:
            self._loops[name] = (self.clock(), entry[1])

    def stale(self) -> list[tuple[str, float]]:
        """[(loop name, seconds since its last beat)] for every loop silent longer than allowed."""
        now = self.clock()
        return [(name, now - last) for name, (last, allowed) in list(self._loops.items()) if now - last > allowed]

    def check_and_ping(self) -> bool:
        """Send WATCHDOG=1 when no loop is stale; otherwise log (once) and withhold it.  True when sent."""
        stale = self.stale()
        if stale:
            names = tuple(sorted(name for name, _age in stale))
            if names != self._withheld:
                reason = ", ".join(f"{name} silent for {age:.0f}s" for name, age in stale)
                LOG.error("withholding the systemd watchdog ping (systemd will restart this service): %s", reason)
                notify(f"STATUS=hung: {reason}")
            self._withheld = names
            return False
        if self._withheld:
            LOG.warning("every watched loop is running again; resuming watchdog pings")
            self._withheld = ()
        return notify("WATCHDOG=1")

    def start(self) -> None:
        """Start the pinger thread (nothing when systemd set no watchdog)."""
        if self.interval is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()
        LOG.info("systemd watchdog: pinging every %.1fs while %s keep running", self.interval,
                 ", ".join(sorted(self._loops)) or "the process")

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            self.check_and_ping()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
