#!/usr/bin/env python3
"""The database layer's mutations alone, without HTTP: the ceiling the API's group commit gives.

N threads (12, as bench_api.py's clients) each block a CIDR of its own (3
rules) and unblock it again through ``provfw.db.api`` with a ``notify``, as
the API does, so the calls go through the group commit.  PostgreSQL on
127.0.0.1; the cast is a no-op (bench_api.py measures the bus).  Printed:
mutations/s, the process' CPU per mutation and the statements per mutation
(``db.statement_counts``), for this tree and, with ``--baseline DIR``, for
another source tree (``git archive <commit> provfw | tar -x -C DIR``) run
with the same code in turn, ``--runs`` times each.

    .venv/bin/python benchmarks/bench_db_mutations.py [--threads 12] [--seconds 5] [--runs 2] [--baseline DIR]

Uses the test helpers (``tests.lib.services``: a scratch PostgreSQL database), so it runs in the ``.venv``
that ``./tools/run-tests.sh`` or ``./tools/setup-test-env.sh`` builds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(threads: int, seconds: float) -> dict:
    """Run the mix in this process (whichever ``provfw`` it imports) and return its figures."""
    sys.path.insert(1, ROOT)          # tests.lib from this tree; provfw as sys.path[0] found it
    from provfw import rules
    from provfw.db import api as db
    from provfw.db import migration
    from tests.lib import services

    database = services.TestDatabase("postgresql")
    try:
        migration.db_sync(database.url)
        db.configure(database.url, 8)
        stop = threading.Event()
        counts = [0] * threads

        def work(index: int, run: int) -> None:
            n = 0
            while not stop.is_set():
                cidr = f"{10 + run}.{index}.{(n // 256) % 256}.{n % 256}/32"
                db.provider_fw_rules_sync("manual", rules.external_block_specs(cidr), created_by="bench",
                                          audit=db.Audit("bench"), action="cidr.block", notify=lambda _: True)
                db.provider_fw_rule_destroy_by_cidr(cidr, audit=db.Audit("bench"), notify=lambda _: True)
                n += 1
                counts[index] += 2

        result = {}
        for run, length in ((1, 1.0), (2, seconds)):          # the first: warm-up
            stop.clear()
            counts[:] = [0] * threads
            statements, cpu, started = db.statement_counts()["statements"], time.process_time(), time.perf_counter()
            workers = [threading.Thread(target=work, args=(index, run)) for index in range(threads)]
            for worker in workers:
                worker.start()
            time.sleep(length)
            stop.set()
            for worker in workers:
                worker.join(60)
            elapsed, ops = time.perf_counter() - started, sum(counts)
            result = {"ops": ops / elapsed, "cpu_ms": 1000 * (time.process_time() - cpu) / ops,
                      "statements": (db.statement_counts()["statements"] - statements) / ops}
        return result
    finally:
        db.dispose()
        database.drop()


def run_tree(tree: str, threads: int, seconds: float) -> dict:
    # The tree's provfw must be the one imported (the venv's editable install would answer otherwise).
    code = (f"import sys; sys.path.insert(0, {tree!r}); sys.path.insert(1, {ROOT!r}); "
            "import provfw; "
            f"assert provfw.__file__.startswith({tree!r}), provfw.__file__; "
            "from benchmarks import bench_db_mutations as b; import json; "
            f"print(json.dumps(b.measure({threads}, {seconds})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd="/")
    if out.returncode != 0:
        raise SystemExit(f"the run of {tree} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=2, help="runs of each tree, in turn")
    parser.add_argument("--baseline", help="another source tree to run the same mix against")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from benchmarks import machine

    trees = {"this tree": ROOT, **({"baseline": os.path.abspath(args.baseline)} if args.baseline else {})}
    for tree in trees.values():
        if not os.path.isfile(os.path.join(tree, "provfw", "__init__.py")):
            raise SystemExit(f"{tree} holds no provfw package (git archive <commit> provfw | tar -x -C DIR)")
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            results[name].append(run_tree(tree, args.threads, args.seconds))
    print(machine.describe())
    print(f"\nDatabase layer alone, {args.threads} threads, block/unblock mix, PostgreSQL, {args.seconds:.0f} s "
          f"per run, {args.runs} run{'s' if args.runs != 1 else ''} of each tree in turn")
    print(f"{'tree':<12}{'mutations/s':>22}{'CPU/mutation':>26}{'statements/mutation':>24}{'vs this tree':>14}")
    for name, runs in results.items():
        ops = " / ".join(f"{r['ops']:.0f}" for r in runs)
        cpu = " / ".join(f"{r['cpu_ms']:.2f}" for r in runs)
        statements = " / ".join(f"{r['statements']:.2f}" for r in runs)
        ratio = sum(r["ops"] for r in runs) / sum(r["ops"] for r in results["this tree"])
        print(f"{name:<12}{ops:>22}{cpu + ' ms':>26}{statements:>24}{ratio:>13.2f}x")


if __name__ == "__main__":
    main()
