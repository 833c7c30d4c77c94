"""Messaging between provfw's processes (kombu): every exchange and queue is declared here.

Design
------
Topology, with ``control_exchange = provfw`` (oslo.messaging's shapes)::

    provfw_compute_fanout        fanout   API / conductor -> every worker: trigger_provider_fw_rules casts
      provfw_compute_fanout.<host>:<hex>    one exclusive, auto-delete queue per worker process
    provfw_conductor             direct   workers -> conductors (routing key "conductor")
      provfw_conductor.requests             shared by every conductor (competing consumers)
    provfw_reply.<host>:<hex>    queue    each caller's exclusive reply queue (default exchange)

* Casts are hints and at most once: nothing is persistent, a worker's queue
  dies with it, and a worker recovers what it missed from the conductor
  (start-up sync, gap in generations, periodic check).
* Calls (``RpcClient.call``) publish a request with ``reply_to`` and
  ``correlation_id`` and wait for the answer on the caller's reply queue, with
  a timeout and retries; when no conductor answers the caller gets
  ``ConductorUnavailable`` naming the exchange.
* Identity: every message a worker publishes carries the AMQP ``user_id``
  property.  RabbitMQ refuses a message whose ``user_id`` is not the
  connection's user, so the conductor can trust it to say which bus user sent a
  report (``RpcServer`` hands it to the handler as ``Incoming.user_id``).
* Least privilege: ``compute_user_permissions`` gives a hypervisor's bus user
  exactly: declare and consume its own queues, bind them to the fanout
  exchange, publish to the conductor exchange - and nothing else (it cannot
  publish casts, read other hosts' queues, or reach the conductor's queue but
  through the conductor exchange).  Workers therefore never declare an
  exchange (they bind to it passively); the conductor declares both at start.
* A handler's exception is logged and never kills a consumer; lost
  connections are retried with ``provfw.retrying`` backoff on every side.
* Transports are chosen by URL: ``rabbit://`` (oslo.messaging's scheme, also
  comma-separated multi-host ``rabbit://u:p@h1:5672,u:p@h2:5672//``, turned into
  kombu failover alternates), kombu's own schemes, and ``memory://`` (the
  all-in-one's in-process bus).  TLS options come from ``[oslo_messaging_rabbit]``; each broker's certificate is checked
  against the host name the URL gives for it (``_failover``).

Wire format: requests and casts are JSON objects ``{"version", "method", "args",
"msg_id", "sent_at"}``; replies are zlib-compressed JSON (``REPLY_CONTENT_TYPE``) so
a conductor can cache one compressed snapshot and send it to every host.

Thread-safety: ``FanoutPublisher.cast`` and ``RpcClient`` calls may come from
any thread (each serialises on its own lock and connection); a consumer or
server runs in one thread / greenthread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import re
import socket
import threading
import time
import uuid
import zlib
from typing import Any, Callable, Iterator

import kombu
import kombu.exceptions
from oslo_config import cfg

from provfw import conf as provfw_conf
from provfw import exception
from provfw.retrying import call_retrying, retrying

LOG = logging.getLogger(__name__)

COMPUTE_TOPIC = "compute"
CONDUCTOR_ROUTING_KEY = "conductor"        # requests (a reply expected): acknowledged, a few at a time
CAST_ROUTING_KEY = "conductor.cast"        # casts to the conductors (state reports): no acknowledgements
MESSAGE_VERSION = 2
REPLY_CONTENT_TYPE = "application/x-provfw-json+zlib"
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HEARTBEAT = 30          # seconds; the broker closes a connection that stays silent for two of them


# --------------------------------------------------------------------------- names

def fanout_exchange(conf: cfg.ConfigOpts = provfw_conf.CONF, passive: bool = False) -> kombu.Exchange:
    """``<control_exchange>_compute_fanout``: casts to every worker."""
    return kombu.Exchange(f"{conf.control_exchange}_{COMPUTE_TOPIC}_fanout", type="fanout", durable=False,
                          auto_delete=False, passive=passive)


def conductor_exchange(conf: cfg.ConfigOpts = provfw_conf.CONF, passive: bool = False) -> kombu.Exchange:
    """``<control_exchange>_conductor``: requests and reports to the conductors."""
    return kombu.Exchange(f"{conf.control_exchange}_conductor", type="direct", durable=False,
                          auto_delete=False, passive=passive)


def conductor_queue(conf: cfg.ConfigOpts = provfw_conf.CONF, message_ttl: float | None = None) -> kombu.Queue:
    """The conductors' shared request queue; requests older than ``message_ttl`` seconds are dropped."""
    arguments = {"x-message-ttl": int(message_ttl * 1000)} if message_ttl else None
    return kombu.Queue(f"{conf.control_exchange}_conductor.requests", exchange=conductor_exchange(conf),
                       routing_key=CONDUCTOR_ROUTING_KEY, durable=False, auto_delete=False,
                       queue_arguments=arguments)


def conductor_cast_queue(conf: cfg.ConfigOpts = provfw_conf.CONF, message_ttl: float | None = None) -> kombu.Queue:
    """The conductors' shared queue of casts (the workers' state reports), consumed without acknowledgements.

    A report is the whole state of its host, so one lost with a conductor that stopped is repeated by the
    host's next report or heartbeat; not acknowledging saves the conductor and the broker a frame per
    report (1,000 per change in a 1,000-host fleet) and lets the broker deliver them without waiting.
    ``message_ttl`` as for ``conductor_queue``.
    """
    arguments = {"x-message-ttl": int(message_ttl * 1000)} if message_ttl else None
    return kombu.Queue(f"{conf.control_exchange}_conductor.casts", exchange=conductor_exchange(conf),
                       routing_key=CAST_ROUTING_KEY, durable=False, auto_delete=False, queue_arguments=arguments)


def conductor_routing_key(properties: dict) -> str:
    """Where a message to the conductors goes: a request (it names ``reply_to``) to the request queue, a cast
    to the cast queue."""
    return CONDUCTOR_ROUTING_KEY if properties.get("reply_to") else CAST_ROUTING_KEY


def check_host(host: str) -> str:
    """``host`` if it is a valid worker name (letters, digits, '.', '_', '-'; at most 128); else ConfigError.

    Host names become part of queue names and of the bus permissions'
    regular expressions, so they may not contain ':' or anything a regex
    would read as syntax.
    """
    if not isinstance(host, str) or not HOST_RE.match(host):
        raise exception.ConfigError(f"[compute] host {host!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return host


def worker_queue_name(conf: cfg.ConfigOpts, host: str) -> str:
    return f"{conf.control_exchange}_{COMPUTE_TOPIC}_fanout.{check_host(host)}:{uuid.uuid4().hex[:12]}"


def reply_queue_name(conf: cfg.ConfigOpts, host: str) -> str:
    return f"{conf.control_exchange}_reply.{check_host(host)}:{uuid.uuid4().hex[:12]}"


@dataclasses.dataclass(frozen=True)
class Permissions:
    """RabbitMQ permission regexes for one user on one vhost (``rabbitmqctl set_permissions``)."""

    configure: str
    write: str
    read: str


def compute_user_permissions(conf: cfg.ConfigOpts, host: str) -> Permissions:
    """What a hypervisor's bus user may do, and nothing more.

    * configure (declare/delete): its own fanout and reply queues;
    * write (publish, bind a queue): the conductor exchange, its own queues;
    * read (consume, bind from an exchange): its own queues, the fanout exchange.

    It cannot publish to the fanout exchange (no casts to other hosts), to the
    default exchange (no message straight into another queue), declare any
    exchange, or read the conductor's request queue.
    """
    cx = re.escape(conf.control_exchange)
    own = rf"{cx}_({COMPUTE_TOPIC}_fanout|reply)\.{re.escape(check_host(host))}:[0-9a-f]+"
    return Permissions(configure=f"^{own}$",
                       write=f"^({cx}_conductor|{own})$",
                       read=f"^({cx}_{COMPUTE_TOPIC}_fanout|{own})$")


def control_user_permissions(conf: cfg.ConfigOpts) -> Permissions:
    """The API / conductor bus user: every provfw exchange and queue, and the default exchange for replies."""
    cx = re.escape(conf.control_exchange)
    return Permissions(configure=f"^{cx}_.*$", write=rf"^({cx}_.*|amq\.default)$", read=f"^{cx}_.*$")


# --------------------------------------------------------------------------- transport

def transport_urls(url: str) -> list[str]:
    """kombu URLs for ``url``, one per broker.

    oslo.messaging writes several brokers as ``rabbit://u:p@h1:5672,u:p@h2:5672/vhost``;
    each becomes its own ``pyamqp://`` URL with the shared vhost and query.
    kombu's own ``;``-separated form is accepted as well.
    """
    if ";" in url:
        return [u for part in url.split(";") for u in transport_urls(part.strip())]
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise exception.ConfigError(f"transport_url {url!r} has no scheme (rabbit://, memory://, ...)")
    if scheme == "rabbit":
        scheme = "pyamqp"
    netloc, slash, path = rest.partition("/")
    hosts = netloc.split(",") if netloc else [""]
    return [f"{scheme}://{host}{slash}{path}" for host in hosts]


def _ssl_options(conf: cfg.ConfigOpts) -> dict | bool:
    group = conf.oslo_messaging_rabbit
    if not group.ssl:
        return False
    import ssl as ssl_mod
    options: dict = {"cert_reqs": ssl_mod.CERT_REQUIRED}
    if group.ssl_check_hostname:
        # None: kombu checks each broker's certificate against the host name transport_url gives for it
        # (kombu's pyamqp transport, celery/kombu#1366); _failover makes that hold for every broker.
        options["server_hostname"] = None
    if group.ssl_ca_file:
        options["ca_certs"] = group.ssl_ca_file
    if group.ssl_cert_file:
        options["certfile"] = group.ssl_cert_file
    if group.ssl_key_file:
        options["keyfile"] = group.ssl_key_file
    return options


def _failover(tls: dict | bool) -> Callable[[list[str]], Iterator[str]]:
    """kombu's ``round-robin`` failover over the brokers, checking each one's certificate against its own name.

    kombu fills ``ssl["server_hostname"] = None`` in with the host it is about to connect to and keeps that
    name in the dict it passes for every later broker (``establish_connection`` in kombu's pyamqp transport),
    so once the first broker was tried, the next one's certificate would be checked against the first one's
    name. The name is forgotten before each switch, and kombu fills in the next broker's.
    """
    def strategy(urls: list[str]) -> Iterator[str]:
        for url in itertools.cycle(urls):
            if isinstance(tls, dict) and "server_hostname" in tls:
                tls["server_hostname"] = None
            yield url
    return strategy


def connection(conf: cfg.ConfigOpts = provfw_conf.CONF, url: str | None = None) -> kombu.Connection:
    """A kombu connection to ``url`` (default ``transport_url``); brokers after the first are failover alternates."""
    urls = transport_urls(url or conf.transport_url)
    first = urls[0]
    if first.startswith("memory"):
        # The in-process transport polls; its default 1 s interval would add up to a second to every message.
        return kombu.Connection(first, transport_options={"polling_interval": 0.01})
    options = {"confirm_publish": True} if first.startswith(("amqp", "pyamqp")) else {}
    # heartbeat lets a consumer notice a dead broker even when no message arrives.
    tls = _ssl_options(conf)
    return kombu.Connection(";".join(urls), heartbeat=HEARTBEAT, connect_timeout=2, ssl=tls,
                            transport_options=options, failover_strategy=_failover(tls))


def bus_errors(conf: cfg.ConfigOpts = provfw_conf.CONF, url: str | None = None) -> tuple:
    """The exceptions that mean "the bus is unreachable" for ``url``'s transport (no connect)."""
    probe = kombu.Connection(transport_urls(url or conf.transport_url)[0])
    # ensure_connection() re-raises a refused connect as kombu's OperationalError, which is not an OSError.
    return (OSError, kombu.exceptions.OperationalError, *probe.connection_errors, *probe.channel_errors)


def _user_id(conn: kombu.Connection) -> str | None:
    """The user RabbitMQ validates ``user_id`` against; None on transports without users."""
    if conn.transport_cls in ("memory",) or str(conn.hostname or "").startswith("memory"):
        return None
    return conn.userid or None


def _envelope(method: str, args: dict) -> dict:
    return {"version": MESSAGE_VERSION, "method": method, "args": args, "msg_id": uuid.uuid4().hex,
            "sent_at": time.time()}


#: zlib level of reply bodies.  A conductor compresses a snapshot once per generation and sends it to every
#: host, but the compression is on the path from a bulk import to every host's kernel: for 120k rules (5.3 MB
#: of JSON) level 4 takes 0.06 s for 939 KB, level 6 (zlib's default) 0.24 s for 882 KB, level 1 0.04 s for
#: 1,031 KB (measured 2026-12-01).  Decompressing is 0.02 s at any of them.
REPLY_ZLIB_LEVEL = 4


def encode_reply(payload: Any) -> bytes:
    """A reply body: compact JSON, zlib (``REPLY_ZLIB_LEVEL``; a 120k-rule snapshot is ~0.9 MB)."""
    return zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), REPLY_ZLIB_LEVEL)


def decode_reply(body: bytes) -> Any:
    return json.loads(zlib.decompress(body))


# --------------------------------------------------------------------------- casts to every worker

class FanoutPublisher:
    """Publishes casts to every compute worker (API and conductor side; needs the control user)."""

    # After a cast has failed every retry, further casts fail at once for this
    # long: an API request must not spend seconds per mutation on a dead
    # broker when the workers' periodic check delivers the change anyway.
    BUS_DOWN_HOLD = 5.0
    # Nothing sends heartbeats on a publisher's connection between casts, so once
    # it has been idle this long the broker may have closed it: a cast then opens
    # a new one first (a few ms) instead of failing a publish and sleeping before
    # the retry (0.2-0.4 s added to the first change after a quiet minute).
    IDLE_REOPEN = float(HEARTBEAT)

    def __init__(self, conf: cfg.ConfigOpts = provfw_conf.CONF, url: str | None = None, max_retries: int = 2):
        self.conf = conf
        self.url = url or conf.transport_url
        self.exchange = fanout_exchange(conf)
        self.max_retries = max_retries
        self._down_until = 0.0
        self._last_used = 0.0
        self._lock = threading.Lock()
        self._conn: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._errors = bus_errors(conf, self.url)

    def _ensure_producer(self) -> kombu.Producer:
        if self._producer is None:
            self._conn = connection(self.conf, self.url)
            self._producer = kombu.Producer(self._conn.channel(), exchange=self.exchange, serializer="json",
                                            auto_declare=False)
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
        message = _envelope(method, args)
        with self._lock:
            if time.monotonic() < self._down_until:
                raise ConnectionError(f"message bus marked unreachable for another "
                                      f"{self._down_until - time.monotonic():.1f}s after failed casts")
            if self._conn is not None and time.monotonic() - self._last_used > self.IDLE_REOPEN:
                self._reset()

            def publish() -> None:
                try:
                    self._ensure_producer().publish(message, routing_key="", retry=False)
                except self._errors:
                    self._reset()
                    raise

            try:
                call_retrying(f"cast {method}", publish, self._errors, attempts=self.max_retries + 1,
                              initial=0.2, maximum=5.0, log=LOG)
            except self._errors:
                self._down_until = time.monotonic() + self.BUS_DOWN_HOLD
                raise
            self._last_used = time.monotonic()
        LOG.debug("cast %s to %s", method, self.exchange.name)
        return message["msg_id"]

    def close(self) -> None:
        with self._lock:
            self._reset()


# --------------------------------------------------------------------------- consumers

class _ReconnectingConsumer:
    """Consume ``queues()`` until ``stop()``, reconnecting with backoff whenever the bus goes away."""

    name = "consumer"
    # None: no_ack (casts: at most once, nothing to hold back).  A number: acknowledge each message after
    # handling it and let the broker deliver at most that many unacknowledged ones, so requests wait in
    # the queue - where their expiration applies - rather than in a busy consumer's buffer.
    prefetch: int | None = None
    # time.monotonic() when this process took the message being handled off the socket (after its sender
    # sent it): a cache read later than this is newer than anything the sender knew when it sent.
    received_at: float = 0.0

    def __init__(self, conf: cfg.ConfigOpts, url: str | None):
        self.conf = conf
        self.url = url or conf.transport_url
        self.connected = threading.Event()
        self._stop = threading.Event()
        self.on_connect: Callable[[], None] | None = None
        # Called on every round of the consume loop (at least every 0.25 s while connected) and on every
        # connection attempt: the systemd watchdog's proof that this loop is alive (provfw.systemd.Watchdog).
        self.on_tick: Callable[[], None] | None = None
        self._errors = bus_errors(conf, self.url)

    def queues(self) -> list[kombu.Queue]:
        raise NotImplementedError

    def unacked_queues(self) -> list[kombu.Queue]:
        """Queues consumed without acknowledgements even where ``prefetch`` is set (none by default)."""
        return []

    def on_message(self, message: kombu.Message, conn: kombu.Connection) -> None:
        raise NotImplementedError

    def setup(self, conn: kombu.Connection) -> None:
        """Called on every (re)connect before consuming (declare exchanges, open a producer)."""

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Consume until ``stop()``; an exception from the bus or a handler never ends the loop.

        Reconnects back off from 0.5 s to 30 s while the bus stays away, and
        start again from the beginning once a connection had been consuming.
        """
        while not self._stop.is_set():
            policy = retrying(f"{self.name} on {redact(self.url)}", Exception, initial=0.5, maximum=30.0,
                              stop_event=self._stop, log=LOG)
            try:
                policy(self._consume_once)
            except Exception:  # noqa: BLE001 - only reached when stop() interrupted the backoff
                if not self._stop.is_set():
                    LOG.exception("%s stopped unexpectedly; starting again", self.name)

    def _consume_once(self) -> None:
        """One connection's life: returns when stopped or when a consuming connection dropped."""
        if self._stop.is_set():
            return
        self._tick()
        conn = connection(self.conf, self.url)
        # Messages are received by kombu's callback and handled after drain_events
        # returns, never inside it: a handler that publishes with confirms (the
        # conductor's replies) reads the socket while it waits for the broker's ack,
        # and handling the requests that read delivers from inside that wait would
        # recurse once per request already buffered - 100 hosts asking at once
        # exhausted the stack.
        # (received at, message, whether to acknowledge it once handled)
        received: collections.deque[tuple[float, kombu.Message, bool]] = collections.deque()
        acked = self.prefetch is not None
        lost = None
        try:
            conn.ensure_connection(max_retries=1)
            self.setup(conn)
            consumer = kombu.Consumer(conn.default_channel, queues=self.queues(), no_ack=not acked,
                                      on_message=lambda message: received.append((time.monotonic(), message, acked)))
            if acked:
                consumer.qos(prefetch_count=self.prefetch)
            unacked = kombu.Consumer(conn.default_channel, queues=self.unacked_queues(), no_ack=True,
                                     on_message=lambda message: received.append((time.monotonic(), message, False)))
            with consumer, unacked:
                LOG.info("%s consuming %s", self.name,
                         ", ".join(q.name for q in (*consumer.queues, *unacked.queues)))
                if self.on_connect is not None:
                    # Anything sent while we were away is gone: the callback resyncs (messages
                    # arriving meanwhile wait in the queue).
                    self._safe(self.on_connect)
                self.connected.set()
                while not self._stop.is_set():
                    self._tick()
                    if not received:
                        try:
                            conn.drain_events(timeout=0.25)
                        except socket.timeout:
                            conn.heartbeat_check()
                    while received and not self._stop.is_set():
                        self.received_at, message, ack = received.popleft()
                        self._safe_message(message, conn, ack)
        except Exception as exc:
            if self._stop.is_set():
                return
            if not self.connected.is_set():
                if not isinstance(exc, self._errors):
                    LOG.exception("%s failed unexpectedly", self.name)
                raise
            lost = exc
        finally:
            self.connected.clear()
            _release(conn)
        if lost is not None:
            # Logged outside the except: oslo.log appends the exception being handled to a WARNING line.
            LOG.warning("%s lost the bus (%s: %s); reconnecting", self.name, type(lost).__name__, lost)

    def _tick(self) -> None:
        if self.on_tick is not None:
            self.on_tick()

    def _safe_message(self, message: kombu.Message, conn: kombu.Connection, ack: bool) -> None:
        try:
            self.on_message(message, conn)
        except self._errors:
            raise                      # the connection is gone: reconnect
        except Exception:  # noqa: BLE001 - a handler error must never kill the consumer
            LOG.exception("%s: handling a message failed", self.name)
        if ack:
            message.ack()

    @staticmethod
    def _safe(func: Callable[[], None]) -> None:
        try:
            func()
        except Exception:  # noqa: BLE001
            LOG.exception("on_connect callback failed")


def _decode_json(message: kombu.Message) -> dict | None:
    try:
        body = json.loads(message.body)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("method"), str) \
            or not isinstance(body.get("args", {}), dict):
        return None
    return body


class FanoutConsumer(_ReconnectingConsumer):
    """A worker's (or conductor's) queue on the fanout exchange; hands casts to ``handler(method, args)``.

    The exchange is bound passively: a compute bus user may not declare
    exchanges, the conductor declares it.
    """

    name = "fanout consumer"

    def __init__(self, handler: Callable[[str, dict], None], host: str, conf: cfg.ConfigOpts = provfw_conf.CONF,
                 url: str | None = None):
        super().__init__(conf, url)
        self.handler = handler
        self.host = host
        self.queue_name = worker_queue_name(conf, host)

    def queues(self) -> list[kombu.Queue]:
        return [kombu.Queue(self.queue_name, exchange=fanout_exchange(self.conf, passive=True), routing_key="",
                            exclusive=True, auto_delete=True, durable=False)]

    def on_message(self, message: kombu.Message, conn: kombu.Connection) -> None:
        body = _decode_json(message)
        if body is None:
            LOG.error("dropping malformed cast: %r", message.body[:200])
            return
        self.handler(body["method"], body.get("args") or {})


# --------------------------------------------------------------------------- request / reply

@dataclasses.dataclass(frozen=True)
class Incoming:
    """A request or cast as the server received it; ``user_id`` is the broker-validated AMQP user (or None)."""

    method: str
    args: dict
    user_id: str | None
    reply_to: str | None
    correlation_id: str | None
    received_at: float | None = None        # time.monotonic() of this process when it was received


@dataclasses.dataclass(frozen=True)
class Reply:
    """A reply body already encoded with ``encode_reply`` (cached snapshots), and small headers."""

    body: bytes
    headers: dict = dataclasses.field(default_factory=dict)


class RpcServer(_ReconnectingConsumer):
    """Serves the conductor exchange: ``handler(Incoming) -> Reply | dict | None`` (None: a cast, no reply).

    Declares both exchanges (the conductor is the control side).  Several
    servers may consume the same queues; the broker spreads requests.  Requests
    (``conductor_queue``) are acknowledged once answered, ``prefetch`` at a time;
    casts (``conductor_cast_queue``, the state reports) are not acknowledged.
    """

    name = "conductor server"
    prefetch = 4

    def __init__(self, handler: Callable[[Incoming], Any], conf: cfg.ConfigOpts = provfw_conf.CONF,
                 url: str | None = None, request_ttl: float = 60.0):
        super().__init__(conf, url)
        self.handler = handler
        self.request_ttl = request_ttl
        self._producer: kombu.Producer | None = None

    def queues(self) -> list[kombu.Queue]:
        return [conductor_queue(self.conf, self.request_ttl)]

    def unacked_queues(self) -> list[kombu.Queue]:
        return [conductor_cast_queue(self.conf, self.request_ttl)]

    def setup(self, conn: kombu.Connection) -> None:
        channel = conn.default_channel
        conductor_exchange(self.conf)(channel).declare()
        fanout_exchange(self.conf)(channel).declare()
        self._producer = kombu.Producer(conn.channel(), auto_declare=False)

    def on_message(self, message: kombu.Message, conn: kombu.Connection) -> None:
        body = _decode_json(message)
        props = message.properties or {}
        if body is None:
            LOG.error("dropping a malformed request from bus user %r: %r", props.get("user_id"), message.body[:200])
            return
        incoming = Incoming(body["method"], body.get("args") or {}, props.get("user_id"), props.get("reply_to"),
                            props.get("correlation_id"), self.received_at)
        result = self.handler(incoming)
        if incoming.reply_to is None or result is None:
            return
        reply = result if isinstance(result, Reply) else Reply(encode_reply(result))
        assert self._producer is not None
        self._producer.publish(reply.body, exchange="", routing_key=incoming.reply_to,
                               correlation_id=incoming.correlation_id, content_type=REPLY_CONTENT_TYPE,
                               content_encoding="binary", headers=reply.headers, retry=False)


class RpcClient:
    """Requests to the conductors from one worker: ``call`` waits for a reply, ``cast`` does not.

    One connection and one exclusive reply queue per client, opened lazily
    and reopened after a bus failure.  ``call`` retries ``retries`` times with
    backoff when no reply arrives within ``timeout`` seconds or the bus is
    down, then raises ``ConductorUnavailable``.  ``close`` ends a call in
    progress within a second (no further attempt, no backoff sleep), so a
    stopping worker is not held for ``(retries + 1) * timeout`` by a conductor
    that is down; calls after ``close`` raise ``ConductorUnavailable`` at once.
    """

    def __init__(self, host: str, conf: cfg.ConfigOpts = provfw_conf.CONF, url: str | None = None,
                 timeout: float | None = None, retries: int | None = None):
        self.conf = conf
        self.host = host
        self.url = url or conf.transport_url
        self.timeout = conf.conductor.call_timeout if timeout is None else timeout
        self.retries = conf.conductor.call_retries if retries is None else retries
        self.exchange = conductor_exchange(conf, passive=True)
        self._lock = threading.Lock()
        self._conn: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._consumer: kombu.Consumer | None = None
        self._reply_queue: str | None = None
        self._replies: dict[str, kombu.Message] = {}
        self._errors = bus_errors(conf, self.url)
        self._closed = threading.Event()
        self.last_reply_bytes = 0

    # ------------------------------------------------------------ connection

    def _ensure(self) -> kombu.Connection:
        if self._conn is None:
            conn = connection(self.conf, self.url)
            try:
                conn.ensure_connection(max_retries=1)
                self._reply_queue = reply_queue_name(self.conf, self.host)
                queue = kombu.Queue(self._reply_queue, exclusive=True, auto_delete=True, durable=False)
                self._consumer = kombu.Consumer(conn.default_channel, queues=[queue], no_ack=True,
                                                on_message=self._on_reply)
                self._consumer.consume()
                self._producer = kombu.Producer(conn.channel(), exchange=self.exchange, serializer="json",
                                                auto_declare=False)
            except Exception:
                _release(conn)
                raise
            self._conn = conn
        return self._conn

    def _on_reply(self, message: kombu.Message) -> None:
        correlation_id = (message.properties or {}).get("correlation_id")
        if correlation_id:
            self._replies[correlation_id] = message

    def _reset(self) -> None:
        if self._conn is not None:
            _release(self._conn)
        self._conn = self._producer = self._consumer = None
        self._replies.clear()

    def close(self) -> None:
        self._closed.set()                 # first: a call holding the lock gives up within a second
        with self._lock:
            self._reset()

    def _refuse_when_closed(self, method: str) -> None:
        if self._closed.is_set():
            raise exception.RpcClientClosed(f"{method}: the RPC client of {self.host} is closed (stopping)")

    # ------------------------------------------------------------ calls

    def _publish(self, method: str, args: dict, **properties) -> None:
        conn = self._ensure()
        assert self._producer is not None
        user_id = _user_id(conn)
        if user_id:
            properties["user_id"] = user_id
        self._producer.publish(_envelope(method, args), routing_key=conductor_routing_key(properties),
                               retry=False, **properties)

    def cast(self, method: str, **args) -> None:
        """Send ``method(**args)`` to a conductor without waiting; raises a bus error when unreachable."""
        self._refuse_when_closed(method)
        with self._lock:
            try:
                self._publish(method, args)
            except self._errors:
                self._reset()
                raise

    def call(self, method: str, **args) -> tuple[Any, dict]:
        """Send ``method(**args)`` and wait for its reply: (decoded payload, reply headers).

        Raises ``ConductorUnavailable`` after ``retries + 1`` attempts of
        ``timeout`` seconds each without a reply (or with the bus down).
        """
        body, headers = self.call_raw(method, **args)
        return decode_reply(body), headers

    def call_raw(self, method: str, **args) -> tuple[bytes, dict]:
        """``call``, with the reply's body as it came (compressed JSON: ``decode_reply`` reads it)."""
        self._refuse_when_closed(method)
        with self._lock:
            try:
                return retrying(f"{method} to {self.exchange.name}", (TimeoutError, *self._errors),
                                attempts=self.retries + 1, initial=0.5, maximum=5.0, stop_event=self._closed,
                                log=LOG)(self._call_once, method, args)
            except (TimeoutError, *self._errors) as exc:
                self._refuse_when_closed(method)
                raise exception.ConductorUnavailable(
                    f"no conductor answered {method} on exchange {self.exchange.name} within {self.timeout:.0f}s "
                    f"({self.retries + 1} attempts; last: {type(exc).__name__}: {exc}); is provfw-conductor "
                    f"running and reachable at {self.url.split('@')[-1]}?") from None

    def _call_once(self, method: str, args: dict) -> tuple[bytes, dict]:
        correlation_id = uuid.uuid4().hex
        try:
            self._ensure()                 # the reply queue must exist before it is named in reply_to
            self._publish(method, args, reply_to=self._reply_queue, correlation_id=correlation_id,
                          expiration=self.timeout)
            deadline = time.monotonic() + self.timeout
            assert self._conn is not None
            while correlation_id not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no reply within {self.timeout:.1f}s")
                if self._closed.is_set():
                    raise TimeoutError("the client was closed while waiting for the reply")
                try:
                    self._conn.drain_events(timeout=min(remaining, 1.0))
                except socket.timeout:
                    pass
        except TimeoutError:
            raise                          # the connection is fine; a late reply is dropped by correlation id
        except self._errors:
            self._reset()
            raise
        message = self._replies.pop(correlation_id)
        self._replies.clear()          # late replies to earlier, timed-out attempts
        self.last_reply_bytes = len(message.body)
        if message.content_type != REPLY_CONTENT_TYPE:
            raise exception.ProvfwError(f"{method}: unexpected reply content type {message.content_type!r}")
        return message.body, dict(message.headers or {})


def _release(conn: kombu.Connection) -> None:
    try:
        conn.release()
    except Exception:  # noqa: BLE001 - a dead connection may fail to close
        pass


_PASSWORD_RE = re.compile(r"(://|,)([^:/@,]+):[^@,]*@")


def redact(url: str) -> str:
    """``url`` with every password replaced by ``***``, for logs."""
    return _PASSWORD_RE.sub(r"\1\2:***@", url)
