"""Simulated compute hosts for ``bench_fleet.py``: many real ComputeManagers per process on one AMQP connection.

Design
------
A simulated host is the worker's real code - ``ComputeManager``, its
``Reconciler``, ``ConductorAPI`` and the real ``rpc.FanoutConsumer``'s queue
and message handling - with two things replaced:

* the firewall driver records what it would write (``RecordingFirewallDriver``,
  a ``PlannedFirewallDriver`` whose plans are ``Call`` steps that count
  elements; no kernel, no per-host file lock);
* the transport: a real worker opens two AMQP connections (its cast consumer
  and its conductor client).  The RabbitMQ on the bench machine accepts about
  830 sockets (its file-descriptor limit) and is shared with other users, so
  1,000 hosts cannot each connect.  Each host process therefore owns one
  ``Hub``: ONE kombu connection whose thread performs every AMQP operation
  (py-amqp connections are not thread-safe); every host still has its own
  exclusive fanout queue and its own reply queue on it, and its own thread that
  handles its messages in order, exactly like a worker's consumer thread.
  ``HubRpcClient`` is ``rpc.RpcClient`` (its retries, timeouts and
  ``ConductorUnavailable``) with the connection handling replaced by the hub.

Fleet time and host cost are told apart (1,000 hosts share two cores): the
hub thread timestamps every message the moment it ARRIVES (``time.monotonic``,
one clock for every process of the machine), and each host measures its own
handling as the CPU time of its thread (``time.thread_time``), which waiting
for the GIL or for a core does not inflate.  In the phases with large
replies (import, cold start) most hosts are *light*: they take a conductor
reply's generation and kind from its headers without decompressing it
(``LightConductorAPI``) and apply an empty rule set of that generation; a
sample of *full* hosts decompresses, parses and reconciles every reply.  In
the one-rule changes every host handles everything it receives in full.

``mode = "baseline"`` simulates today's design: no conductor; every host reads
the database itself (``DatabaseRules``, one SQLAlchemy engine per process whose
pool the hosts share) and writes its own Service row.  Light baseline hosts run
the same SELECTs as ``provider_fw_snapshot`` / ``provider_fw_changes_since``
and let libpq receive every row, but do not turn the rows into Python objects.

Each host process is driven by the coordinator over a ``multiprocessing``
pipe (``host_process_main``).

Thread-safety: the hub's connection is used only by the hub thread; other
threads hand it callables (``Hub.submit``).  A host's manager is called from
that host's thread only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import os
import queue
import resource
import signal
import socket
import threading
import time
import uuid
from typing import Any, Callable, Collection, Sequence

import kombu
from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception, rpc
from provfw.compute import manager as compute_manager
from provfw.conductor import api as conductor_api
from provfw.rules import Changes, RuleSpec, Snapshot
from provfw.virt import driver as virt_driver
from provfw.virt.firewall import base as fw_base

LOG = logging.getLogger("bench_fleet.hosts")

HUB_POLL = 0.002          # seconds the hub waits for a frame before running queued publishes again


# --------------------------------------------------------------------------- the recording driver

class RecordingFirewallDriver(fw_base.PlannedFirewallDriver):
    """Plans what a set driver would write and counts it instead of writing it.

    A full plan walks every desired spec once (as a renderer would) and
    records how many set elements it would load; a delta plan records how many
    it would add and delete.  ``recorded`` holds the counts.  There is no
    kernel, so ``applying`` takes only the driver's own lock: the per-host
    file lock would make every simulated host of the machine wait for each other.
    """

    name = "recording"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF):
        super().__init__(conf, runner=_NoKernel())
        self.recorded: collections.Counter = collections.Counter()

    def applying(self):
        return self._lock

    def plan_full(self, desired: Collection[RuleSpec]) -> fw_base.Plan:
        v6 = sum(1 for spec in desired if ":" in spec.cidr)
        count = len(desired)

        def record() -> bool:
            self.recorded["full_writes"] += 1
            self.recorded["elements_loaded"] += count
            self.recorded["v6_elements_loaded"] += v6
            return True

        return fw_base.Plan(state={"elements": count}, sets=(fw_base.Call(record, f"load {count} elements"),))

    def plan_delta(self, added: Sequence[RuleSpec], removed: Sequence[RuleSpec], state: Any,
                   desired_count: int) -> fw_base.Plan:
        def record() -> bool:
            self.recorded["delta_writes"] += 1
            self.recorded["elements_added"] += len(added)
            self.recorded["elements_deleted"] += len(removed)
            return True

        return fw_base.Plan(state={"elements": desired_count}, mode="delta",
                            sets=(fw_base.Call(record, f"add {len(added)}, delete {len(removed)}"),))

    def plan_check(self, specs: Collection[RuleSpec]) -> fw_base.Plan:
        return fw_base.Plan(state=None)

    def teardown(self) -> None:
        pass


class _NoKernel:
    """The runner of a driver that must never run a command."""

    netns = ""

    def __call__(self, cmd, input=None, check=True):
        raise AssertionError(f"the recording driver ran a command: {cmd}")


class RecordingComputeDriver(virt_driver.FirewallComputeDriver):
    """A compute driver that forwards to a RecordingFirewallDriver (as LibvirtConnection forwards to its driver)."""

    name = "bench"

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF):
        self.firewall_driver = RecordingFirewallDriver(conf)


# --------------------------------------------------------------------------- one connection, many hosts

class Hub:
    """One AMQP connection shared by a process's simulated hosts; its thread does every AMQP operation.

    ``consume(queues, callback)`` delivers ``callback(message, arrived)`` on the
    hub thread (``arrived``: ``time.monotonic()`` when the frame was read);
    ``publish`` queues a message for the hub thread to send.  Publishes are not
    confirmed (a confirm would make the hub wait for the broker between two
    hosts' messages); casts and requests are at most once in provfw anyway.
    """

    def __init__(self, conf: cfg.ConfigOpts, url: str | None = None):
        self.conf = conf
        self.url = url or conf.transport_url
        self.conn = kombu.Connection(rpc.transport_urls(self.url)[0], heartbeat=30, connect_timeout=5)
        self.conn.ensure_connection(max_retries=3)
        self.user_id = self.conn.userid or None
        self._rx = self.conn.channel()
        self._producer = kombu.Producer(self.conn.channel(), auto_declare=False)
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_heartbeat = time.monotonic() + 1.0
        while not self._stop.is_set():
            self._run_queued()
            try:
                self.conn.drain_events(timeout=HUB_POLL)
            except socket.timeout:
                pass
            now = time.monotonic()
            if now >= next_heartbeat:
                self.conn.heartbeat_check()
                next_heartbeat = now + 1.0

    def _run_queued(self) -> None:
        while True:
            try:
                func, future = self._todo.get_nowait()
            except queue.Empty:
                return
            if future is not None and not future.set_running_or_notify_cancel():
                continue
            try:
                result = func()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                if future is None:
                    LOG.exception("hub: queued operation failed")
                else:
                    future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(result)

    def submit(self, func: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``func()`` on the hub thread; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._todo.put((func, future))
        return future

    def call(self, func: Callable[[], Any], timeout: float = 60.0) -> Any:
        return self.submit(func).result(timeout)

    def publish(self, body: Any, **kwargs) -> None:
        """Send ``body`` (kombu Producer.publish arguments) from the hub thread; do not wait."""
        self._todo.put((lambda: self._producer.publish(body, retry=False, **kwargs), None))

    def consume(self, queues: list[kombu.Queue], callback: Callable[[kombu.Message, float], None]) -> kombu.Consumer:
        """Declare ``queues`` and consume them (call on the hub thread, e.g. through ``call``)."""
        def on_message(message: kombu.Message) -> None:
            callback(message, time.monotonic())

        consumer = kombu.Consumer(self._rx, queues=queues, no_ack=True, on_message=on_message)
        consumer.consume()
        return consumer

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            self.conn.release()
        except Exception:  # noqa: BLE001 - closing a connection that may be gone
            pass


class HubRpcClient(rpc.RpcClient):
    """``rpc.RpcClient`` over a Hub: the same envelope, retries, timeouts and errors, no connection of its own.

    ``call_raw`` returns the reply's body undecoded (what ``ConductorAPI``
    asks for; a light host then reads only its headers).  After each call
    ``last_arrival`` is the monotonic time the reply arrived and
    ``last_reply_bytes`` its size.
    """

    def __init__(self, hub: Hub, host: str, conf: cfg.ConfigOpts):
        super().__init__(host, conf, url=hub.url)
        self.hub = hub
        self.last_arrival = 0.0
        self._waiting: dict[str, list] = {}
        self._reply_queue = rpc.reply_queue_name(conf, host)
        queue_ = kombu.Queue(self._reply_queue, exclusive=True, auto_delete=True, durable=False)
        self._reply_consumer = hub.call(lambda: hub.consume([queue_], self._on_reply))

    def _ensure(self):
        return self.hub.conn

    def _reset(self) -> None:
        self._waiting.clear()

    def close(self) -> None:
        consumer = self._reply_consumer
        if consumer is not None:
            self._reply_consumer = None
            self.hub.submit(consumer.cancel)

    def _on_reply(self, message: kombu.Message, arrived: float) -> None:
        slot = self._waiting.pop((message.properties or {}).get("correlation_id"), None)
        if slot is not None:
            slot[1] = (message, arrived)
            slot[0].set()

    def _publish(self, method: str, args: dict, **properties) -> None:
        if self.hub.user_id:
            properties["user_id"] = self.hub.user_id
        self.hub.publish(rpc._envelope(method, args), exchange=self.exchange.name, serializer="json",
                         routing_key=rpc.conductor_routing_key(properties), **properties)

    def _call_once(self, method: str, args: dict):
        correlation_id = uuid.uuid4().hex
        slot: list = [threading.Event(), None]
        self._waiting[correlation_id] = slot
        self._publish(method, args, reply_to=self._reply_queue, correlation_id=correlation_id,
                      expiration=self.timeout)
        if not slot[0].wait(self.timeout):
            self._waiting.pop(correlation_id, None)
            raise TimeoutError(f"no reply within {self.timeout:.1f}s")
        message, self.last_arrival = slot[1]
        self.last_reply_bytes = len(message.body)
        if message.content_type != rpc.REPLY_CONTENT_TYPE:
            raise exception.ProvfwError(f"{method}: unexpected reply content type {message.content_type!r}")
        return message.body, dict(message.headers or {})


# Set during the phases whose replies are large (import, cold start): light hosts then skip parsing them.
LIGHT_PHASE = threading.Event()


class LightConductorAPI(conductor_api.ConductorAPI):
    """A ConductorAPI that, in a LIGHT_PHASE, reads a reply's kind and generation from its headers only.

    The host then applies an empty rule set of that generation: it converges
    on generations (and casts that carry a change apply to it normally) without
    spending a core on parsing 120k rules that a sample host parses for it.
    Outside a LIGHT_PHASE it parses the reply as ConductorAPI does.  Its
    client's ``call_raw`` returns replies undecoded.
    """

    def get_provider_fw_rules(self, since_generation, min_generation=None, fresh=False):
        body, headers = self._call_rules(since_generation, min_generation, fresh)
        if not LIGHT_PHASE.is_set():
            return conductor_api.parse_rules_reply(rpc.decode_reply(body))
        generation = headers.get("generation")
        if not isinstance(generation, int):
            raise exception.ProvfwError(f"conductor reply without a generation header: {headers}")
        if headers.get("kind") == "delta" and since_generation is not None:
            return Changes(since_generation, generation, [], [])
        return Snapshot(generation, [])


# --------------------------------------------------------------------------- today's design: hosts read the database

class DatabaseRules:
    """What a host of today's design does instead of asking a conductor: read (and write) the database itself.

    Implements the two calls ``ComputeManager`` makes of its conductor.  A
    database error becomes a ProvfwError, which the manager records as the
    host's error (as an unreachable conductor would be).  In a LIGHT_PHASE,
    ``light`` hosts run the SELECTs and let the rows arrive without building
    Python objects.
    """

    def __init__(self, host: str, light: bool):
        self.host = host
        self.light_host = light
        self.last_arrival = 0.0
        self.last_rows = 0

    def get_provider_fw_rules(self, since_generation, min_generation=None, fresh=False):
        from provfw.db import api as db     # reads the database: always fresh
        try:
            if self.light_host and LIGHT_PHASE.is_set():
                return self._unparsed(since_generation)
            # None: deletions after `since` were purged (provfw-manage db purge), only a snapshot answers.
            result = None if since_generation is None else db.provider_fw_changes_since(since_generation)
            if result is None:
                result = db.provider_fw_snapshot()
                self.last_rows = len(result.rules)
            else:
                self.last_rows = result.size
            self.last_arrival = time.monotonic()
            return result
        except exception.ProvfwError:
            raise
        except Exception as exc:  # noqa: BLE001 - the pool's timeout, a lost connection
            raise exception.ProvfwError(f"database: {type(exc).__name__}: {exc}") from None

    def _unparsed(self, since):
        import sqlalchemy as sa

        from provfw.db import api as db
        from provfw.db.sqlalchemy import models

        rule = models.ProviderFirewallRule
        columns = (rule.id, rule.cidr, rule.protocol, rule.from_port, rule.to_port, rule.expires_at)
        generation = sa.select(models.FirewallGeneration.generation).where(models.FirewallGeneration.id == 1)
        with db.get_engine().connect() as conn:
            conn.execute(generation).scalar_one()
            if since is None:
                now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                queries = [sa.select(*columns).where(rule.deleted == 0, sa.or_(rule.expires_at.is_(None),
                                                                               rule.expires_at > now))]
            else:
                queries = [sa.select(*columns, rule.deleted_generation).where(rule.created_generation > since),
                           sa.select(*columns, rule.created_generation).where(rule.deleted_generation > since)]
            rows = 0
            for query in queries:
                result = conn.execute(query)     # every row is in libpq's buffer now, none parsed
                rows += max(result.rowcount, 0)
                result.close()
            conn.rollback()
            after = conn.execute(generation).scalar_one()
            conn.rollback()
        self.last_arrival = time.monotonic()
        self.last_rows = rows
        if since is None:
            return Snapshot(after, [])
        return Changes(since, after, [], [])

    def report_provider_fw_state(self, **state) -> None:
        from provfw.db import api as db
        applied_at = state.get("applied_at")
        quarantine = state.get("quarantine") or None
        try:
            db.service_update(
                self.host, heartbeat=True, driver=state.get("driver"), applied_generation=state["applied_generation"],
                rule_count=state["rule_count"], last_error=state.get("last_error"),
                quarantine=json.dumps(quarantine, sort_keys=True) if quarantine else None,
                applied_at=(datetime.datetime.fromtimestamp(applied_at, datetime.timezone.utc).replace(tzinfo=None)
                            if applied_at else None))
        except Exception as exc:  # noqa: BLE001 - as a lost report: the next one repeats it
            LOG.warning("%s: could not write its state: %s", self.host, exc)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- a simulated host

@dataclasses.dataclass
class Record:
    """One thing a host did; times are time.monotonic(), one clock for every process of the machine.

    ``kind``: ``start`` (an attempt at the first full sync), ``cast`` (a cast
    handled), ``check`` (the periodic check of a host that is behind).
    """

    host: str
    kind: str
    cast_generation: int | None           # the generation the cast announced
    generation_after: int | None          # what the host had applied once done
    cast_arrived: float | None = None     # the cast was read from the socket
    served: float | None = None           # the conductor's reply (or the database's rows) arrived
    done: float | None = None             # the manager returned
    bytes: int = 0                        # reply size (compressed) or rows read
    cpu: float = 0.0                      # this host's thread CPU seconds for the whole handling
    full: bool = False                    # a sample host (decoded and applied every rule)
    error: str | None = None


class SimHost:
    """One simulated compute host: a real ComputeManager with its own queue, reply queue and thread.

    It behaves as ``ComputeService`` does: it reports, then syncs in full -
    retried with the service's backoff (1 s doubling to ``reconcile_interval``)
    until that succeeds - and only then consumes casts.  The periodic check
    runs only while the host is behind (a failed apply): every
    ``reconcile_interval`` seconds, as the service's loop would catch it up.
    Checks of a host that is in sync are left out, so every figure belongs to
    the change being measured.
    """

    def __init__(self, name: str, conf: cfg.ConfigOpts, hub: Hub, mode: str, full: bool,
                 changed: threading.Condition):
        self.name = name
        self.conf = conf
        self.hub = hub
        self.full = full
        self.mode = mode
        self._changed = changed
        driver = RecordingComputeDriver(conf)
        if mode == "baseline":
            self.source: Any = DatabaseRules(name, light=not full)
            conductor = self.source
        else:
            self.source = HubRpcClient(hub, name, conf)
            conductor = (conductor_api.ConductorAPI if full else LightConductorAPI)(conf, name, client=self.source)
        self.manager = compute_manager.ComputeManager(conf, driver=driver, host=name, conductor=conductor)
        self.fanout = rpc.FanoutConsumer(self._on_cast, name, conf)
        self.records: list[Record] = []
        self.ready = False
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._consumer: kombu.Consumer | None = None
        self._cast_generation: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"host-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        interval = float(self.conf.compute.reconcile_interval)
        self.manager.report_state()
        delay = 1.0
        while not self._handle("start", None, None, self.manager.init_host):
            if self._stopping.wait(delay):
                return
            delay = min(2 * delay, interval)
        queues = self.fanout.queues()
        self._consumer = self.hub.call(lambda: self.hub.consume(queues, self._arrived))
        with self._changed:
            self.ready = True
            self._changed.notify_all()
        check_at = None
        while True:
            try:
                item = self._inbox.get(timeout=None if check_at is None else max(0.0, check_at - time.monotonic()))
            except queue.Empty:
                item = "check"
            if item is None:
                return
            if item == "check":
                check_at = None
                ok = self._handle("check", None, None, self.manager.periodic_check)
            else:
                message, arrived = item
                ok = self._handle("cast", message, arrived, None)
            if not ok and check_at is None:
                check_at = time.monotonic() + interval

    def _handle(self, kind: str, message: kombu.Message | None, arrived: float | None, func) -> bool:
        """Run one piece of the worker's work and record it; False when the host is left behind or in error."""
        cpu = time.thread_time()
        self._cast_generation = None
        self.source.last_arrival = None
        if self.mode == "baseline":
            self.source.last_rows = 0
        else:
            self.source.last_reply_bytes = 0
        error = None
        try:
            if message is not None:
                self.fanout.on_message(message, None)      # the real decode and dispatch
            else:
                func()
        except Exception as exc:  # noqa: BLE001 - recorded; the coordinator reports it
            error = f"{type(exc).__name__}: {exc}"
        generation = self.manager.applied_generation
        error = error or self.manager.last_error
        behind = (generation is None or error is not None
                  or (self._cast_generation is not None and generation < self._cast_generation))
        self._record(Record(self.name, kind, self._cast_generation, generation, arrived, self._served(),
                            time.monotonic(), self._size(), time.thread_time() - cpu, self.full,
                            error if behind else None))
        return not behind

    def _arrived(self, message: kombu.Message, arrived: float) -> None:
        self._inbox.put((message, arrived))

    def _on_cast(self, method: str, args: dict) -> None:
        generation = args.get("generation")
        self._cast_generation = generation if isinstance(generation, int) else None
        self.manager.dispatch(method, args)

    def _served(self) -> float | None:
        return getattr(self.source, "last_arrival", None) or None

    def _size(self) -> int:
        if self.mode == "baseline":
            return self.source.last_rows
        return self.source.last_reply_bytes

    def _record(self, record: Record) -> None:
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(30)
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            self.hub.call(consumer.cancel)
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- the host process

def _setup_logging(path: str) -> None:
    logging.basicConfig(filename=path, level=logging.WARNING,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def host_process_main(pipe, spec: dict) -> None:
    """A host process: builds its hosts and follows the coordinator's commands on ``pipe``.

    ``spec``: ``config`` (file), ``mode`` (provfw | baseline), ``hosts``
    [names], ``full`` [names of sample hosts], ``log`` (file),
    ``db_url`` / ``db_pool`` (baseline).  Commands (tuples) and answers:

    * ``("start",)``: start every host at once -> ``"started"``;
    * ``("wait", generation, timeout)``: until every host applied ``generation``
      (None: every host started) -> ``{"done", "total"}``;
    * ``("collect",)`` -> ``{"records", "db", "cpu", "rss_kb", "recorded"}``: the records since the last
      collect; the process's database counts, CPU seconds and RSS, and what its drivers recorded, since it began;
    * ``("stop",)``: stop every host (cancel its queues) and build new ones, not started -> ``"stopped"``;
    * ``("light", on)``: light hosts skip parsing large replies from now on (or stop skipping) -> ``"ok"``;
    * ``("exit",)``.

    ``nice``: raise the process's nice value (the sample hosts' process, so
    that their decoding takes only the CPU the fleet's delivery leaves).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the coordinator stops us
    if spec.get("nice"):
        os.nice(spec["nice"])
    threading.stack_size(1024 * 1024)
    _setup_logging(spec["log"])
    conf = provfw_conf.CONF
    provfw_conf.parse_args(["--config-file", spec["config"]], default_config_files=[])
    if spec["mode"] == "baseline":
        from provfw.db import api as db
        db.configure(spec["db_url"], spec["db_pool"])
    hub = Hub(conf)
    changed = threading.Condition()
    full = set(spec["full"])
    hosts: list[SimHost] = []
    recorded: collections.Counter = collections.Counter()

    def build() -> None:
        hosts[:] = [SimHost(name, conf, hub, spec["mode"], name in full, changed) for name in spec["hosts"]]

    def all_done(generation) -> int:
        if generation is None:
            return sum(1 for host in hosts if host.ready)
        return sum(1 for host in hosts
                   if host.ready and host.manager.applied_generation is not None
                   and host.manager.applied_generation >= generation)

    try:
        build()
        pipe.send("built")
        while True:
            command = pipe.recv()
            name = command[0]
            if name == "start":
                for host in hosts:
                    host.start()
                pipe.send("started")
            elif name == "wait":
                generation, timeout = command[1], command[2]
                deadline = time.monotonic() + timeout
                with changed:
                    while all_done(generation) < len(hosts) and time.monotonic() < deadline:
                        changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                    pipe.send({"done": all_done(generation), "total": len(hosts)})
            elif name == "collect":
                with changed:
                    records = [dataclasses.asdict(r) for host in hosts for r in host.records]
                    for host in hosts:
                        host.records.clear()
                for host in hosts:
                    recorded.update(host.manager.driver.firewall_driver.recorded)
                    host.manager.driver.firewall_driver.recorded.clear()
                db_counts = None
                if spec["mode"] == "baseline":
                    from provfw.db import api as db
                    db_counts = db.statement_counts()
                pipe.send({"records": records, "db": db_counts, "cpu": _cpu_seconds(), "rss_kb": _rss_kb(),
                           "recorded": dict(recorded)})
            elif name == "stop":
                for host in hosts:
                    host.stop()
                build()                  # new hosts, ready to start at once: nothing applied, no queue yet
                pipe.send("stopped")
            elif name == "light":
                (LIGHT_PHASE.set if command[1] else LIGHT_PHASE.clear)()
                pipe.send("ok")
            elif name == "exit":
                return
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        for host in hosts:
            try:
                host.stop()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        hub.close()


def _rss_kb() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def host_names(count: int) -> list[str]:
    return [f"hv-{index:04d}" for index in range(count)]
