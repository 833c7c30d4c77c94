#!/usr/bin/env python3
"""Parse time of the block-list formats (issue 10), beside today's importer loop.

Reads one list of addresses (the IPsum levels file by default) and, in memory,
writes it out again in each format provfw reads: plain as published, IPsum
(address, tab, count, '#' header), Spamhaus (``; SBL`` references), CSV (a
SIEM export read by a named column).  Each is parsed with
``provfw.feeds.formats.parse`` (best of N runs, each in the same process).
The baseline is what ``import_rules`` does with plain text today: split off
'#' comments, ``rules.make_spec`` per line.  A last row times
``rules.non_global_overlap`` over every parsed network, which the importer
will add per entry.

    .venv/bin/python benchmarks/bench_formats.py [PATH (default ../shared/data/ipsum-levels1-2026-08-22.txt)] [--runs 5]

No root, no database, no network.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.feed import DEFAULT_IPSUM as DEFAULT_PATH  # noqa: E402  (../shared/data beside the repository)
from provfw import rules  # noqa: E402
from provfw.feeds import formats  # noqa: E402


def best_of(runs: int, work) -> tuple[float, object]:
    best, result = None, None
    for _ in range(runs):
        started = time.perf_counter()
        result = work()
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def importer_today(text: str) -> int:
    """The loop of provfw/api/admin.py import_rules at 0c61cdd (text body, default protocol 'all')."""
    specs = []
    for line in text.splitlines():
        value = line.split("#", 1)[0].strip()
        if value:
            try:
                specs.append(rules.make_spec(value, "all"))
            except Exception:
                pass
    return len(set(specs))


def variants(addresses: list[str], published: bytes) -> list[tuple[str, bytes, dict]]:
    ipsum = "# IPsum Threat Intelligence Feed\n#\n# IP\tnumber of (black)lists\n#\n" + "".join(
        f"{a}\t{1 + i % 9}\n" for i, a in enumerate(addresses))
    spamhaus = "; Spamhaus DROP List (benchmark)\n" + "".join(
        f"{a}/32 ; SBL{i:06d}\n" for i, a in enumerate(addresses))
    siem = "timestamp,rule,src_ip,count\r\n" + "".join(
        f"2026-08-22T03:00:00Z,\"ssh brute force, sshd\",{a},{i % 50}\r\n" for i, a in enumerate(addresses))
    return [
        ("plain (as published)", published, {}),
        ("ipsum (addr<TAB>count)", ipsum.encode(), {}),
        ("spamhaus (; SBL…)", spamhaus.encode(), {}),
        ("csv, column=src_ip", siem.encode(), {"column": "src_ip"}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=DEFAULT_PATH)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with open(args.path, "rb") as handle:
        published = handle.read()
    text = published.decode()
    addresses = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    baseline, count = best_of(args.runs, lambda: importer_today(text))
    print(f"{args.path}: {len(addresses)} addresses; best of {args.runs} runs")
    print(f"{'input':26} {'format':>9} {'entries':>8} {'refused':>8} {'seconds':>8} {'us/line':>8} {'vs today':>9}")
    print(f"{'today: split + make_spec':26} {'-':>9} {count:>8} {'-':>8} {baseline:8.3f} "
          f"{baseline / len(addresses) * 1e6:8.2f} {1:8.2f}x")
    parsed = None
    for name, data, options in variants(addresses, published):
        elapsed, result = best_of(args.runs, lambda: formats.parse(data, **options))
        parsed = parsed or result
        print(f"{name:26} {result.format:>9} {len(result.entries):>8} {len(result.refused):>8} {elapsed:8.3f} "
              f"{elapsed / result.lines * 1e6:8.2f} {elapsed / baseline:8.2f}x")
    networks = parsed.networks
    elapsed, hits = best_of(args.runs, lambda: sum(rules.non_global_overlap(n) is not None for n in networks))
    print(f"{'non_global_overlap, each':26} {'-':>9} {len(networks):>8} {hits:>8} {elapsed:8.3f} "
          f"{elapsed / len(networks) * 1e6:8.2f} {elapsed / baseline:8.2f}x")


if __name__ == "__main__":
    main()
