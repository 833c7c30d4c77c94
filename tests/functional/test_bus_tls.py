"""The bus over TLS: ``[oslo_messaging_rabbit] ssl*`` against a real RabbitMQ behind a TLS listener.

Every broker here is ``tests.lib.tlsbroker.TlsBroker`` (socat terminating TLS in front of the shared
RabbitMQ) with certificates made by ``openssl`` for this module; the client side is provfw's own
(``provfw.rpc``: kombu, py-amqp, Python's ``ssl``).  Each test refuses or accepts for one reason, which the
error message names.  The two brokers of the failover test are 127.0.0.1 and 127.0.0.2, each with a
certificate for its own address only, so a certificate checked against the wrong broker's name fails.
"""

from __future__ import annotations

import ssl

import pytest

from provfw import rpc
from tests.functional.test_messaging import consumers, rabbit  # noqa: F401 - fixtures
from tests.lib import services
from tests.lib.netns import wait_until
from tests.lib.tlsbroker import Certificates, TlsBroker

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    services.require_tools("openssl", "socat")
    directory = tmp_path_factory.mktemp("tls")
    ca = Certificates(directory / "ca")
    made = {name: ca.issue(name, alt) for name, alt in (("rabbit1", "IP:127.0.0.1"), ("rabbit2", "IP:127.0.0.2"),
                                                        ("elsewhere", "DNS:rabbit.example"), ("cmp-001", None))}
    other = Certificates(directory / "other", ca_name="another-ca")
    return {"ca": ca.ca_cert, "other_ca": other.ca_cert, **made}


@pytest.fixture
def tls(conf, rabbit, certs):  # noqa: F811 - the fixture imported above
    """Turn TLS on with the module's CA; ``tls.use(*brokers)`` points transport_url at them (oslo.messaging's
    comma-separated form).  Turned off again before ``rabbit`` deletes the test's exchanges in plain AMQP."""
    class Tls:
        def set(self, **options):
            for name, value in options.items():
                conf.set_override(name, value, group="oslo_messaging_rabbit")

        def use(self, *netlocs: str) -> None:
            conf.set_override("transport_url", f"rabbit://{','.join(netlocs)}//")

    conf.set_override("ssl", True, group="oslo_messaging_rabbit")
    conf.set_override("ssl_ca_file", str(certs["ca"]), group="oslo_messaging_rabbit")
    yield Tls()
    for name in ("ssl", "ssl_ca_file", "ssl_cert_file", "ssl_key_file", "ssl_check_hostname"):
        conf.clear_override(name, group="oslo_messaging_rabbit")
    conf.clear_override("transport_url")
    conf.set_override("transport_url", rabbit)


def cast_arrives(conf, consumers, host: str, generation: int) -> rpc.FanoutPublisher:  # noqa: F811
    """A worker's consumer and the API's publisher, both through ``transport_url``: the cast must arrive."""
    handled = []
    consumers(lambda method, args: handled.append(args["generation"]), host)
    publisher = rpc.FanoutPublisher(conf, max_retries=2)
    publisher.cast("trigger_provider_fw_rules", generation=generation)
    assert wait_until(lambda: handled == [generation], 10) is not None, handled
    return publisher


def refused(conf) -> str:
    """What a cast through ``transport_url`` fails with (no retries)."""
    publisher = rpc.FanoutPublisher(conf, max_retries=0)
    try:
        with pytest.raises(publisher._errors) as failure:
            publisher.cast("trigger_provider_fw_rules", generation=1)
    finally:
        publisher.close()
    return str(failure.value)


def test_casts_arrive_over_tls_and_the_connection_is_tls_to_the_named_broker(conf, tls, certs, consumers):  # noqa: F811
    with TlsBroker(*certs["rabbit1"], host="127.0.0.1") as broker:
        tls.use(broker.netloc())
        publisher = cast_arrives(conf, consumers, "hv-tls", 7)
        try:
            sock = publisher._conn.connection.sock
            assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
            assert ("IP Address", "127.0.0.1") in sock.getpeercert()["subjectAltName"]
        finally:
            publisher.close()


def test_a_broker_certificate_from_another_ca_is_refused(conf, tls, certs):
    with TlsBroker(*certs["rabbit1"], host="127.0.0.1") as broker:
        tls.use(broker.netloc())
        tls.set(ssl_ca_file=str(certs["other_ca"]))
        assert "certificate verify failed" in refused(conf)


def test_a_certificate_for_another_host_is_refused_unless_hostname_checks_are_off(
        conf, tls, certs, consumers):  # noqa: F811
    """The CA signed it, but for rabbit.example: anyone holding it could otherwise pose as this broker."""
    with TlsBroker(*certs["elsewhere"], host="127.0.0.1") as broker:
        tls.use(broker.netloc())
        assert "IP address mismatch" in refused(conf)
        tls.set(ssl_check_hostname=False)
        cast_arrives(conf, consumers, "hv-nocheck", 8).close()


def test_a_broker_that_demands_a_client_certificate(conf, tls, certs, consumers):  # noqa: F811
    with TlsBroker(*certs["rabbit1"], host="127.0.0.1", client_ca=certs["ca"]) as broker:
        tls.use(broker.netloc())
        # TLS 1.3 ends the client's handshake before the broker has judged its certificate: the refusal comes
        # as the broker's alert or, when it closed before the alert was read, as an EOF on the first read.
        reason = refused(conf)
        assert "certificate required" in reason or "EOF occurred in violation of protocol" in reason, reason
        cert, key = certs["cmp-001"]
        tls.set(ssl_cert_file=str(cert), ssl_key_file=str(key))
        cast_arrives(conf, consumers, "hv-client-cert", 9).close()


def test_failover_checks_each_brokers_certificate_against_its_own_name(conf, tls, certs, consumers):  # noqa: F811
    """The broker in use goes down: the worker and the API reconnect, try the first broker (refused), then the
    second, whose certificate must be checked against 127.0.0.2 - kombu would still hold 127.0.0.1
    (rpc._failover) - and casts arrive again."""
    with TlsBroker(*certs["rabbit1"], host="127.0.0.1") as first, \
            TlsBroker(*certs["rabbit2"], host="127.0.0.2") as second:
        tls.use(first.netloc(), second.netloc())
        handled = []
        consumers(lambda method, args: handled.append(args["generation"]), "hv-failover")
        publisher = rpc.FanoutPublisher(conf, max_retries=2)
        try:
            publisher.cast("trigger_provider_fw_rules", generation=1)
            assert wait_until(lambda: 1 in handled, 10) is not None, handled
            assert publisher._conn.connection.sock.getpeername()[0] == "127.0.0.1"
            first.stop()
            generations = iter(range(2, 1000))

            def a_cast_arrives() -> bool:
                # Casts sent before the worker has reconnected are lost (casts are hints): send until one lands.
                generation = next(generations)
                try:
                    publisher.cast("trigger_provider_fw_rules", generation=generation)
                except publisher._errors:
                    return False
                return wait_until(lambda: generation in handled, 0.5) is not None

            assert wait_until(a_cast_arrives, 20) is not None, handled
            assert publisher._conn.connection.sock.getpeername()[0] == "127.0.0.2"
        finally:
            publisher.close()
