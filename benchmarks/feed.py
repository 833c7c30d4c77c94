"""Blocklist input shared by the benchmarks: the IPsum feed (or synthetic addresses) as rule specs.

The IPsum snapshot is not part of the repository: it lives in ``shared/data/`` BESIDE the repository
(``<repo>/../shared/data/``), wherever the checkout is; ``DEFAULT_IPSUM`` resolves it from this file.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Iterable

from provfw.rules import make_spec

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IPSUM = os.path.abspath(os.path.join(REPO_ROOT, os.pardir, "shared", "data", "ipsum-levels1-2026-08-22.txt"))

# Addresses the benchmark topologies use themselves; a feed entry inside them would block the probes.
TOPOLOGY_NETS = [ipaddress.ip_network("198.18.0.0/15")]


def load_specs(path: str | None, generate: int | None = None, protocol: str = "all", count: int | None = None,
               exclude: Iterable = TOPOLOGY_NETS) -> list:
    """Distinct specs from ``path`` (one address or CIDR a line, '#' comments), or ``generate`` synthetic /32s
    from 100.64.0.0/10; at most ``count``; entries overlapping ``exclude`` are skipped."""
    if generate:
        base = int(ipaddress.ip_address("100.64.0.0"))
        total = generate if count is None else min(count, generate)
        return [make_spec(str(ipaddress.ip_address(base + 1 + i)), protocol) for i in range(total)]
    exclude = list(exclude)
    specs: dict = {}
    with open(path) as handle:
        for line in handle:
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            spec = make_spec(text, protocol)
            if not any(spec.network.overlaps(n) for n in exclude if n.version == spec.version):
                specs[spec] = None
            if count is not None and len(specs) >= count:
                break
    return list(specs)
