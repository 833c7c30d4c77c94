#!/usr/bin/env python3
"""What a request costs provfw-api's process before and after the database, layer by layer.

The same 12 wrk connections (one per wrk thread, keep-alive) send, in turn:

* ``eventlet alone`` (the baseline): eventlet's WSGI server, started with
  provfw-api's options, around an application that reads the body and
  answers 60 bytes of JSON - what the HTTP server costs;
* ``GET /``: provfw-api's version document - the request id and its
  oslo.context, webob, routing, the JSON answer, the access line (oslo.log)
  and the request metrics;
* ``block refused (400)``: a block whose body its JSON schema refuses -
  adding authentication (from the token cache), the body, the schema and an
  error answer, still no database;
* ``block/unblock mix``: bench_api.py's load, every request a mutation
  through the group commit on PostgreSQL with a cast over RabbitMQ.

Each is measured as the server's CPU (user + system, from /proc) per
answered request, beside the baseline, in ``--rounds`` slices with the order
rotated every round.  A last row runs bench_db_mutations.py's mix (the
database layer alone: 12 threads calling ``provfw.db.api``, no HTTP, no
cast).  Below the table, the arithmetic issue 9's goal needs: what one
process may spend per mutation for 1,000 mutations/s, against the floor the
rows set.

    .venv/bin/python benchmarks/bench_api_floor.py [--seconds 10] [--rounds 2] [--clients 12]

Needs ``wrk`` (./tools/setup-test-env.sh installs it), PostgreSQL and RabbitMQ on 127.0.0.1 (the in-process
bus otherwise); talks only to 127.0.0.1, creates and drops its own database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_api, bench_db_mutations, machine  # noqa: E402
from provfw.db import api as db  # noqa: E402
from provfw.db import migration  # noqa: E402
from tests.lib import services  # noqa: E402
from tests.lib.deployment import free_port  # noqa: E402

ONE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_api_one.lua")

# eventlet's WSGI server as provfw.cmd.api.serve starts it, around an application that does nothing.
TRIVIAL = """
from provfw.cmd import eventlet_patch  # noqa: F401  (as provfw-api: must come first)
import logging, sys
import eventlet, eventlet.wsgi
ANSWER = b'{"generation": 1, "rules": [{"id": 1, "cidr": "10.0.0.1/32"}]}'
def app(environ, start_response):
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))])
    return [ANSWER]
sock = eventlet.listen(("127.0.0.1", int(sys.argv[1])), reuse_addr=True)
eventlet.wsgi.server(sock, app, log=logging.getLogger("trivial"), log_output=False, max_size=1000,
                     keepalive=True, socket_timeout=60)
"""

BLOCK = "/v1/block-external-addresses"
LAYERS = {
    # name: (server, method, path, expected status, body)
    "eventlet alone": ("trivial", "POST", BLOCK, 200, '{"cidr": "10.9.8.7/32"}'),
    "GET /": ("provfw", "GET", "/", 200, None),
    "block refused (400)": ("provfw", "POST", BLOCK, 400, '{"cidr": 5}'),
    "block/unblock mix": ("provfw", None, None, 200, None),
}
WHAT = {
    "eventlet alone": "eventlet.wsgi, an app that answers 60 bytes",
    "GET /": "+ request id, webob, routing, access line, metrics",
    "block refused (400)": "+ authentication, body, JSON schema, error",
    "block/unblock mix": "+ the group commit (PostgreSQL) and the cast",
}


def fixed_load(port: int, token: str, clients: int, seconds: float, method: str, path: str, expected: int,
               body: str | None) -> dict:
    """One slice of ``method path`` from wrk; returns answers with the expected status, elapsed seconds and
    the failures (SystemExit when wrk fails)."""
    argv = ["wrk", "--threads", str(clients), "--connections", str(clients),
            "--duration", f"{max(1, round(seconds))}s", "--timeout", "30s", "--script", ONE_SCRIPT,
            f"http://127.0.0.1:{port}", "--", token, method, path, str(expected), *([body] if body else [])]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    found = json.loads(lines[-1])
    return {"ok": found["ok"], "elapsed": found["duration_us"] / 1e6,
            "failed": found["failed"] + found["socket_errors"], "first_failures": found["first_failures"]}


def measure(kind: str, server: dict, token: str, clients: int, seconds: float, vacuum: bench_api.Vacuum) -> dict:
    """One slice of ``kind``'s load against its server: answers, seconds and the server's CPU seconds."""
    name, method, path, expected, body = LAYERS[kind]
    pids = bench_api.server_pids(server["proc"].pid)
    before = bench_api.proc_cpu(pids)
    if method is None:
        outcome = bench_api.run_load(server["port"], token, clients, seconds)
        outcome["failed"] = len(outcome["errors"])
    else:
        outcome = fixed_load(server["port"], token, clients, seconds, method, path, expected, body)
    after = bench_api.proc_cpu(pids)
    if method is None:
        vacuum()                    # what autovacuum would do (bench_api.Vacuum), outside the slice
    if outcome["failed"]:
        raise SystemExit(f"{kind}: {outcome['failed']} answers other than {expected} "
                         f"({outcome.get('first_failures') or outcome.get('errors')}); log {server['log']}")
    return {"ok": outcome["ok"], "elapsed": outcome["elapsed"],
            "cpu": sum(after.get(pid, 0.0) - before.get(pid, 0.0) for pid in pids)}


def start(kind: str, workdir: str, database_url: str, transport: str) -> dict:
    port = free_port()
    log = os.path.join(workdir, f"{kind}.log")
    if kind == "trivial":
        argv = [sys.executable, "-c", TRIVIAL, str(port)]
    else:
        config = bench_api.write_config(workdir, transport, database_url, port, 0)
        argv = [os.path.join(bench_api.BIN, "provfw-api"), "--config-file", config]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return {"port": port, "proc": proc, "log": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="load per layer, split into --rounds slices")
    parser.add_argument("--rounds", type=int, default=2, help="slices per layer, the order rotated every round")
    parser.add_argument("--clients", type=int, default=12, help="wrk connections (one per wrk thread)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench_api_floor.py: wrk not found (apt-get install wrk, or ./tools/setup-test-env.sh)")
    rounds = max(1, args.rounds)

    database = services.TestDatabase("postgresql")
    workdir = f"/tmp/provfw-bench-floor-{os.getpid()}"
    os.makedirs(workdir, exist_ok=True)
    servers: dict[str, dict] = {}
    vacuum = None
    slices: dict[str, list] = {kind: [] for kind in LAYERS}
    layer_alone: list[dict] = []
    failed = True
    try:
        migration.db_sync(database.url)
        db.configure(database.url)
        token = db.api_token_create("floor-" + secrets.token_hex(3), "admin")
        vacuum = bench_api.Vacuum(database.url)
        rabbit = services.port_open("127.0.0.1", 5672)
        for kind in ("trivial", "provfw"):
            servers[kind] = start(kind, workdir, database.url, services.RABBIT_URL if rabbit else "memory://")
        bench_api.wait_healthy(servers["provfw"]["port"], servers["provfw"]["proc"], servers["provfw"]["log"])
        trivial = servers["trivial"]
        deadline = time.monotonic() + 30
        while not services.port_open("127.0.0.1", trivial["port"]):        # /healthz is provfw-api's only
            if trivial["proc"].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the trivial server did not listen:\n{open(trivial['log']).read()[-3000:]}")
            time.sleep(0.1)
        for kind in LAYERS:                                             # warm-up: connections, caches
            measure(kind, servers[LAYERS[kind][0]], token, args.clients, 2.0, vacuum)
        kinds = list(LAYERS)
        for number in range(rounds):
            for kind in kinds[number % len(kinds):] + kinds[:number % len(kinds)]:
                slices[kind].append(measure(kind, servers[LAYERS[kind][0]], token, args.clients,
                                            args.seconds / rounds, vacuum))
            layer_alone.append(bench_db_mutations.run_tree(bench_db_mutations.ROOT, args.clients,
                                                           args.seconds / rounds))
        failed = False
    finally:
        for server in servers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server["proc"].pid, signal.SIGTERM)
        for server in servers.values():
            server["proc"].wait(20)
        if vacuum is not None:
            vacuum.dispose()
        db.dispose()
        database.drop()
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)

    print(machine.describe())
    print(f"\nThe server's CPU per request, layer by layer: {args.clients} wrk connections, "
          f"{args.seconds:.0f} s per layer in {rounds} turns, PostgreSQL, casts over "
          f"{'RabbitMQ' if rabbit else 'the in-process bus'}")
    print(f"{'layer':<22}{'what it adds':<50}{'req/s':>8}{'CPU/req':>10}{'vs eventlet alone':>19}")
    cost = {}
    for kind, taken in slices.items():
        answered = sum(one["ok"] for one in taken)
        cost[kind] = 1000.0 * sum(one["cpu"] for one in taken) / max(answered, 1)
        rate = answered / sum(one["elapsed"] for one in taken)
        print(f"{kind:<22}{WHAT[kind]:<50}{rate:>8.0f}{cost[kind]:>8.2f}ms"
              f"{cost[kind] / cost['eventlet alone']:>18.2f}x")
    alone_ms = sum(one["cpu_ms"] for one in layer_alone) / len(layer_alone)
    alone_ops = sum(one["ops"] for one in layer_alone) / len(layer_alone)
    print(f"{'database layer alone':<22}{'bench_db_mutations.py: threads, no HTTP, no cast':<50}{alone_ops:>8.0f}"
          f"{alone_ms:>8.2f}ms{alone_ms / cost['eventlet alone']:>18.2f}x")
    floor = cost["GET /"] + alone_ms
    print(f"\nIssue 9's goal, 1,000 mutations/s: one process may spend at most 1.00 ms of CPU per mutation, "
          f"and only if it is never idle.\nThe floor the rows set, GET / plus the database layer alone (no "
          f"authentication, body, schema or cast): {floor:.2f} ms; a mutation through provfw-api measured "
          f"{cost['block/unblock mix']:.2f} ms.")


if __name__ == "__main__":
    main()
