"""RabbitMQ over TLS for tests: certificates from the ``openssl`` command and a TLS listener in front of the
shared broker.

Design
------
CI's RabbitMQ (127.0.0.1:5672) has no TLS listener, and adding one means restarting the node that concurrent
tests share.  ``TlsBroker`` therefore terminates TLS the way an stunnel or HAProxy in front of RabbitMQ does:
``socat OPENSSL-LISTEN`` on ``host:<free port>`` with a certificate of ``Certificates``, forwarding each
connection to 127.0.0.1:5672.  The client side under test (kombu, py-amqp, Python's ``ssl``) is the real one:
it verifies the chain, the host name and, when the listener asks, presents its own certificate.  ``host`` may be
any 127.0.0.0/8 address, so two brokers can have different names (127.0.0.1, 127.0.0.2) on one machine.

``stop()`` kills socat's process group: the listener and every forked connection, so a client sees its broker
die and the port refuse, as when a node goes down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.lib.services import port_open


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)


class Certificates:
    """A CA and the certificates it signs, as PEM files under ``directory`` (P-256 keys: fast to make)."""

    def __init__(self, directory: Path, ca_name: str = "provfw-test-ca"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = self.directory / f"{ca_name}.key"
        self.ca_cert = self.directory / f"{ca_name}.pem"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(self.ca_key), "-out", str(self.ca_cert), "-days", "2", "-subj", f"/CN={ca_name}")

    def issue(self, name: str, subject_alt_names: str | None = None) -> tuple[Path, Path]:
        """A certificate and key signed by this CA, e.g. ``issue("rabbit1", "IP:127.0.0.1")``; (cert, key)."""
        key, csr, cert = (self.directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        extra = []
        if subject_alt_names:
            extensions = self.directory / f"{name}.ext"
            extensions.write_text(f"subjectAltName={subject_alt_names}\n")
            extra = ["-extfile", str(extensions)]
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", *extra)
        return cert, key


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TlsBroker:
    """A TLS listener on ``host:port`` in front of RabbitMQ, presenting ``cert``; with ``client_ca`` it demands a
    client certificate signed by that CA.  A context manager; ``url(user, password)`` is its transport URL part."""

    def __init__(self, cert: Path, key: Path, host: str = "127.0.0.1", client_ca: Path | None = None,
                 upstream: tuple[str, int] = ("127.0.0.1", 5672)):
        self.host = host
        self.port = _free_port(host)
        verify = f"verify=1,cafile={client_ca}" if client_ca else "verify=0"
        listen = f"OPENSSL-LISTEN:{self.port},bind={host},reuseaddr,fork,cert={cert},key={key},{verify}"
        self._process = subprocess.Popen(["socat", listen, f"TCP:{upstream[0]}:{upstream[1]}"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 10
        while not port_open(host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"socat did not listen on {host}:{self.port}")
            time.sleep(0.02)

    def netloc(self, user: str = "guest", password: str = "guest") -> str:
        return f"{user}:{password}@{self.host}:{self.port}"

    def stop(self) -> None:
        """Kill the listener and every connection it forked; the port refuses from then on."""
        try:
            os.killpg(self._process.pid, signal.SIGKILL)    # the group: forked connections outlive their parent
        except ProcessLookupError:
            pass
        self._process.wait(10)

    def __enter__(self) -> "TlsBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
