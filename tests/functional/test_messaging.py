"""Casts and conductor requests over a real RabbitMQ (127.0.0.1:5672) and over the in-process memory:// bus.

Every test uses its own control_exchange, so concurrent runs never see each
other's messages, and deletes its exchanges afterwards.  Workers are real
ComputeService instances (consumer, periodic loops) with the noop firewall
driver; they reach the database only through a real ConductorService running
in this process.  Least-privilege bus users are tested in test_bus_permissions.py;
here every process shares the guest user, so the conductor trusts unverified hosts.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import kombu
import pytest

from provfw import exception, rpc
from provfw.compute import api as compute_api
from provfw.compute import manager as compute_manager
from provfw.compute import service as compute_service
from provfw.conductor import api as conductor_api
from provfw.db import api as db
from provfw.rules import Changes, make_spec
from provfw.virt.firewall.base import NoopFirewallDriver
from provfw.virt.libvirt_conn import LibvirtConnection
from tests.lib import services
from tests.lib.bus import ConductorThread
from tests.lib.netns import wait_until
from tests.lib.tcpproxy import TcpProxy

pytestmark = pytest.mark.functional


def use_bus(conf, url: str) -> str:
    """Point ``conf`` at ``url`` with an exchange prefix of its own; return the prefix."""
    prefix = f"provfw_test_{uuid.uuid4().hex[:10]}"
    conf.set_override("transport_url", url)
    conf.set_override("control_exchange", prefix)
    conf.set_override("trust_unverified_hosts", True, group="conductor")
    conf.set_override("report_flush_interval", 0.1, group="conductor")
    conf.set_override("call_timeout", 3.0, group="conductor")
    # Only casts and the start-up sync may apply anything during a test.
    conf.set_override("reconcile_interval", 3600, group="compute")
    conf.set_override("heartbeat_interval", 3600, group="compute")
    return prefix


def _delete_exchanges(conf, url: str) -> None:
    with rpc.connection(conf, url) as conn:
        for exchange in (rpc.fanout_exchange(conf), rpc.conductor_exchange(conf)):
            exchange(conn.channel()).delete()
        rpc.conductor_queue(conf)(conn.channel()).delete()


@pytest.fixture
def rabbit(conf):
    url = services.require_rabbitmq()
    use_bus(conf, url)
    yield url
    _delete_exchanges(conf, url)


@pytest.fixture
def memory_bus(conf):
    use_bus(conf, "memory://")
    return "memory://"


@pytest.fixture
def conductor(conf):
    started = []

    def start(compute=None):
        thread = ConductorThread(conf, compute)
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


class RecordingManager(compute_manager.ComputeManager):
    """A real ComputeManager that also remembers which casts reached it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.casts: list = []

    def apply_casts(self, casts):
        self.casts.extend(cast.get("generation") for cast in casts)
        return super().apply_casts(casts)


def make_worker(conf, host: str) -> compute_service.ComputeService:
    connection = LibvirtConnection(conf, firewall_driver=NoopFirewallDriver(conf))
    return compute_service.ComputeService(conf, RecordingManager(conf, driver=connection, host=host))


class Workers:
    """Starts ComputeServices and stops them all at once at the end of the test."""

    def __init__(self, conf):
        self.conf = conf
        self.started: list[compute_service.ComputeService] = []

    def start(self, host: str) -> compute_service.ComputeService:
        worker = make_worker(self.conf, host)
        self.started.append(worker)
        worker.start()
        assert worker.started.wait(15), f"{host} never finished its start-up sync"
        assert worker.consumer.connected.wait(15), f"{host} never connected to the bus"
        return worker

    def stop(self) -> None:
        for worker in self.started:               # stop every loop first, then join: one second, not N
            worker._stop.set()
            worker.consumer.stop()
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(conf):
    pool = Workers(conf)
    yield pool
    pool.stop()


class ConsumerThread:
    def __init__(self, conf, handler, host: str):
        self.consumer = rpc.FanoutConsumer(handler, host, conf)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.thread.start()
        assert self.consumer.connected.wait(15), "consumer never connected"

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def consumers(conf):
    started: list[ConsumerThread] = []

    def start(handler, host):
        # The conductor declares the fanout exchange; consumers only bind to it (a compute user may not declare).
        with rpc.connection(conf) as conn:
            rpc.fanout_exchange(conf)(conn.channel()).declare()
        thread = ConsumerThread(conf, handler, host)
        started.append(thread)
        return thread

    yield start
    for consumer in started:
        consumer.stop()


def reported(hosts) -> list:
    rows = {s.host: s for s in db.service_get_all()}
    return [rows[h].applied_generation if h in rows else None for h in hosts]


# --------------------------------------------------------------------------- RabbitMQ

def test_a_cast_carrying_the_change_is_applied_by_three_workers_without_asking_the_conductor(
        conf, rabbit, pg_db, conductor, workers):
    served = conductor()
    hosts = [f"hv-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    started = [workers.start(host) for host in hosts]
    requests_before = served.stats["requests"]
    rule, generation = db.provider_fw_rule_create(make_spec("203.0.113.5"))

    assert compute_api.ComputeAPI(conf).notify(Changes(generation - 1, generation, [db.rule_of(rule)], [])) is True

    assert wait_until(lambda: reported(hosts) == [generation] * 3, 10) is not None, reported(hosts)
    for worker in started:
        assert worker.manager.casts == [generation]
        assert make_spec("203.0.113.5") in worker.manager.reconciler.enforced()
    assert served.stats["requests"] == requests_before, "a cast that carries the change needs no round trip"


def test_a_cast_without_the_change_makes_every_worker_fetch_one_cached_delta(conf, rabbit, pg_db, conductor, workers):
    served = conductor()
    hosts = [f"hv-bulk-{i}" for i in range(3)]
    started = [workers.start(host) for host in hosts]
    result = db.provider_fw_rules_create_many([make_spec(f"198.51.100.{i}") for i in range(1, 40)])
    reads_before = served.stats["delta_reads"] + served.stats["snapshot_reads"]

    # As for a bulk import: only the generations travel.
    assert compute_api.ComputeAPI(conf).trigger_provider_fw_rules_refresh(result.generation,
                                                                          result.generation - 1) is True

    assert wait_until(lambda: reported(hosts) == [result.generation] * 3, 10) is not None, reported(hosts)
    assert all(w.manager.reconciler.rule_count == 39 for w in started)
    assert served.stats["delta_reads"] + served.stats["snapshot_reads"] - reads_before == 1


def test_a_worker_that_missed_a_cast_fetches_the_gap_from_the_conductor(conf, rabbit, sqlite_db, conductor, workers):
    conductor()
    worker = workers.start("hv-gap")
    missed, g1 = db.provider_fw_rule_create(make_spec("203.0.113.7"))        # its cast is lost
    rule, g2 = db.provider_fw_rule_create(make_spec("203.0.113.8"))

    compute_api.ComputeAPI(conf).notify(Changes(g2 - 1, g2, [db.rule_of(rule)], []))

    assert wait_until(lambda: worker.manager.applied_generation == g2, 10) is not None
    assert set(worker.manager.reconciler.enforced()) == {make_spec("203.0.113.7"), make_spec("203.0.113.8")}


def test_worker_started_after_the_cast_converges_through_its_start_up_sync(conf, rabbit, sqlite_db, conductor, workers):
    conductor()
    db.provider_fw_rule_create(make_spec("203.0.113.5"))
    _, generation = db.provider_fw_rule_create(make_spec("198.51.100.0/24", "tcp", 8080))
    assert compute_api.ComputeAPI(conf).trigger_provider_fw_rules_refresh(generation) is True   # nobody listens

    worker = workers.start("hv-late")
    assert worker.manager.applied_generation == generation
    assert worker.manager.casts == []
    assert wait_until(lambda: reported(["hv-late"]) == [generation], 10) is not None
    assert db.service_get("hv-late").rule_count == 2


def test_a_conductor_answers_two_hundred_requests_that_arrive_at_once(conf, rabbit, sqlite_db, conductor):
    """A fleet starting together: requests pile up in the conductor's socket while it answers the first."""
    conductor()
    db.provider_fw_rule_create(make_spec("203.0.113.5"))
    replies: dict = {}
    with rpc.connection(conf) as conn:
        reply_queue = kombu.Queue(f"provfw-test-replies-{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True)
        with kombu.Consumer(conn, [reply_queue], no_ack=True,
                            on_message=lambda m: replies.setdefault(m.properties["correlation_id"], m)):
            producer = kombu.Producer(conn.channel(), exchange=rpc.conductor_exchange(conf, passive=True),
                                      serializer="json", auto_declare=False)
            sent = [uuid.uuid4().hex for _ in range(200)]
            for correlation_id in sent:
                producer.publish({"version": rpc.MESSAGE_VERSION, "method": "get_provider_fw_rules",
                                  "args": {"host": "hv-burst", "since_generation": None}},
                                 routing_key=rpc.CONDUCTOR_ROUTING_KEY, reply_to=reply_queue.name,
                                 correlation_id=correlation_id)
            deadline = time.monotonic() + 30
            while len(replies) < len(sent) and time.monotonic() < deadline:
                with contextlib.suppress(socket.timeout):
                    conn.drain_events(timeout=0.5)
    assert len(replies) == len(sent)
    assert {rpc.decode_reply(m.body)["kind"] for m in replies.values()} == {"snapshot"}


def test_without_a_conductor_a_request_fails_with_a_clear_error_in_bounded_time(conf, rabbit):
    conf.set_override("call_timeout", 0.5, group="conductor")
    conf.set_override("call_retries", 1, group="conductor")
    with rpc.connection(conf) as conn:                     # the exchange exists, nobody consumes
        rpc.conductor_exchange(conf)(conn.channel()).declare()
    client = conductor_api.ConductorAPI(conf, "hv-alone")
    started = time.monotonic()
    try:
        with pytest.raises(exception.ConductorUnavailable) as info:
            client.get_provider_fw_rules(None)
    finally:
        client.close()
    assert time.monotonic() - started < 5
    assert rpc.conductor_exchange(conf).name in str(info.value) and "provfw-conductor" in str(info.value)


def test_a_worker_waiting_for_a_conductor_that_is_down_stops_within_seconds(conf, rabbit):
    # Found stopping an all-in-one whose conductor had gone: SIGTERM waited for every retry of the
    # start-up call (3 x 10 s) before the worker exited.  close() now ends the call in progress.
    conf.set_override("call_timeout", 10.0, group="conductor")
    conf.set_override("call_retries", 2, group="conductor")
    with rpc.connection(conf) as conn:                     # the exchange exists, nobody consumes
        rpc.conductor_exchange(conf)(conn.channel()).declare()
    worker = make_worker(conf, "hv-stopping")
    worker.start()
    time.sleep(1.0)                                        # inside its first get_provider_fw_rules call
    assert not worker.started.is_set()
    stopping = time.monotonic()
    worker.stop()
    assert time.monotonic() - stopping < 4
    assert not any(thread.is_alive() for thread in worker._threads)
    with pytest.raises(exception.RpcClientClosed, match="closed"):
        worker.manager.conductor.get_provider_fw_rules(None)
    assert worker.manager.sync() is None and "closed" not in (worker.manager.last_error or "")


def test_handler_that_raises_does_not_kill_the_consumer(conf, rabbit, consumers):
    handled = []

    def handler(method, args):
        handled.append(args["generation"])
        if args["generation"] == 1:
            raise RuntimeError("the kernel refused")

    consumer = consumers(handler, "hv-flaky")
    publisher = rpc.FanoutPublisher(conf)
    try:
        publisher.cast("trigger_provider_fw_rules", generation=1)
        publisher.cast("trigger_provider_fw_rules", generation=2)
        assert wait_until(lambda: handled == [1, 2], 10) is not None, handled
        assert consumer.thread.is_alive()
    finally:
        publisher.close()


def test_malformed_casts_are_dropped_and_the_consumer_goes_on(conf, rabbit, consumers):
    handled = []
    consumers(lambda method, args: handled.append((method, args)), "hv-strict")
    with rpc.connection(conf) as conn:
        producer = conn.Producer(serializer="json")
        exchange = rpc.fanout_exchange(conf)
        for body in ({"method": 42, "args": {}}, {"method": "x", "args": ["not", "a", "dict"]}, ["junk"]):
            producer.publish(body, exchange=exchange, routing_key="")
        producer.publish(b"\xff\xfe not json", exchange=exchange, routing_key="", content_type="application/json",
                         content_encoding="binary")
    publisher = rpc.FanoutPublisher(conf)
    try:
        publisher.cast("trigger_provider_fw_rules", generation=7)
        assert wait_until(lambda: handled == [("trigger_provider_fw_rules", {"generation": 7})], 10) is not None, \
            handled
    finally:
        publisher.close()


@pytest.mark.parametrize("how", ["close the kombu connection", "broker drops the socket"])
def test_publisher_survives_a_dropped_connection(conf, rabbit, consumers, how):
    handled = []
    consumers(lambda method, args: handled.append(args["generation"]), "hv-pub")
    publisher = rpc.FanoutPublisher(conf)
    try:
        publisher.cast("trigger_provider_fw_rules", generation=1)
        first_connection = publisher._conn
        if how == "close the kombu connection":
            first_connection.close()
        else:
            first_connection.connection.sock.shutdown(socket.SHUT_RDWR)
        publisher.cast("trigger_provider_fw_rules", generation=2)
        assert publisher._conn is not first_connection                # it really reconnected
        assert wait_until(lambda: handled == [1, 2], 10) is not None, handled
    finally:
        publisher.close()


def test_a_cast_after_a_quiet_spell_opens_a_new_connection_instead_of_failing_on_the_old_one(
        conf, rabbit, consumers, caplog):
    handled = []
    consumers(lambda method, args: handled.append(args["generation"]), "hv-quiet")
    publisher = rpc.FanoutPublisher(conf)
    publisher.IDLE_REOPEN = 0.2
    try:
        publisher.cast("trigger_provider_fw_rules", generation=1)
        idle_connection = publisher._conn
        # What the broker does to a connection that sent no heartbeat for two intervals.
        idle_connection.connection.sock.shutdown(socket.SHUT_RDWR)
        time.sleep(0.3)
        with caplog.at_level("WARNING", logger="provfw"):
            publisher.cast("trigger_provider_fw_rules", generation=2)
        assert publisher._conn is not idle_connection
        assert not [r for r in caplog.records if "failed" in r.getMessage()], "no publish on the dead connection"
        assert wait_until(lambda: handled == [1, 2], 10) is not None, handled
    finally:
        publisher.close()


def test_with_several_brokers_in_the_url_casts_arrive_although_the_first_is_down(conf, rabbit, consumers):
    """oslo.messaging's multi-host form, as kolla-ansible writes it: the unreachable first broker is skipped."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    with TcpProxy("127.0.0.1", 5672) as proxy:
        live = proxy.port
        conf.set_override("transport_url", f"rabbit://guest:guest@127.0.0.1:{dead},guest:guest@127.0.0.1:{live}//")
        handled = []
        consumers(lambda method, args: handled.append(args["generation"]), "hv-ha")
        publisher = rpc.FanoutPublisher(conf)
        try:
            publisher.cast("trigger_provider_fw_rules", generation=11)
            assert wait_until(lambda: handled == [11], 10) is not None, handled
        finally:
            publisher.close()
        assert proxy.accepted >= 2          # both sides went through the second broker


def test_unreachable_broker_degrades_to_a_false_return(conf):
    conf.set_override("transport_url", "rabbit://guest:guest@127.0.0.1:1//")   # nothing listens on port 1
    api = compute_api.ComputeAPI(conf, publisher=rpc.FanoutPublisher(conf, max_retries=1))
    # The change is already committed; the API must not fail the request over a lost hint.
    assert api.trigger_provider_fw_rules_refresh(generation=5) is False


def test_each_worker_gets_its_own_queue_that_dies_with_it(conf, rabbit, consumers):
    a = consumers(lambda *_: None, "hv-q")
    b = consumers(lambda *_: None, "hv-q")        # same host name: still two queues
    assert a.consumer.queue_name != b.consumer.queue_name
    a.stop()
    b.stop()
    consumers_left = []
    with rpc.connection(conf) as conn:
        channel = conn.channel()
        for name in (a.consumer.queue_name, b.consumer.queue_name):
            with pytest.raises(conn.channel_errors):       # 404 NOT_FOUND: auto-deleted with its consumer
                kombu.Queue(name, channel=channel).queue_declare(passive=True)
            channel = conn.channel()                        # a 404 closes the channel
    assert not consumers_left


# --------------------------------------------------------------------------- memory:// (provfw-all-in-one)

def test_memory_bus_fans_out_within_the_process(conf, memory_bus, consumers):
    got: dict[str, list] = {"a": [], "b": []}
    for host in got:
        consumers(lambda method, args, host=host: got[host].append(args), host)
    publisher = rpc.FanoutPublisher(conf)
    try:
        publisher.cast("trigger_provider_fw_rules", generation=3)
        assert wait_until(lambda: got == {"a": [{"generation": 3}], "b": [{"generation": 3}]}, 10) is not None, got
    finally:
        publisher.close()


def test_all_in_one_worker_applies_casts_over_the_memory_bus(conf, memory_bus, sqlite_db, conductor, workers):
    conductor()
    worker = workers.start("hv-aio")
    rule, generation = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    assert compute_api.ComputeAPI(conf).notify(Changes(generation - 1, generation, [db.rule_of(rule)], []))
    assert wait_until(lambda: worker.manager.applied_generation == generation, 10) is not None
    assert worker.manager.casts == [generation]
    assert wait_until(lambda: reported(["hv-aio"]) == [generation], 10) is not None


def test_after_a_failed_cast_the_next_ones_fail_fast_instead_of_stalling_the_api(conf):
    """A dead broker must not cost every API mutation seconds of retries; workers converge periodically."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    api = compute_api.ComputeAPI(conf, rpc.FanoutPublisher(conf, url=f"rabbit://guest:guest@127.0.0.1:{closed_port}//"))
    assert api.trigger_provider_fw_rules_refresh(generation=1) is False
    started = time.monotonic()
    for generation in range(2, 12):
        assert api.trigger_provider_fw_rules_refresh(generation=generation) is False
    assert time.monotonic() - started < 0.5
