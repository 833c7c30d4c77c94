"""Message-bus fixtures shared by functional and end-to-end tests.

``RabbitVhost`` gives a test its own RabbitMQ virtual host and creates bus
users the way an operator would (``provfw-manage bus create-user``), so the
least-privilege permissions are the ones under test; ``close()`` deletes the
users and the vhost (which drops every queue and exchange in it).

``ConductorThread`` runs a real ``ConductorService`` in this process.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from tests.lib import services

BIN = os.path.dirname(sys.executable)


def rabbitmqctl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["rabbitmqctl", *args], input=stdin, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}")
    return result


class RabbitVhost:
    """A vhost of its own on the real broker, with users created through provfw-manage."""

    def __init__(self, control_exchange: str = "provfw", compute_user_prefix: str = "provfw-compute-"):
        services.require_rabbitmq()
        services.require_tools("rabbitmqctl")
        self.name = f"provfw-test-{secrets.token_hex(4)}"
        self.control_exchange = control_exchange
        self.compute_user_prefix = compute_user_prefix
        self.users: list[str] = []
        self._dir = tempfile.mkdtemp(prefix="provfw-bus-")
        rabbitmqctl("add_vhost", self.name)
        # guest administers the test vhost (declares, deletes, inspects) like an operator would.
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        self.admin_url = self.url("guest", "guest")

    def url(self, user: str, password: str, port: int = 5672) -> str:
        return (f"rabbit://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
                f"@127.0.0.1:{port}/{urllib.parse.quote(self.name, safe='')}")

    def _manage_config(self) -> str:
        path = os.path.join(self._dir, "manage.conf")
        with open(path, "w") as handle:
            handle.write(f"[DEFAULT]\ncontrol_exchange = {self.control_exchange}\n"
                         f"[conductor]\ncompute_user_prefix = {self.compute_user_prefix}\n")
        return path

    def create_user(self, role: str, host: str | None = None, user: str | None = None) -> tuple[str, str]:
        """Create a bus user with ``provfw-manage bus create-user``; return (user, url).  A compute user without
        ``user`` is named by provfw-manage: ``compute_user_prefix`` + host."""
        password = secrets.token_urlsafe(16)
        password_file = os.path.join(self._dir, f"pw-{secrets.token_hex(3)}")
        with open(password_file, "w") as handle:
            handle.write(password)
        args = [os.path.join(BIN, "provfw-manage"), "--config-file", self._manage_config(), "bus", "create-user",
                "--role", role, "--vhost", self.name, "--password-file", password_file]
        if host:
            args += ["--host", host]
        if role == "compute" and not user:
            name = f"{self.compute_user_prefix}{host}"
        else:
            name = user or f"provfw-control-{secrets.token_hex(3)}"
            args += ["--user", name]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"provfw-manage bus create-user failed: {result.stderr}")
        self.users.append(name)
        return name, self.url(name, password)

    def close(self) -> None:
        # Side by side: each rabbitmqctl run is a second of starting an Erlang VM.
        deletions = [("delete_user", user) for user in self.users] + [("delete_vhost", self.name)]
        with ThreadPoolExecutor(len(deletions)) as pool:
            list(pool.map(lambda args: rabbitmqctl(*args, check=False), deletions))
        shutil.rmtree(self._dir, ignore_errors=True)       # it holds the users' password files

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ConductorThread:
    """A real ConductorService in this process (its server, flush, purge and heartbeat loops)."""

    def __init__(self, conf, compute_api=None):
        from provfw.conductor import service as conductor_service

        self.service = conductor_service.ConductorService(conf, compute_api)
        self.service.start()
        if not self.service.ready.wait(15):
            self.service.stop()
            raise RuntimeError("the conductor never started consuming")

    @property
    def stats(self):
        return self.service.manager.stats

    def stop(self) -> None:
        self.service.stop()


def drain(received: queue.Queue, timeout: float) -> list:
    """Everything ``received`` gets until it has been quiet for ``timeout`` seconds (casts a consumer recorded)."""
    found = []
    while True:
        try:
            found.append(received.get(timeout=timeout))
        except queue.Empty:
            return found
