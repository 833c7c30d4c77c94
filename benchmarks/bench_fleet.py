#!/usr/bin/env python3
"""Does a fleet of N hosts converge with the conductor design? (issue 7) - against today's design beside it.

For each N in --sizes, twice - provfw (a real provfw-conductor process; hosts hold bus credentials only)
and today's design (every host reads PostgreSQL and writes its own Service row):

* a fresh PostgreSQL database (schema by provfw.db.migration.db_sync) and a RabbitMQ vhost of their own;
* N simulated hosts (benchmarks/fleetsim.py: real ComputeManager + Reconciler + ConductorAPI + the real
  FanoutConsumer's queue and handler, a recording firewall driver) in a few processes;
* all N hosts start on the empty rule set; then
  1. a 120,430-rule import (one transaction, one cast carrying only generations, as provfw-api's import);
  2. --changes one-rule changes (each one transaction and one cast carrying the change, as provfw-api's create);
  3. every host stops, and all N start again at once with the import in place (cold start).

Mutations go through provfw.db.api and provfw.compute.api.ComputeAPI exactly as provfw-api makes them.
Printed for each N: latencies, one host's own decode+apply cost, database statements, conductor CPU seconds
and RSS, bytes on the bus; then the issue's goals, met or not.  docs/benchmarks.md says how each is measured.

    .venv/bin/python benchmarks/bench_fleet.py [--sizes 10,100,1000] [--feed PATH | --generate N]
        [--changes 20] [--procs 4] [--skip-baseline] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import fleetsim  # noqa: E402
from benchmarks.feed import DEFAULT_IPSUM, load_specs  # noqa: E402
from provfw import conf as provfw_conf  # noqa: E402
from provfw import rpc  # noqa: E402
from provfw.compute import api as compute_api_mod  # noqa: E402
from provfw.db import api as db  # noqa: E402
from provfw.db import migration  # noqa: E402
from provfw.rules import Changes, make_spec  # noqa: E402
from tests.lib import bus as bus_lib  # noqa: E402
from tests.lib import services  # noqa: E402

BIN = os.path.dirname(sys.executable)
DESIGNS = {"provfw": "provfw (conductor)", "baseline": "today (hosts read the DB)"}
SETTLE = 1.6          # seconds after the last host applied, for trailing state reports to be written


# --------------------------------------------------------------------------- measurements

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` (all its threads) has run, in nanoseconds' precision.

    /proc/PID/schedstat, not /proc/PID/stat: the latter counts whole clock ticks
    (10 ms) per process, and rounds away most of what a short database backend spends.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except OSError:
            pass                       # a thread that just ended
    return total / 1e9


def proc_memory_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def broker_pid() -> int | None:
    """The RabbitMQ node's OS process (to read its CPU time; it also serves other users of this machine)."""
    try:
        return int(bus_lib.rabbitmqctl("eval", "os:getpid().").stdout.strip().strip('"'))
    except (RuntimeError, ValueError):
        return None


class DatabaseCpu:
    """CPU seconds the PostgreSQL backends serving one database spent during a phase (from /proc).

    Pools open and close backends during a phase (today's hosts overflow
    their pools), so a thread reads every backend's CPU time every 0.2 s and
    keeps the last reading; a backend that ends loses at most its last 0.2 s.
    """

    def __init__(self, name: str):
        import sqlalchemy as sa

        self.name = name
        self.engine = sa.create_engine(services.PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[int, float]:
        with self.engine.connect() as conn:
            pids = [row[0] for row in conn.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = %(name)s", {"name": self.name})]
        seconds = {}
        for pid in pids:
            try:
                seconds[pid] = proc_cpu_seconds(pid)
            except OSError:
                pass
        return seconds

    def start(self) -> None:
        self._first = self._read()
        self._last = dict(self._first)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self._last.update(self._read())

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._last.update(self._read())
        return sum(cpu - self._first.get(pid, 0.0) for pid, cpu in self._last.items())

    def close(self) -> None:
        self._stop.set()
        self.engine.dispose()


def bus_octets(vhost: str) -> tuple[int, int]:
    """(bytes the broker received, bytes it sent) on every open connection of ``vhost``, from RabbitMQ."""
    result = bus_lib.rabbitmqctl("list_connections", "-q", "--formatter", "json", "vhost", "recv_oct", "send_oct")
    rows = [row for row in json.loads(result.stdout or "[]") if row.get("vhost") == vhost]
    return sum(int(row["recv_oct"]) for row in rows), sum(int(row["send_oct"]) for row in rows)


@dataclasses.dataclass
class Phase:
    """What one phase measured; times in seconds, relative to the moment of the cast or start command."""

    name: str
    hosts: int
    done: int = 0
    latency: list[float] = dataclasses.field(default_factory=list)        # applied, every host (and change)
    served: list[float] = dataclasses.field(default_factory=list)         # reply / rows / cast arrived
    fleet: list[float] = dataclasses.field(default_factory=list)          # per change: the last host applied
    own_cpu: list[float] = dataclasses.field(default_factory=list)        # sample (full) hosts' thread CPU
    bytes_per_host: list[int] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    retried: int = 0                                                      # hosts with a failed attempt
    changes: int = 1
    statements: int = 0
    transactions: int = 0
    rows_read: int = 0
    api_statements: int = 0
    api_seconds: float = 0.0
    conductor: dict = dataclasses.field(default_factory=dict)             # counter deltas
    conductor_cpu: float | None = None
    conductor_rss_mb: float | None = None
    conductor_hwm_mb: float | None = None
    bus_in: int = 0
    bus_out: int = 0
    hosts_cpu: float = 0.0                 # every host process, all threads
    hosts_rss_mb: float = 0.0              # every host process, at the end of the phase
    driver_writes: dict = dataclasses.field(default_factory=dict)        # what the recording drivers counted
    broker_cpu: float | None = None
    database_cpu: float = 0.0              # PostgreSQL backends of the bench's database
    reply_bytes: int = 0                   # median size of what a host received (reply) in this phase
    wall: float = 0.0


# --------------------------------------------------------------------------- one design, one size

class Fleet:
    """A database, a vhost, (a conductor), host processes: what one design at one N needs; ``close()`` ends it."""

    def __init__(self, design: str, count: int, args: argparse.Namespace, workdir: str):
        self.design = design
        self.count = count
        self.args = args
        self.dir = tempfile.mkdtemp(prefix=f"{design}-{count}-", dir=workdir)
        self.conductor: subprocess.Popen | None = None
        self.processes: list[tuple[multiprocessing.Process, object]] = []
        self.database = None
        self.vhost = None
        self.compute_api = None
        self.sample: list[str] = []
        self.database_cpu: DatabaseCpu | None = None
        self.broker = broker_pid()

    def start(self) -> None:
        """Create the database and vhost, start the conductor (provfw) and the host processes."""
        self.database = services.TestDatabase("postgresql")
        self.vhost = bus_lib.RabbitVhost()
        migration.db_sync(self.database.url)
        self.database_cpu = DatabaseCpu(self.database.url.rsplit("/", 1)[1])
        self.config = self._write_config()
        provfw_conf.parse_args(["--config-file", self.config], default_config_files=[])
        self.conf = provfw_conf.CONF
        db.configure(self.database.url)
        if self.design == "provfw":
            self._start_conductor()
        else:
            # Today's provfw-api declared the fanout exchange itself; hosts bind to it passively.
            with rpc.connection(self.conf) as conn:
                rpc.fanout_exchange(self.conf)(conn.channel()).declare()
        self.compute_api = compute_api_mod.ComputeAPI(self.conf)
        self._start_hosts()

    def _write_config(self) -> str:
        path = os.path.join(self.dir, "provfw.conf")
        with open(path, "w") as handle:
            handle.write(f"""[DEFAULT]
transport_url = {self.vhost.admin_url}
control_exchange = provfw
state_path = {self.dir}/state

[database]
connection = {self.database.url}

[compute]
# The conductor's own heartbeat row stays out of the counts; simulated hosts run no
# heartbeat loop, and their periodic check only while they are behind (docs/benchmarks.md).
heartbeat_interval = 3600
reconcile_interval = 10

[conductor]
# Every simulated host shares the guest user, so reports name their host unverified.
trust_unverified_hosts = true
""")
        return path

    # ------------------------------------------------------------ processes

    def _start_conductor(self) -> None:
        self.conductor_log = os.path.join(self.dir, "conductor.log")
        log = open(self.conductor_log, "ab")
        self.conductor = subprocess.Popen([os.path.join(BIN, "provfw-conductor"), "--config-file", self.config],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.conductor.poll() is not None:
                raise RuntimeError(f"provfw-conductor exited: {self._tail(self.conductor_log)}")
            if "conductor server consuming" in self._tail(self.conductor_log, 200):
                return
            time.sleep(0.1)
        raise RuntimeError(f"provfw-conductor did not start consuming: {self._tail(self.conductor_log)}")

    @staticmethod
    def _tail(path: str, lines: int = 30) -> str:
        try:
            with open(path, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def _start_hosts(self) -> None:
        names = fleetsim.host_names(self.count)
        every = max(1, self.args.sample_every)
        sample = names[::every]
        if len(sample) < self.args.min_sample:
            step = max(1, len(names) // self.args.min_sample)
            sample = names[::step][:self.args.min_sample]
        self.sample = sample
        light = [name for name in names if name not in set(sample)]
        # A sample host decodes 120k rules holding the GIL for most of a second: alone in its process it
        # delays nobody's hub but its own, and at a raised nice value it takes only the CPU left over.
        groups = [([name], True) for name in sample]
        groups += [(light[i::self.args.procs], False) for i in range(self.args.procs) if light[i::self.args.procs]]
        context = multiprocessing.get_context("spawn")
        # provfw's engine holds pool + 2 x pool overflow connections; a sample process needs one.
        pool = max(1, (self.args.db_connections - len(sample)) // (3 * self.args.procs))
        self.db_connections = len(sample) + 3 * pool * sum(1 for _group, full in groups if not full)
        for index, (group, full) in enumerate(groups):
            parent, child = context.Pipe()
            spec = {"config": self.config, "mode": self.design, "hosts": group, "full": sample,
                    "log": os.path.join(self.dir, f"hosts-{index}.log"), "db_url": self.database.url,
                    "db_pool": 1 if full else pool, "nice": self.args.sample_nice if full else 0}
            process = context.Process(target=fleetsim.host_process_main, args=(child, spec), daemon=True,
                                      name=f"hosts-{index}")
            process.start()
            self.processes.append((process, parent))
        for process, pipe in self.processes:
            if not pipe.poll(120) or pipe.recv() != "built":
                raise RuntimeError(f"host process {process.name} did not start (see {self.dir})")

    def _ask(self, command: tuple, timeout: float) -> list:
        for _process, pipe in self.processes:
            pipe.send(command)
        answers = []
        for process, pipe in self.processes:
            if not pipe.poll(timeout):
                raise RuntimeError(f"host process {process.name} did not answer {command[0]} (see {self.dir})")
            answers.append(pipe.recv())
        return answers

    def start_all(self) -> float:
        started = time.monotonic()
        self._ask(("start",), 120)
        return started

    def stop_all(self) -> None:
        self._ask(("stop",), 300)

    def wait(self, generation: int | None, timeout: float) -> int:
        return sum(answer["done"] for answer in self._ask(("wait", generation, timeout), timeout + 60))

    def collect(self) -> dict:
        answers = self._ask(("collect",), 120)
        merged = {"records": [], "db": {"statements": 0, "transactions": 0, "rows_read": 0}, "cpu": 0.0,
                  "rss_kb": 0, "recorded": collections.Counter()}
        for answer in answers:
            merged["records"].extend(answer["records"])
            merged["recorded"].update(answer["recorded"])
            merged["cpu"] += answer["cpu"]
            merged["rss_kb"] += answer["rss_kb"]
            for key, value in (answer["db"] or {}).items():
                merged["db"][key] += value
        return merged

    # ------------------------------------------------------------ the conductor's counters

    def conductor_counters(self) -> dict:
        """The conductor's counters, logged on SIGUSR1 (provfw-conductor)."""
        if self.conductor is None:
            return {}
        before = self._tail(self.conductor_log, 100000).count("conductor counters ")
        os.kill(self.conductor.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = self._tail(self.conductor_log, 100000)
            lines = [line for line in text.splitlines() if "conductor counters " in line]
            if len(lines) > before:
                return json.loads(lines[-1].split("conductor counters ", 1)[1])
            time.sleep(0.05)
        raise RuntimeError("provfw-conductor did not log its counters")

    # ------------------------------------------------------------ phases

    @contextlib.contextmanager
    def measure(self, phase: Phase):
        hosts_before = self.collect()                    # also drops the records of earlier phases
        counters_before = self.conductor_counters()
        cpu_before = proc_cpu_seconds(self.conductor.pid) if self.conductor else None
        broker_before = proc_cpu_seconds(self.broker) if self.broker else None
        self.database_cpu.start()
        bus_before = bus_octets(self.vhost.name)
        api_before = db.statement_counts()["statements"]
        wall = time.monotonic()
        holder: dict = {}
        yield holder
        time.sleep(SETTLE)
        phase.wall = time.monotonic() - wall - SETTLE
        api_after = db.statement_counts()["statements"]
        if self.broker:
            phase.broker_cpu = proc_cpu_seconds(self.broker) - broker_before
        phase.database_cpu = self.database_cpu.stop()
        bus_after = bus_octets(self.vhost.name)
        if self.conductor:
            phase.conductor_cpu = proc_cpu_seconds(self.conductor.pid) - cpu_before
            memory = proc_memory_kb(self.conductor.pid)
            phase.conductor_rss_mb, phase.conductor_hwm_mb = memory["VmRSS"] / 1024, memory["VmHWM"] / 1024
        counters_after = self.conductor_counters()
        hosts_after = self.collect()
        phase.api_statements = api_after - api_before
        phase.bus_in, phase.bus_out = bus_after[0] - bus_before[0], bus_after[1] - bus_before[1]
        phase.hosts_cpu = hosts_after["cpu"] - hosts_before["cpu"]
        phase.hosts_rss_mb = hosts_after["rss_kb"] / 1024
        phase.driver_writes = dict(hosts_after["recorded"] - hosts_before["recorded"])
        if self.conductor:
            phase.conductor = {k: v - counters_before.get(k, 0) for k, v in counters_after.items()}
            phase.statements = phase.conductor.get("db_statements", 0)
            phase.transactions = phase.conductor.get("db_transactions", 0)
            phase.rows_read = phase.conductor.get("db_rows_read", 0)
        else:
            phase.statements = hosts_after["db"]["statements"] - hosts_before["db"]["statements"]
            phase.transactions = hosts_after["db"]["transactions"] - hosts_before["db"]["transactions"]
            phase.rows_read = hosts_after["db"]["rows_read"] - hosts_before["db"]["rows_read"]
        holder["records"] = hosts_after["records"]

    def cast_change(self, changes: Changes) -> None:
        """The cast provfw-api sends for a mutation: the change itself (provfw) or only the generation (today)."""
        if self.design == "provfw":
            self.compute_api.notify(changes)
        else:
            self.compute_api.trigger_provider_fw_rules_refresh(changes.generation)

    def run(self, specs: list, changes: int, timeout: float) -> dict[str, Phase]:
        phases = {}
        self.start_all()
        if self.wait(None, timeout) < self.count:
            raise RuntimeError(f"not every host started on the empty rule set (see {self.dir})")

        # 1. the import: one transaction, one cast with only the generations (provfw-api's bulk create)
        self._ask(("light", True), 60)
        phase = phases["import"] = Phase("import", self.count)
        with self.measure(phase) as out:
            began = time.monotonic()
            result = db.provider_fw_rules_create_many(specs, created_by="bench", audit=db.Audit("bench"),
                                                      max_rules=self.conf.max_rules, action="rule.import")
            cast_at = time.monotonic()
            phase.api_seconds = cast_at - began
            if self.design == "provfw":
                self.compute_api.trigger_provider_fw_rules_refresh(result.generation, result.generation - 1)
            else:
                self.compute_api.trigger_provider_fw_rules_refresh(result.generation)
            phase.done = self.wait(result.generation, timeout)
        self._summarise(phase, out["records"], {result.generation: cast_at})
        progress(f"  {self.design} N={self.count}: import served to {phase.done}/{self.count} hosts")

        # 2. one-rule changes, one at a time; every host handles everything in full
        self._ask(("light", False), 60)
        phase = phases["change"] = Phase("change", self.count, changes=changes)
        base = int.from_bytes(bytes([100, 127, 0, 0]), "big")
        cast_times = {}
        with self.measure(phase) as out:
            done = []
            for index in range(changes):
                spec = make_spec(".".join(str(b) for b in (base + 1 + index).to_bytes(4, "big")))
                began = time.monotonic()
                rule, generation = db.provider_fw_rule_create(spec, created_by="bench", audit=db.Audit("bench"),
                                                              max_rules=self.conf.max_rules)
                cast_times[generation] = time.monotonic()
                phase.api_seconds += cast_times[generation] - began
                self.cast_change(Changes(generation - 1, generation, [db.rule_of(rule)], []))
                done.append(self.wait(generation, min(timeout, 120)))
                time.sleep(0.1)
            phase.done = min(done)
        self._summarise(phase, out["records"], cast_times)
        phase.api_seconds /= changes
        progress(f"  {self.design} N={self.count}: {changes} one-rule changes applied")

        # 3. cold start: every host stops, then all N start at once on the imported rules
        self.stop_all()
        self._ask(("light", True), 60)
        generation = db.provider_fw_generation_get()
        phase = phases["cold"] = Phase("cold", self.count)
        with self.measure(phase) as out:
            started = self.start_all()
            phase.done = self.wait(generation, timeout)
        self._summarise(phase, out["records"], {generation: started})
        progress(f"  {self.design} N={self.count}: cold start served to {phase.done}/{self.count} hosts")
        return phases

    def _summarise(self, phase: Phase, records: list[dict], targets: dict[int, float]) -> None:
        """Fill ``phase`` from the hosts' records; ``targets``: generation -> the moment it was cast (or started).

        A host reached a generation with the first record after which it had
        applied it (a cast, a retried start, a catch-up check); that record
        gives its served and applied times, its size and its CPU.
        """
        by_host: dict[str, list[dict]] = collections.defaultdict(list)
        for record in records:
            by_host[record["host"]].append(record)
            if record["error"]:
                phase.errors.append(f"{record['host']}: {record['error']}")
        phase.retried = len({r["host"] for r in records if r["error"]})
        for generation, t0 in targets.items():
            applied = []
            for host_records in by_host.values():
                reached = next((r for r in host_records
                                if r["generation_after"] is not None and r["generation_after"] >= generation
                                and not r["error"]), None)
                if reached is None:
                    continue
                cast = next((r for r in host_records if r["kind"] == "cast" and r["cast_generation"] == generation),
                            None)
                arrived = reached["served"] or reached["cast_arrived"] or (cast and cast["cast_arrived"])
                if arrived is not None:
                    phase.served.append(arrived - t0)
                applied.append(reached["done"] - t0)
                if reached["full"] or phase.name == "change":
                    phase.own_cpu.append(reached["cpu"])
                if reached["bytes"]:
                    phase.bytes_per_host.append(reached["bytes"])
            phase.latency.extend(applied)
            if len(applied) == self.count:
                phase.fleet.append(max(applied))
        phase.reply_bytes = int(statistics.median(phase.bytes_per_host)) if phase.bytes_per_host else 0

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        for process, pipe in self.processes:
            with contextlib.suppress(Exception):
                pipe.send(("exit",))
        # A process busy with a command (a long wait) reads "exit" only afterwards: terminate it.
        deadline = time.monotonic() + 15
        for process, _pipe in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process, _pipe in self.processes:
            if process.is_alive():
                process.terminate()
        for process, _pipe in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.processes.clear()
        if self.compute_api is not None:
            self.compute_api.close()
        if self.conductor is not None and self.conductor.poll() is None:
            os.killpg(self.conductor.pid, signal.SIGTERM)
            try:
                self.conductor.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.conductor.pid, signal.SIGKILL)
                self.conductor.wait(5)
        if self.database_cpu is not None:
            self.database_cpu.close()
        if self.database is not None:
            self.database.drop()
        if self.vhost is not None:
            self.vhost.close()


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- output

def ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:,.1f} ms"
    return f"{value * 1000:,.0f} ms" if value < 10 else f"{value:,.1f} s"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f} s"


def triple(values: list[float]) -> str:
    if not values:
        return "-"
    return " / ".join(ms(percentile(values, q)) for q in (0.5, 0.99, 1.0))


def size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return str(value)


def count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def per_change(phase: Phase, value: float | None) -> float | None:
    return None if value is None else value / phase.changes


def received(design: str, phase: Phase) -> str:
    if not phase.reply_bytes:
        return "-"
    return f"{size(phase.reply_bytes)} compressed" if design == "provfw" else f"{phase.reply_bytes:,} rows"


# (label, value of one design's phases, format); a label alone is a heading.  Ratios are today / provfw.
ROWS: list[tuple] = [
    ("one-rule change",),
    ("  applied, per host  p50 / p99 / max", lambda d, r: triple(r["change"].latency), str),
    ("  applied on all N hosts (median change)", lambda d, r: median(r["change"].fleet), ms),
    ("  change arrived (cast; today: rows), p99", lambda d, r: percentile(r["change"].served, 0.99), ms),
    ("  one host's own handling (CPU p50)", lambda d, r: median(r["change"].own_cpu), ms),
    ("  hosts that had to retry", lambda d, r: r["change"].retried, count),
    ("  db statements per change", lambda d, r: per_change(r["change"], r["change"].statements), count),
    ("  db transactions per change", lambda d, r: per_change(r["change"], r["change"].transactions), count),
    ("  bus bytes per change", lambda d, r: per_change(r["change"], r["change"].bus_in + r["change"].bus_out), size),
    ("  conductor CPU per change", lambda d, r: per_change(r["change"], r["change"].conductor_cpu), ms),
    ("  PostgreSQL CPU per change", lambda d, r: per_change(r["change"], r["change"].database_cpu), ms),
]
for _key, _title in (("import", "{rules:,}-rule import"), ("cold", "cold start of all N hosts with {rules:,} rules")):
    ROWS += [
        (_title,),
        ("  hosts served", lambda d, r, k=_key: f"{r[k].done:,} / {r[k].hosts:,}", str),
        ("  hosts that had to retry", lambda d, r, k=_key: r[k].retried, count),
        ("  served, per host  p50 / p99 / max", lambda d, r, k=_key: triple(r[k].served), str),
        ("  one host's own decode+apply (CPU, median of sample)", lambda d, r, k=_key: median(r[k].own_cpu), ms),
        ("  one host received", lambda d, r, k=_key: received(d, r[k]), str),
        ("  snapshot / delta reads (conductor)", lambda d, r, k=_key: (
            f"{r[k].conductor.get('snapshot_reads', 0)} / {r[k].conductor.get('delta_reads', 0)}"
            if d == "provfw" else None), str),
        ("  db statements", lambda d, r, k=_key: r[k].statements, count),
        ("  db rows read", lambda d, r, k=_key: r[k].rows_read, count),
        ("  bus bytes", lambda d, r, k=_key: r[k].bus_in + r[k].bus_out, size),
        ("  conductor CPU", lambda d, r, k=_key: r[k].conductor_cpu, seconds),
        ("  PostgreSQL CPU", lambda d, r, k=_key: r[k].database_cpu, seconds),
        ("  broker CPU", lambda d, r, k=_key: r[k].broker_cpu, seconds),
        ("  host processes' CPU (all simulated hosts)", lambda d, r, k=_key: r[k].hosts_cpu, seconds),
    ]
ROWS += [("conductor RSS after the cold start / peak", lambda d, r: (
    f"{r['cold'].conductor_rss_mb:,.0f} / {r['cold'].conductor_hwm_mb:,.0f} MB" if r["cold"].conductor_rss_mb
    else None), str)]


def print_table(hosts: int, results: dict[str, dict[str, Phase]], rules: int, notes: dict) -> None:
    lines = []
    for row in ROWS:
        if len(row) == 1:
            lines.append((row[0].format(rules=rules), "", "", ""))
            continue
        label, value, fmt = row
        raw = {design: value(design, phases) if phases else None for design, phases in
               ((d, results.get(d)) for d in DESIGNS)}
        text = {design: "-" if raw[design] is None else fmt(raw[design]) for design in DESIGNS}
        ours, theirs = raw["provfw"], raw["baseline"]
        ratio = (f"{theirs / ours:,.1f}x" if isinstance(ours, (int, float)) and isinstance(theirs, (int, float))
                 and ours > 0 else "")
        lines.append((label, text["provfw"], text["baseline"], ratio))
    width = max(len(line[0]) for line in lines)
    header = (f"{'N = ' + format(hosts, ',') + ' hosts':<{width}}  {DESIGNS['provfw']:>26}  "
              f"{DESIGNS['baseline']:>26}  {'today/provfw':>12}")
    print()
    print(header)
    print("-" * len(header))
    for label, ours, theirs, ratio in lines:
        print(f"{label:<{width}}  {ours:>26}  {theirs:>26}  {ratio:>12}")
    footer = (
        f"Times from the cast (or the start command) to each host. 'served' = the conductor's reply (provfw) or "
        f"the database's rows (today) arrived at the host. {notes['sample']} of {hosts:,} hosts decode, parse and "
        f"reconcile every reply; their 'own decode+apply' is the CPU time of the host's thread, which waiting for "
        f"a core does not inflate. The others take the generation from the reply's headers (provfw) or receive "
        f"the rows without building Python objects (today), so 'served to all hosts' is the fleet's time without "
        f"the decode+apply each host pays on its own cores. For the one-rule change every host applies the change "
        f"itself; all {hosts:,} share 2 cores, so 'applied' includes the other hosts' handling. "
        f"The API's own transaction: {notes['api_statements']:.0f} statements per change in both designs. "
        f"Today's hosts drew on up to {notes['db_connections']} PostgreSQL connections (a pool per host process; "
        f"a fleet of {hosts:,} hosts would open {hosts:,}).")
    print(textwrap.fill(footer, width=len(header)))
    for design, phases in results.items():
        for phase in phases.values():
            if phase.errors:
                print(f"  {DESIGNS[design]}, {phase.name}: {len(phase.errors)} host errors, e.g. "
                      f"{phase.errors[0][:200]}")


def print_goals(all_results: dict[int, dict[str, dict[str, Phase]]]) -> list[dict]:
    goals = []
    largest = max(all_results)
    ours = {n: r["provfw"] for n, r in all_results.items() if "provfw" in r}
    if largest in ours:
        p99 = percentile(ours[largest]["change"].latency, 0.99)
        complete = ours[largest]["change"].done == largest
        goals.append({"goal": f"at {largest:,} hosts one change p99 <= 500 ms", "value": ms(p99),
                      "met": bool(complete and p99 is not None and p99 <= 0.5)})
        per_change = {n: r["change"].statements / r["change"].changes for n, r in ours.items()}
        smallest = min(per_change)
        independent = per_change[largest] <= 2 * max(per_change[smallest], 1)
        theirs = {n: r["baseline"]["change"].statements / r["baseline"]["change"].changes
                  for n, r in all_results.items() if "baseline" in r}
        goals.append({"goal": "database statements per change independent of N (largest N <= 2x smallest N)",
                      "value": ", ".join(f"N={n:,}: {v:,.1f}" for n, v in sorted(per_change.items()))
                      + (" (today: " + ", ".join(f"{v:,.0f}" for _, v in sorted(theirs.items())) + ")"
                         if theirs else ""),
                      "met": independent})
        cold = ours[largest]["cold"]
        worst = percentile(cold.served, 1.0)
        reads = cold.conductor.get("snapshot_reads", 0)
        goals.append({"goal": f"cold start of all {largest:,} served by the conductor <= 30 s, <= 5 snapshot reads",
                      "value": f"{ms(worst)}, {reads} snapshot reads, {cold.done:,}/{largest:,} served",
                      "met": bool(cold.done == largest and worst is not None and worst <= 30 and reads <= 5)})
    print()
    print("Goals")
    for goal in goals:
        print(f"  {'met    ' if goal['met'] else 'NOT MET'}  {goal['goal']}: {goal['value']}")
    return goals


# --------------------------------------------------------------------------- main

def _interrupt(_signum, _frame):
    raise KeyboardInterrupt()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="fleet sizes, comma separated (default 10,100,1000)")
    parser.add_argument("--feed", default=DEFAULT_IPSUM,
                        help="blocklist file (default: the IPsum snapshot in ../shared/data/ beside the repository)")
    parser.add_argument("--generate", type=int, help="import N synthetic addresses instead of the feed")
    parser.add_argument("--changes", type=int, default=20, help="one-rule changes per size (default 20)")
    parser.add_argument("--procs", type=int, default=4, help="processes for the light hosts (default 4)")
    parser.add_argument("--sample-every", type=int, default=100,
                        help="one host in this many decodes and applies every reply (default 100)")
    parser.add_argument("--min-sample", type=int, default=3, help="at least this many sample hosts (default 3)")
    parser.add_argument("--sample-nice", type=int, default=10,
                        help="nice value of the sample hosts' processes, one each (default 10: their decoding must "
                             "not delay the delivery being measured; their own cost is thread CPU time either way)")
    parser.add_argument("--db-connections", type=int, default=50,
                        help="PostgreSQL connections today's hosts may share in all (default 50; max_connections "
                             "is 100 and other users need some)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a phase may take (default 300)")
    parser.add_argument("--skip-baseline", action="store_true", help="measure provfw only")
    parser.add_argument("--designs", default="provfw,baseline",
                        help="which designs to run (default provfw,baseline; 'baseline' is today's)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    designs = [d for d in args.designs.split(",") if d in DESIGNS and not (args.skip_baseline and d == "baseline")]

    # Ctrl-C and SIGTERM end the run through every finally below (a shell starts background jobs with
    # SIGINT ignored, and Python then leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    specs = load_specs(None if args.generate else args.feed, args.generate)
    workdir = tempfile.mkdtemp(prefix="provfw-bench-fleet-")
    all_results: dict[int, dict[str, dict[str, Phase]]] = {}
    print(f"bench_fleet: {len(specs):,} rules, sizes {', '.join(f'{n:,}' for n in sizes)}, {args.changes} one-rule "
          f"changes, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    try:
        for hosts in sizes:
            results: dict[str, dict[str, Phase]] = {}
            notes = {"sample": 0, "api_statements": 0.0, "db_connections": "-"}
            for design in designs:
                progress(f"N={hosts}: {DESIGNS[design]}")
                fleet = Fleet(design, hosts, args, workdir)
                try:
                    fleet.start()
                    notes["sample"] = len(fleet.sample)
                    results[design] = fleet.run(specs, args.changes, args.timeout)
                    notes["api_statements"] = results[design]["change"].api_statements / args.changes
                    if design == "baseline":
                        notes["db_connections"] = fleet.db_connections
                finally:
                    fleet.close()
            all_results[hosts] = results
            print_table(hosts, results, len(specs), notes)
            sys.stdout.flush()
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
        goals = print_goals(all_results)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"sizes": {n: {d: {p: dataclasses.asdict(v) for p, v in r.items()}
                                         for d, r in res.items()} for n, res in all_results.items()},
                           "goals": goals, "rules": len(specs)}, handle, indent=1, default=str)
    except KeyboardInterrupt:
        progress("interrupted: everything the bench started has been stopped and removed")
        return 130
    finally:
        if args.keep:
            progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
