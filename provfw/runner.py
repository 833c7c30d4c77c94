"""The one way provfw runs external commands (iptables-restore, ipset, nft, ip).

Firewall drivers take a ``Runner`` so that unit tests can pass a fake
dataplane that interprets the input instead of touching the kernel, and so
that every command of a worker configured with ``dataplane_netns`` runs inside
that namespace.  Thread-safety: a Runner holds no mutable state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Iterator, Sequence

from provfw import exception

LOG = logging.getLogger(__name__)


class Runner:
    """Run commands, optionally inside a named network namespace (``/run/netns/NAME``, as ``ip netns add``
    creates it).

    Inside a namespace a command runs under ``nsenter --net=/run/netns/NAME`` (util-linux): it only
    enters the network namespace, where ``ip netns exec`` also makes a mount namespace and remounts
    ``/sys`` - which netlink and xtables tools do not need - for 0.9 ms more per command (2.9 against
    2.0 ms for one ``ipset`` command here).  Without nsenter, ``ip netns exec``.
    """

    def __init__(self, netns: str = "", timeout: float = 300.0):
        self.netns = netns or ""
        self.timeout = timeout
        self._enter = (["nsenter", f"--net=/run/netns/{self.netns}", "--"] if shutil.which("nsenter")
                       else ["ip", "netns", "exec", self.netns]) if self.netns else []

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return [*self._enter, *cmd]

    def __call__(self, cmd: Sequence[str], input: str | None = None, check: bool = True) -> str:
        return self.execute(cmd, input=input, check=check)

    def execute(self, cmd: Sequence[str], input: str | None = None, check: bool = True) -> str:
        """Run ``cmd``; return stdout.

        Raises ``ToolMissing`` when ``cmd[0]`` is not installed - whatever
        ``check`` says, and also inside a namespace, where the namespace wrapper
        would report it only as exit status 1 and a message - and
        ``ProcessExecutionError`` on a non-zero exit when ``check``.
        """
        if shutil.which(cmd[0]) is None:
            # Namespaces share the file system: the host's PATH lookup is the namespace's.
            raise exception.ToolMissing(list(cmd), 127, stderr=f"{cmd[0]}: command not found")
        full = self.wrap(cmd)
        started = time.monotonic()
        try:
            if input is not None and len(input) > LARGE_INPUT:
                with _input_file(input) as stdin:
                    proc = subprocess.run(full, stdin=stdin, capture_output=True, text=True, timeout=self.timeout)
            else:
                proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError as exc:
            raise exception.ToolMissing(full, 127, stderr=str(exc)) from None
        except subprocess.TimeoutExpired as exc:
            raise exception.ProcessExecutionError(full, -1, stderr=f"timed out after {exc.timeout}s") from None
        LOG.debug("ran %s in %.3fs -> %s", " ".join(full[:6]), time.monotonic() - started, proc.returncode)
        if proc.returncode == 127:
            raise exception.ToolMissing(full, 127, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise exception.ProcessExecutionError(
                full, proc.returncode, proc.stdout, proc.stderr, detail=failing_input_context(proc.stderr, input))
        return proc.stdout


# Inputs larger than this go to the tool as a file, not through a pipe.  Under eventlet (the worker) a
# pipe is written in green chunks with a hub switch each: 0.4 s for the 3 MB ipset restore of a 120k-rule
# list, against 5 ms from a file (measured: docs/benchmarks.md, issue 7).
LARGE_INPUT = 64 * 1024


@contextlib.contextmanager
def _input_file(text: str) -> Iterator[Any]:
    """``text`` (UTF-8) in an anonymous in-memory file (memfd), positioned at its start; a temporary file
    where memfd_create is missing.  Closed on exit."""
    data = text.encode("utf-8")
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        handle = os.fdopen(memfd_create("provfw-input", getattr(os, "MFD_CLOEXEC", 1)), "w+b")
    else:  # pragma: no cover - Linux has had memfd_create since 3.17
        handle = tempfile.TemporaryFile()
    with handle:
        handle.write(data)
        handle.flush()
        handle.seek(0)
        yield handle


def failing_input_context(stderr: str, input: str | None, around: int = 2) -> str:
    """For a failed restore, quote the input line the tool complained about, with context.

    iptables-restore says "line N failed" (a refused commit) or "Error occurred at line: N" (a parse
    error), ipset "Error in line N", nft "<stdin>:N:" or "/dev/stdin:N:".
    """
    if not input or not stderr:
        return ""
    import re

    match = re.search(r"(?:line:?|<cmdline>:|/dev/stdin:|<stdin>:)\s*(\d+)", stderr)
    if not match:
        return ""
    number = int(match.group(1))
    lines = input.splitlines()
    start, end = max(1, number - around), min(len(lines), number + around)
    quoted = [f"{'>' if n == number else ' '} {n:6d}: {lines[n - 1]}" for n in range(start, end + 1)]
    return "failing input:\n" + "\n".join(quoted)
