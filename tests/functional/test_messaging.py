"""Fanout casts over a real RabbitMQ (127.0.0.1:5672) and over the in-process memory:// bus.

Every test uses its own control_exchange, so concurrent runs never see each
other's casts, and deletes its exchange afterwards.  Workers are real
ComputeService instances (consumer, periodic loops) with the noop firewall
driver over a real database.
"""

from __future__ import annotations

import socket
import threading
import uuid

import kombu
import pytest

from provfw.compute import api as compute_api
from provfw.compute import manager as compute_manager
from provfw.compute import rpc
from provfw.compute import service as compute_service
from provfw.db import api as db
from provfw.rules import make_spec
from provfw.virt import firewall
from provfw.virt.libvirt_conn import LibvirtConnection
from tests.lib import services
from tests.lib.netns import wait_until

pytestmark = pytest.mark.functional


def use_bus(conf, url: str) -> str:
    """Point ``conf`` at ``url`` with an exchange prefix of its own; return the prefix."""
    prefix = f"provfw_test_{uuid.uuid4().hex[:10]}"
    conf.set_override("transport_url", url)
    conf.set_override("control_exchange", prefix)
    # Only casts and the start-up sync may apply anything during a test.
    conf.set_override("reconcile_interval", 3600, group="compute")
    conf.set_override("heartbeat_interval", 3600, group="compute")
    return prefix


@pytest.fixture
def rabbit(conf):
    url = services.require_rabbitmq()
    use_bus(conf, url)
    yield url
    with kombu.Connection(rpc.kombu_url(url), connect_timeout=5) as conn:
        rpc.fanout_exchange(conf)(conn.channel()).delete()


@pytest.fixture
def memory_bus(conf):
    use_bus(conf, "memory://")
    return "memory://"


class RecordingManager(compute_manager.ComputeManager):
    """A real ComputeManager that also remembers which casts reached it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.casts: list = []

    def trigger_provider_fw_rules(self, generation=None):
        self.casts.append(generation)
        return super().trigger_provider_fw_rules(generation)


def make_worker(conf, host: str) -> compute_service.ComputeService:
    connection = LibvirtConnection(conf, firewall_driver=firewall.NoopFirewallDriver(conf))
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
def consumers():
    started: list[ConsumerThread] = []
    yield started
    for consumer in started:
        consumer.stop()


# --------------------------------------------------------------------------- RabbitMQ

def test_one_cast_reaches_three_workers(conf, rabbit, pg_db, workers):
    hosts = [f"hv-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    started = [workers.start(host) for host in hosts]
    _, generation = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    assert all(w.manager.applied_generation == generation - 1 for w in started)   # nothing applied it yet

    assert compute_api.ComputeAPI(conf).trigger_provider_fw_rules_refresh() is True

    def reported():
        return [db.service_get(w.manager.host).applied_generation for w in started]

    assert wait_until(lambda: reported() == [generation] * 3, 10) is not None, reported()
    for worker in started:
        assert worker.manager.casts == [generation]
        assert worker.manager.applied_generation == generation


def test_worker_started_after_the_cast_converges_through_its_start_up_sync(conf, rabbit, sqlite_db, workers):
    db.provider_fw_rule_create(make_spec("203.0.113.5"))
    _, generation = db.provider_fw_rule_create(make_spec("198.51.100.0/24", "tcp", 8080))
    assert compute_api.ComputeAPI(conf).trigger_provider_fw_rules_refresh() is True   # nobody listens: lost

    worker = workers.start("hv-late")
    assert worker.manager.applied_generation == generation
    assert worker.manager.casts == []
    row = db.service_get("hv-late")
    assert (row.applied_generation, row.rule_count) == (generation, 2)


def test_handler_that_raises_does_not_kill_the_consumer(conf, rabbit, consumers):
    handled = []

    def handler(method, args):
        handled.append(args["generation"])
        if args["generation"] == 1:
            raise RuntimeError("the database is down")

    consumers.append(ConsumerThread(conf, handler, "hv-flaky"))
    publisher = rpc.FanoutPublisher(conf)
    try:
        publisher.cast("trigger_provider_fw_rules", generation=1)
        publisher.cast("trigger_provider_fw_rules", generation=2)
        assert wait_until(lambda: handled == [1, 2], 10) is not None, handled
        assert consumers[0].thread.is_alive()
    finally:
        publisher.close()


def test_malformed_casts_are_dropped_and_the_consumer_goes_on(conf, rabbit, consumers):
    handled = []
    consumers.append(ConsumerThread(conf, lambda method, args: handled.append((method, args)), "hv-strict"))
    with kombu.Connection(rpc.kombu_url(rabbit), connect_timeout=5) as conn:
        producer = conn.Producer(serializer="json")
        exchange = rpc.fanout_exchange(conf)
        for body in ({"method": 42, "args": {}}, {"method": "x", "args": ["not", "a", "dict"]}, ["junk"]):
            producer.publish(body, exchange=exchange, routing_key="")
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
    consumers.append(ConsumerThread(conf, lambda method, args: handled.append(args["generation"]), "hv-pub"))
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


def test_unreachable_broker_degrades_to_a_false_return(conf):
    conf.set_override("transport_url", "rabbit://guest:guest@127.0.0.1:1//")   # nothing listens on port 1
    api = compute_api.ComputeAPI(conf, publisher=rpc.FanoutPublisher(conf, max_retries=1))
    # The change is already committed; the API must not fail the request over a lost hint.
    assert api.trigger_provider_fw_rules_refresh(generation=5) is False


def test_each_worker_gets_its_own_queue_that_dies_with_it(conf, rabbit):
    a = ConsumerThread(conf, lambda *_: None, "hv-q")
    b = ConsumerThread(conf, lambda *_: None, "hv-q")        # same host name: still two queues
    assert a.consumer.queue_name != b.consumer.queue_name
    a.stop()
    b.stop()
    with kombu.Connection(rpc.kombu_url(rabbit), connect_timeout=5) as conn:
        channel = conn.channel()
        for name in (a.consumer.queue_name, b.consumer.queue_name):
            with pytest.raises(conn.channel_errors):       # 404 NOT_FOUND: auto-deleted with its consumer
                kombu.Queue(name, channel=channel).queue_declare(passive=True)
            channel = conn.channel()                        # a 404 closes the channel


# --------------------------------------------------------------------------- memory:// (provfw-all-in-one)

def test_memory_bus_fans_out_within_the_process(conf, memory_bus, consumers):
    got: dict[str, list] = {"a": [], "b": []}
    for host in got:
        consumers.append(ConsumerThread(conf, lambda method, args, host=host: got[host].append(args), host))
    publisher = rpc.FanoutPublisher(conf)
    try:
        publisher.cast("trigger_provider_fw_rules", generation=3)
        assert wait_until(lambda: got == {"a": [{"generation": 3}], "b": [{"generation": 3}]}, 10) is not None, got
    finally:
        publisher.close()


def test_all_in_one_worker_applies_casts_over_the_memory_bus(conf, memory_bus, sqlite_db, workers):
    worker = workers.start("hv-aio")
    _, generation = db.provider_fw_rule_create(make_spec("203.0.113.5"))
    assert compute_api.ComputeAPI(conf).trigger_provider_fw_rules_refresh() is True
    assert wait_until(lambda: worker.manager.applied_generation == generation, 10) is not None
    assert worker.manager.casts == [generation]


def test_after_a_failed_cast_the_next_ones_fail_fast_instead_of_stalling_the_api(conf):
    """A dead broker must not cost every API mutation seconds of retries; workers converge periodically."""
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    api = compute_api.ComputeAPI(conf, rpc.FanoutPublisher(conf, url=f"rabbit://guest:guest@127.0.0.1:{closed_port}//"))
    assert api.trigger_provider_fw_rules_refresh(generation=1) is False
    started = time.monotonic()
    for generation in range(2, 12):
        assert api.trigger_provider_fw_rules_refresh(generation=generation) is False
    assert time.monotonic() - started < 0.5
