"""A real provfw deployment for end-to-end tests and benchmarks.

Starts ``provfw-api``, ``provfw-conductor`` and one or more ``provfw-compute``
processes (the installed console scripts) on a real database and RabbitMQ,
each worker managing the firewall of its own hypervisor namespace.  As in
production, the workers' configuration has no ``[database]`` section and
each worker connects to the bus as its own least-privilege user (created
with ``provfw-manage bus create-user`` in a RabbitMQ vhost of the
deployment's own); the API and the conductor share the control user.
Configuration is a real config file; tokens and schema come from
``provfw-manage``.  Every process is stopped, the vhost and its users
deleted and the database dropped on ``close()``.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import requests

from provfw.adminclient import AdminClient
from tests.lib import services
from tests.lib.bus import RabbitVhost

BIN = os.path.dirname(sys.executable)
# A worker's line once its kernel accepted a generation (provfw/compute/manager.py), with oslo.log's stamp.
APPLIED_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) .* applied generation (\d+):", re.M)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_in_one_config(workdir, port: int, metrics_port: int, **compute: str):
    """Write ``workdir/provfw.conf`` for ``provfw-all-in-one`` (state under ``workdir/state``); return its path.

    ``compute``: the ``[compute]`` options (``host``, ``firewall_driver``, ``dataplane_netns``, ...).
    """
    config = workdir / "provfw.conf"
    options = "".join(f"{key} = {value}\n" for key, value in compute.items())
    config.write_text(f"[DEFAULT]\nstate_path = {workdir}/state\n[api]\nbind_port = {port}\n"
                      f"[metrics]\napi_port = {metrics_port}\n[compute]\n{options}")
    return config


class Deployment:
    def __init__(self, db_kind: str = "postgresql", transport_url: str | None = None,
                 firewall_driver: str = "iptables", extra_conf: str = "", reconcile_interval: int = 2,
                 hosts: Sequence[str] = ()):
        """``hosts``: the workers a test will start, whose bus users are made here beside the rest."""
        services.require_rabbitmq()
        self.database = services.TestDatabase(db_kind)
        self.vhost: RabbitVhost | None = None
        self._compute_urls: dict[str, str] = {}
        self.firewall_driver = firewall_driver
        self.extra_conf = extra_conf
        self.reconcile_interval = reconcile_interval
        self.dir = tempfile.mkdtemp(prefix="provfw-e2e-")
        self.port = free_port()
        self.api: subprocess.Popen | None = None
        self.conductors: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.logs: list[str] = []
        # The bus half (a vhost, the control user: four rabbitmqctl runs of about a second each) and the
        # database half (schema, two tokens through provfw-manage, which needs no bus) run side by side.
        with ThreadPoolExecutor(2) as pool:
            bus = pool.submit(self._make_bus, transport_url, hosts)
            tokens = pool.submit(self._make_schema_and_tokens)
            try:
                self.transport_url = bus.result()
                self.admin_token, self.reader_token = tokens.result()
            except Exception:
                tokens.exception()      # both halves finished before anything is dropped
                self._drop_bus()
                self.database.drop()
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
        self.config = self._write_config("api", "")
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = AdminClient(self.url, self.admin_token, timeout=30)

    def _make_bus(self, transport_url: str | None, hosts: Sequence[str]) -> str:
        if transport_url is not None:
            return transport_url
        self.vhost = RabbitVhost()
        with ThreadPoolExecutor(1 + len(hosts)) as pool:
            control = pool.submit(self.vhost.create_user, "control")
            for made in [pool.submit(self._compute_user, host) for host in hosts]:
                made.result()
            return control.result()[1]

    def _compute_user(self, host: str) -> None:
        assert self.vhost is not None
        self._compute_urls[host] = self.vhost.create_user("compute", host=host)[1]

    def _make_schema_and_tokens(self) -> tuple[str, str]:
        config = self._write_config("manage", "", transport_url="rabbit://")     # db sync and tokens: no bus
        self.manage("db", "sync", config=config)
        with ThreadPoolExecutor(2) as pool:
            made = [pool.submit(self.manage, "token", "create", "--name", f"e2e-{role}", "--role", role, config=config)
                    for role in ("admin", "reader")]
            return tuple(token.result().strip() for token in made)

    # ------------------------------------------------------------ config and tools

    def compute_url(self, host: str) -> str:
        """The bus URL of ``host``'s own compute user (created on first use), or the shared URL."""
        if self.vhost is None:
            return self.transport_url
        if host not in self._compute_urls:
            self._compute_user(host)
        return self._compute_urls[host]

    def _write_config(self, name: str, compute_section: str, transport_url: str | None = None,
                      database_url: str | None = None, with_database: bool = True) -> str:
        path = os.path.join(self.dir, f"{name}.conf")
        database = f"[database]\nconnection = {database_url or self.database.url}\n" if with_database else ""
        trust = "" if self.vhost is not None else "trust_unverified_hosts = true\n"
        with open(path, "w") as handle:
            handle.write(f"""[DEFAULT]
state_path = {self.dir}/state-{name}
transport_url = {transport_url or self.transport_url}
protected_cidrs = 127.0.0.0/8,::1/128,192.0.2.0/24

{database}
[api]
bind_host = 127.0.0.1
bind_port = {self.port}

[metrics]
# Several daemons of a test share this machine: no fixed metrics ports (a test that scrapes sets its own).
api_port = 0
conductor_port = 0
compute_port = 0

[conductor]
report_flush_interval = 0.2
{trust}
[compute]
heartbeat_interval = 1
reconcile_interval = {self.reconcile_interval}
service_down_time = 5
{compute_section}
{self.extra_conf}
""")
        return path

    def manage(self, *args: str, config: str | None = None) -> str:
        result = subprocess.run([os.path.join(BIN, "provfw-manage"), "--config-file", config or self.config, *args],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"provfw-manage {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def _spawn(self, binary: str, config: str, name: str) -> subprocess.Popen:
        log_path = os.path.join(self.dir, f"{name}.log")
        self.logs.append(log_path)
        log = open(log_path, "ab")
        return subprocess.Popen([os.path.join(BIN, binary), "--config-file", config], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    # ------------------------------------------------------------ processes

    def start_api(self, timeout: float = 20.0, conductor: bool = True) -> None:
        """Start provfw-api (and, unless told otherwise, one provfw-conductor) and wait until it answers."""
        # Both start at once (a second and a half of imports each); the conductor is waited for after the API.
        consuming = self.start_conductor(wait=False) if conductor and not self.conductors else None
        self.api = self._spawn("provfw-api", self.config, "api")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"provfw-api exited: {self.tail('api')}")
            try:
                requests.get(self.url + "/healthz", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"provfw-api did not answer: {self.tail('api')}")
        if consuming is not None:
            consuming(timeout)

    def start_conductor(self, database_url: str | None = None, timeout: float = 20.0, wait: bool = True):
        """Start one more provfw-conductor (optionally on another database URL, e.g. through a proxy) and
        wait until it consumes; with ``wait=False`` return the function that waits (taking a timeout)."""
        name = f"conductor-{len(self.conductors)}"
        config = self._write_config(name, "", database_url=database_url)
        proc = self._spawn("provfw-conductor", config, name)
        self.conductors.append(proc)
        if not wait:
            return lambda seconds: self._wait_conductor(proc, name, seconds)
        return self._wait_conductor(proc, name, timeout)

    def _wait_conductor(self, proc: subprocess.Popen, name: str, timeout: float) -> subprocess.Popen:
        if netns_wait(lambda: "consuming" in self.tail(name) or proc.poll() is not None, timeout) is None \
                or proc.poll() is not None:
            raise RuntimeError(f"provfw-conductor did not start: {self.tail(name)}")
        return proc

    def stop_conductors(self, sig: int = signal.SIGTERM) -> None:
        while self.conductors:
            _stop(self.conductors.pop(), sig)

    def start_worker(self, host: str, netns: str, extra: str = "", wait: bool = True,
                     transport_url: str | None = None, firewall_driver: str | None = None) -> None:
        """Start ``provfw-compute`` for ``host`` (no database credentials; its own bus user).

        ``transport_url`` overrides its bus URL (e.g. to reach the broker
        through a proxy a test can cut; build it from ``compute_url(host)``);
        ``firewall_driver`` the deployment's driver for this host.
        """
        driver = firewall_driver or self.firewall_driver
        config = self._write_config(f"compute-{host}", f"host = {host}\ndataplane_netns = {netns}\n"
                                    f"firewall_driver = {driver}\ncompute_driver = libvirt\n{extra}",
                                    transport_url=transport_url or self.compute_url(host), with_database=False)
        self.workers[host] = self._spawn("provfw-compute", config, f"compute-{host}")
        if wait:
            self.wait_in_sync(host)

    def stop_worker(self, host: str, sig: int = signal.SIGTERM) -> None:
        proc = self.workers.pop(host)
        _stop(proc, sig)

    def wait_in_sync(self, host: str | None = None, timeout: float = 30.0) -> None:
        """Wait until ``host`` (or every started worker) reports the current generation applied."""
        hosts = [host] if host else list(self.workers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.client.services()
            by_host = {s["host"]: s for s in info["services"]}
            if all(h in by_host and by_host[h]["applied_generation"] == info["generation"] for h in hosts):
                return
            for h in hosts:
                proc = self.workers.get(h)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"provfw-compute {h} exited: {self.tail('compute-' + h)}")
            time.sleep(0.05)
        raise RuntimeError(f"workers {hosts} not in sync: {self.client.services()}")

    def applied_at(self, host: str, generation: int, timeout: float = 600.0) -> float:
        """POSIX time (to the millisecond of the log's stamp) at which ``host``'s worker logged that its kernel
        holds ``generation`` or a later one: when the host enforces it, before its state report reaches the
        conductor.  Raises RuntimeError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stamp, applied in APPLIED_RE.findall(self.tail(f"compute-{host}", 400)):
                if int(applied) >= generation:
                    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
            time.sleep(0.005)
        raise RuntimeError(f"{host} never applied generation {generation}: {self.tail('compute-' + host)}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = os.path.join(self.dir, f"{name}.log")
        try:
            with open(path, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        # Every daemon told at once, then each waited for: their shutdowns overlap.
        daemons = [*self.workers.values(), *([self.api] if self.api is not None else []), *self.conductors]
        self.workers.clear()
        self.api = None
        self.conductors.clear()
        with ThreadPoolExecutor(max(1, len(daemons))) as pool:
            list(pool.map(lambda proc: _stop(proc, signal.SIGTERM), daemons))
        self._drop_bus()
        self.database.drop()
        # Configurations (bus passwords) and daemon logs; PROVFW_KEEP_E2E_DIRS=1 keeps them to read a failure.
        if os.environ.get("PROVFW_KEEP_E2E_DIRS") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)

    def _drop_bus(self) -> None:
        if self.vhost is not None:
            self.vhost.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def netns_wait(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return None


def _stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def kernel_has_source(netns: str, cidr: str, tools: Sequence[str] = ("iptables-save", "ip6tables-save")) -> bool:
    """True when the provider chain in ``netns`` holds a rule for ``cidr``."""
    tool = tools[1] if ":" in cidr else tools[0]
    out = subprocess.run(["ip", "netns", "exec", netns, tool, "-t", "filter"], capture_output=True,
                         text=True).stdout
    return f"-s {cidr} " in out
