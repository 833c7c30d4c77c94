"""Least privilege on the real RabbitMQ: what a hypervisor's bus credentials can and cannot do.

Each test module gets its own vhost; the control (API/conductor) user and one
compute user per hypervisor are created with ``provfw-manage bus
create-user``, exactly as docs/deployment.md tells operators to.  The
conductor and the workers run in this process with those credentials.
"""

from __future__ import annotations

import logging

import kombu
import pytest

from provfw import rpc
from provfw.compute import service as compute_service
from provfw.compute import manager as compute_manager
from provfw.db import api as db
from provfw.rules import make_spec
from provfw.virt.firewall.base import NoopFirewallDriver
from provfw.virt.libvirt_conn import LibvirtConnection
from tests.lib import bus as bus_lib
from tests.lib.bus import ConductorThread, RabbitVhost
from tests.lib.netns import wait_until

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def vhost():
    with RabbitVhost() as created:
        control_user, control_url = created.create_user("control")
        hv1_user, hv1_url = created.create_user("compute", host="hv1")
        hv2_user, hv2_url = created.create_user("compute", host="hv2")
        created.urls = {"control": control_url, "hv1": hv1_url, "hv2": hv2_url}
        created.user_names = {"control": control_user, "hv1": hv1_user, "hv2": hv2_user}
        yield created


@pytest.fixture
def deployment(conf, vhost, sqlite_db):
    """A conductor on the control user (no trust for unverified hosts: the production default)."""
    conf.set_override("transport_url", vhost.urls["control"])
    conf.set_override("report_flush_interval", 0.1, group="conductor")
    conf.set_override("call_timeout", 3.0, group="conductor")
    conf.set_override("reconcile_interval", 3600, group="compute")
    conf.set_override("heartbeat_interval", 3600, group="compute")
    conductor = ConductorThread(conf)
    yield conductor
    conductor.stop()


def compute_connection(conf, vhost, host: str) -> kombu.Connection:
    conn = rpc.connection(conf, vhost.urls[host])
    conn.ensure_connection(max_retries=1)
    return conn


def database_state() -> tuple:
    rules = [(r.id, r.cidr, r.deleted) for r in db.provider_fw_rule_get_all()]
    tokens = [(t.name, t.revoked_at) for t in db.api_token_get_all()]
    return db.provider_fw_generation_get(), rules, tokens, len(db.audit_get_all(1000))


def test_a_compute_user_cannot_publish_a_cast_to_every_host(conf, vhost, deployment):
    with compute_connection(conf, vhost, "hv1") as conn:
        producer = kombu.Producer(conn.channel(), exchange=rpc.fanout_exchange(conf, passive=True),
                                  auto_declare=False, serializer="json")
        with pytest.raises(conn.channel_errors) as info:
            producer.publish({"method": "trigger_provider_fw_rules", "args": {"generation": 99,
                                                                              "previous_generation": 98,
                                                                              "added": [], "removed": []}},
                             routing_key="", retry=False)
    assert "ACCESS_REFUSED" in str(info.value) and "provfw_compute_fanout" in str(info.value)


@pytest.mark.parametrize("what", ["publish into the conductor's queue by the default exchange",
                                  "publish into another host's queue by the default exchange",
                                  "declare an exchange", "bind its queue to the conductor exchange",
                                  "declare another host's queue", "publish as another bus user"])
def test_a_compute_user_is_refused_everything_but_its_own_queues_and_the_conductor_exchange(
        conf, vhost, deployment, what):
    with compute_connection(conf, vhost, "hv1") as conn:
        channel = conn.channel()
        with pytest.raises(conn.channel_errors):
            if what.startswith("publish into"):
                target = (rpc.conductor_queue(conf).name if "conductor" in what
                          else rpc.worker_queue_name(conf, "hv2"))
                kombu.Producer(channel, auto_declare=False, serializer="json").publish(
                    {"method": "trigger_provider_fw_rules", "args": {}}, exchange="", routing_key=target,
                    retry=False)
            elif what == "declare an exchange":
                kombu.Exchange("provfw_compute_fanout_shadow", type="fanout")(channel).declare()
            elif what == "bind its queue to the conductor exchange":
                kombu.Queue(rpc.worker_queue_name(conf, "hv1"), exchange=rpc.conductor_exchange(conf, passive=True),
                            routing_key=rpc.CONDUCTOR_ROUTING_KEY, exclusive=True)(channel).declare()
            elif what == "declare another host's queue":
                kombu.Queue(rpc.worker_queue_name(conf, "hv2"), exchange=rpc.fanout_exchange(conf, passive=True),
                            routing_key="", exclusive=True)(channel).declare()
            else:
                kombu.Producer(channel, exchange=rpc.conductor_exchange(conf, passive=True), auto_declare=False,
                               serializer="json").publish(
                    {"method": "report_provider_fw_state", "args": {"host": "hv2"}},
                    routing_key=rpc.CONDUCTOR_ROUTING_KEY, user_id=vhost.user_names["hv2"], retry=False)


def test_a_state_report_claiming_another_host_is_rejected_and_logged(conf, vhost, deployment, caplog):
    client = rpc.RpcClient("hv1", conf, url=vhost.urls["hv1"])
    state = {"applied_generation": 5, "rule_count": 1, "driver": "libvirt/ipset", "last_error": None,
             "quarantine": [], "applied_at": None}
    try:
        with caplog.at_level(logging.WARNING, logger="provfw.conductor.manager"):
            client.cast("report_provider_fw_state", host="hv2", **state)     # hv1's credentials, hv2's name
            client.cast("report_provider_fw_state", host="hv1", **state)
            assert wait_until(lambda: db.service_get("hv1") is not None, 10) is not None
    finally:
        client.close()
    assert db.service_get("hv2") is None
    assert db.service_get("hv1").bus_user == vhost.user_names["hv1"]
    assert any("claiming host 'hv2'" in r.getMessage() and vhost.user_names["hv1"] in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert deployment.stats["rejected_reports"] >= 1


def test_a_report_from_a_bus_user_that_is_not_a_compute_user_is_rejected(conf, vhost, deployment, caplog):
    client = rpc.RpcClient("hv9", conf, url=vhost.urls["control"])
    try:
        with caplog.at_level(logging.WARNING, logger="provfw.conductor.manager"):
            client.cast("report_provider_fw_state", host="hv9", applied_generation=1, rule_count=0)
            assert wait_until(lambda: deployment.stats["rejected_reports"] >= 1, 10) is not None
    finally:
        client.close()
    assert db.service_get("hv9") is None
    assert any("not a compute user" in r.getMessage() for r in caplog.records)


def test_nothing_a_compute_user_sends_changes_a_rule_a_token_or_the_audit(conf, vhost, deployment):
    rule, _ = db.provider_fw_rule_create(make_spec("203.0.113.9"))
    db.api_token_create("alice", "admin")
    before = database_state()
    client = rpc.RpcClient("hv1", conf, url=vhost.urls["hv1"])
    attempts = [
        ("provider_fw_rule_destroy", {"rule_id": rule.id}),
        ("provider_fw_rule_create", {"cidr": "0.0.0.0/1"}),
        ("provider_fw_rules_create_many", {"specs": [["198.51.100.0/24", "all", -1, -1]]}),
        ("provider_fw_rule_purge_expired", {}),
        ("api_token_create", {"name": "mallory", "role": "admin"}),
        ("api_token_revoke", {"name": "alice"}),
        ("audit_get_all", {}),
        ("service_destroy", {"host": "hv2"}),
        ("get_provider_fw_rules", {"host": "hv1", "since_generation": "0; DROP TABLE provider_fw_rules"}),
        ("report_provider_fw_state", {"host": "hv1", "applied_generation": "x", "rule_count": -5}),
        ("__init__", {}),
        ("handle", {}),
    ]
    try:
        for method, args in attempts:
            try:
                client.call(method, **args)
            except Exception:  # noqa: BLE001 - casts time out, errors are fine; only the database matters
                pass
            client.cast(method, **args)
    finally:
        client.close()
    assert wait_until(lambda: deployment.stats["rejected"] >= 2 * 10, 10) is not None, deployment.stats
    assert database_state() == before


def test_a_worker_on_its_own_bus_user_converges_and_reports_under_that_identity(conf, vhost, deployment):
    _, generation = db.provider_fw_rule_create(make_spec("198.51.100.77"))
    conf.set_override("transport_url", vhost.urls["hv2"])
    manager = compute_manager.ComputeManager(conf, LibvirtConnection(conf, firewall_driver=NoopFirewallDriver(conf)),
                                             host="hv2")
    worker = compute_service.ComputeService(conf, manager)
    worker.start()
    try:
        assert worker.started.wait(15) and worker.consumer.connected.wait(15)
        assert manager.applied_generation == generation
        assert wait_until(lambda: getattr(db.service_get("hv2"), "applied_generation", None) == generation,
                          10) is not None
        row = db.service_get("hv2")
        assert (row.rule_count, row.bus_user, row.last_error) == (1, vhost.user_names["hv2"], None)
    finally:
        worker.stop()


def test_the_conductor_acknowledges_requests_but_not_the_reports_it_is_cast(conf, vhost, deployment):
    """Requests wait in their queue until a conductor is free (acknowledged, a few at a time); state reports,
    whole states repeated by the next one, are delivered without acknowledgements - and a compute user's
    report goes to that queue and is written."""
    listed = bus_lib.rabbitmqctl("list_consumers", "-q", "--no-table-headers", "-p", vhost.name,
                                 "queue_name", "ack_required", "prefetch_count").stdout
    consumers = {name: (ack, prefetch) for name, ack, prefetch in (line.split("\t") for line in listed.splitlines())}
    assert consumers[rpc.conductor_queue(conf).name] == ("true", str(rpc.RpcServer.prefetch))
    assert consumers[rpc.conductor_cast_queue(conf).name][0] == "false"
    client = rpc.RpcClient("hv1", conf, url=vhost.urls["hv1"])
    try:
        client.cast("report_provider_fw_state", host="hv1", applied_generation=3, rule_count=0)
        assert wait_until(lambda: db.service_get("hv1") is not None, 10) is not None
    finally:
        client.close()
    assert db.service_get("hv1").applied_generation == 3


def test_a_custom_compute_user_prefix_names_the_users_and_decides_which_host_a_report_speaks_for(
        conf, sqlite_db, caplog):
    """``[conductor] compute_user_prefix``, set for provfw-manage and the conductor alike: the user it names
    reports for its host; a user named with the default prefix is no compute user to this conductor."""
    with RabbitVhost(compute_user_prefix="acme-hv-") as vhost:
        _, control_url = vhost.create_user("control")
        named, hv5_url = vhost.create_user("compute", host="hv5")
        _, hv6_url = vhost.create_user("compute", host="hv6", user="provfw-compute-hv6")
        assert named == "acme-hv-hv5"
        conf.set_override("compute_user_prefix", "acme-hv-", group="conductor")
        conf.set_override("transport_url", control_url)
        conf.set_override("report_flush_interval", 0.1, group="conductor")
        conductor = ConductorThread(conf)
        try:
            with caplog.at_level(logging.WARNING, logger="provfw.conductor.manager"):
                for host, url in (("hv5", hv5_url), ("hv6", hv6_url)):
                    client = rpc.RpcClient(host, conf, url=url)
                    try:
                        client.cast("report_provider_fw_state", host=host, applied_generation=1, rule_count=0)
                    finally:
                        client.close()
                assert wait_until(lambda: db.service_get("hv5") is not None
                                  and conductor.stats["rejected_reports"] >= 1, 10) is not None
        finally:
            conductor.stop()
    assert db.service_get("hv5").bus_user == "acme-hv-hv5"
    assert db.service_get("hv6") is None
    assert any("'provfw-compute-hv6', which is not a compute user (acme-hv-<host>)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
