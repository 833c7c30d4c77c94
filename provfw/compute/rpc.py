"""Messaging between provfw-api and the compute workers (kombu).

Design
------
* All exchanges and queues are declared here.  Casts to every worker go to
  the fanout exchange ``<control_exchange>_compute_fanout``; each worker
  consumes from its own exclusive, auto-delete queue bound to it (the shape of
  kombu's ``Broadcast`` and of oslo.messaging's fanout).
* A cast is a hint and at most once: messages are not persistent and queues
  die with their consumer.  Workers recover anything they missed from the
  database (start-up sync and periodic generation check).
* The transport is chosen by URL: ``rabbit://`` (AMQP 0-9-1, RabbitMQ) for
  real deployments, ``memory://`` for the all-in-one process.
* Lost connections are retried with exponential backoff on both sides; an
  exception raised by a handler is logged and never kills the consumer.

Thread-safety: ``FanoutPublisher.cast`` may be called from any thread (it
serialises on a lock); a ``FanoutConsumer`` runs in one thread/greenthread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Callable

import kombu
import kombu.exceptions
from oslo_config import cfg

from provfw import conf as provfw_conf

LOG = logging.getLogger(__name__)

COMPUTE_TOPIC = "compute"
MESSAGE_VERSION = 1


def fanout_exchange(conf: cfg.ConfigOpts = provfw_conf.CONF, topic: str = COMPUTE_TOPIC) -> kombu.Exchange:
    return kombu.Exchange(f"{conf.control_exchange}_{topic}_fanout", type="fanout", durable=False,
                          auto_delete=False)


def kombu_url(url: str) -> str:
    """Accept oslo.messaging's ``rabbit://`` scheme as well as kombu's own (amqp://, pyamqp://, memory://)."""
    if url.startswith("rabbit://"):
        return "pyamqp://" + url[len("rabbit://"):]
    return url


def _connection(url: str) -> kombu.Connection:
    url = kombu_url(url)
    # heartbeat lets a worker notice a dead broker even when no cast arrives.
    heartbeat = 0 if url.startswith("memory") else 30
    if url.startswith("memory"):
        # The in-process transport polls; its default 1 s interval would add up to a second to every cast.
        options = {"polling_interval": 0.01}
    elif url.startswith(("amqp", "pyamqp")):
        options = {"confirm_publish": True}
    else:
        options = {}
    return kombu.Connection(url, heartbeat=heartbeat, connect_timeout=2, transport_options=options)


def bus_errors(url: str) -> tuple:
    """The exceptions that mean "the bus is unreachable" for ``url``'s transport (no connect)."""
    probe = kombu.Connection(kombu_url(url))
    # ensure_connection() re-raises a refused connect as kombu's OperationalError, which is not an
    # OSError: without it here a broker that stays down past one retry kills the consumer thread.
    return (OSError, kombu.exceptions.OperationalError, *probe.connection_errors, *probe.channel_errors)


class FanoutPublisher:
    """Publishes casts to every compute worker."""

    # After a cast has failed every retry, further casts fail at once for this
    # long: an API request must not spend seconds per mutation on a dead
    # broker when the workers' periodic check delivers the change anyway.
    BUS_DOWN_HOLD = 5.0

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, url: str | None = None,
                 topic: str = COMPUTE_TOPIC, max_retries: int = 2):
        self.url = url or conf.transport_url
        self.exchange = fanout_exchange(conf, topic)
        self.max_retries = max_retries
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._conn: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._errors = bus_errors(self.url)

    def _ensure_producer(self) -> kombu.Producer:
        if self._producer is None:
            self._conn = _connection(self.url)
            self._producer = kombu.Producer(self._conn.channel(), exchange=self.exchange, serializer="json")
            self.exchange(self._producer.channel).declare()
        return self._producer

    def _reset(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
        self._conn = self._producer = None

    def cast(self, method: str, **args) -> str:
        """Send ``method(**args)`` to every worker; return the message id.

        Retries with backoff; raises the last connection error when the broker
        stays unreachable (the caller decides whether that fails the request).
        """
        message = {"version": MESSAGE_VERSION, "method": method, "args": args,
                   "msg_id": uuid.uuid4().hex, "sent_at": time.time()}
        delay = 0.2
        with self._lock:
            if time.monotonic() < self._down_until:
                raise ConnectionError(f"message bus marked unreachable for another "
                                      f"{self._down_until - time.monotonic():.1f}s after failed casts")
            for attempt in range(self.max_retries + 1):
                try:
                    producer = self._ensure_producer()
                    producer.publish(message, routing_key="", declare=[self.exchange], retry=False)
                    LOG.debug("cast %s%s to %s", method, args, self.exchange.name)
                    return message["msg_id"]
                except self._errors as exc:
                    self._reset()
                    if attempt == self.max_retries:
                        self._down_until = time.monotonic() + self.BUS_DOWN_HOLD
                        raise
                    LOG.warning("cast %s failed (%s); retrying in %.1fs", method, exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._reset()


class FanoutConsumer:
    """Consumes casts for one worker and hands them to ``handler(method, args)``."""

    def __init__(self, handler: Callable[[str, dict], None], host: str,
                 conf: cfg.ConfigOpts = provfw_conf.CONF, url: str | None = None, topic: str = COMPUTE_TOPIC):
        self.handler = handler
        self.host = host
        self.url = url or conf.transport_url
        self.exchange = fanout_exchange(conf, topic)
        self.queue_name = f"{self.exchange.name}.{host}.{uuid.uuid4().hex[:12]}"
        self.connected = threading.Event()
        self._stop = threading.Event()
        self.on_connect: Callable[[], None] | None = None

    def _queue(self) -> kombu.Queue:
        return kombu.Queue(self.queue_name, exchange=self.exchange, routing_key="", exclusive=True,
                           auto_delete=True, durable=False)

    def _on_message(self, body, message) -> None:
        try:
            method = body.get("method")
            args = body.get("args") or {}
            if not isinstance(method, str) or not isinstance(args, dict):
                LOG.error("dropping malformed cast: %r", body)
                return
            self.handler(method, args)
        except Exception:  # noqa: BLE001 - a handler error must never kill the consumer
            LOG.exception("handler for cast %r failed", body)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Consume until ``stop()``; reconnect with backoff whenever the broker goes away."""
        delay = 0.5
        while not self._stop.is_set():
            conn = _connection(self.url)
            try:
                conn.ensure_connection(max_retries=1)
                with conn.Consumer([self._queue()], callbacks=[self._on_message], no_ack=True,
                                   accept=["json"]):
                    LOG.info("consuming casts on %s (queue %s)", self.exchange.name, self.queue_name)
                    self.connected.set()
                    delay = 0.5
                    if self.on_connect is not None:
                        # Anything cast while we were disconnected is lost: resync.
                        self._safe(self.on_connect)
                    while not self._stop.is_set():
                        try:
                            conn.drain_events(timeout=0.25)
                        except socket.timeout:
                            conn.heartbeat_check()
            except Exception as exc:  # noqa: BLE001 - the consumer must outlive anything the bus throws
                self.connected.clear()
                if self._stop.is_set():
                    break
                if isinstance(exc, bus_errors(self.url)):
                    LOG.warning("message bus unreachable (%s); reconnecting in %.1fs", exc, delay)
                else:
                    LOG.exception("consumer failed unexpectedly; reconnecting in %.1fs", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
            finally:
                self.connected.clear()
                try:
                    conn.release()
                except Exception:  # noqa: BLE001
                    pass

    @staticmethod
    def _safe(func: Callable[[], None]) -> None:
        try:
            func()
        except Exception:  # noqa: BLE001
            LOG.exception("on_connect callback failed")
