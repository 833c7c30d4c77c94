"""``provfw``: the admin command line, built on AdminClient.

Credentials come from --url/--token or PROVFW_URL / PROVFW_TOKEN; the
all-in-one daemon writes its bootstrap admin token to
``<state_path>/admin-token``, which is used when nothing else is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from provfw.adminclient import AdminClient, AdminClientError

DEFAULT_URL = "http://127.0.0.1:8774"
IMPORT_CHUNK_LINES = 20000


def _default_token() -> str | None:
    token = os.environ.get("PROVFW_TOKEN")
    if token:
        return token
    path = os.path.join(os.path.expanduser("~/.local/state/provfw"), "admin-token")
    if os.path.exists(path):
        with open(path) as handle:
            return handle.read().strip()
    return None


def _print(value, as_json: bool) -> None:
    if as_json or not isinstance(value, list):
        print(json.dumps(value, indent=2, sort_keys=True))
        return
    if not value:
        print("(none)")
        return
    columns = list(value[0].keys())
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in value)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in value:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    rate = done / max(time.monotonic() - started, 1e-6)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} lines  {rate:,.0f}/s")
    sys.stderr.flush()


def cmd_import(client: AdminClient, args) -> dict:
    """Send a file in chunks (each chunk one transaction and one cast) with a progress bar."""
    with open(args.file, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    totals = {"added": 0, "duplicate": 0, "refused": 0, "refused_lines": []}
    started = time.monotonic()
    show = sys.stderr.isatty() or args.progress
    for start in range(0, len(lines), args.chunk):
        chunk = lines[start:start + args.chunk]
        result = client.import_rules(chunk, protocol=args.protocol, description=args.description, ttl=args.ttl)
        for key in ("added", "duplicate", "refused"):
            totals[key] += result[key]
        for refused in result["refused_lines"]:
            totals["refused_lines"].append({**refused, "line": refused["line"] + start})
        totals["generation"] = result["generation"]
        if show:
            _progress(min(start + args.chunk, len(lines)), len(lines), started)
    if show:
        sys.stderr.write("\n")
    return totals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="provfw", description="Provider firewall admin client")
    parser.add_argument("--url", default=os.environ.get("PROVFW_URL", DEFAULT_URL))
    parser.add_argument("--token", default=None, help="API token (default: $PROVFW_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print raw JSON")
    sub = parser.add_subparsers(dest="command", required=True)

    block = sub.add_parser("block", help="block all TCP, UDP and ICMP from a CIDR (the seed's block_ips)")
    block.add_argument("cidr")
    block.add_argument("--description")
    block.add_argument("--ttl", type=float, help="seconds until the block expires")
    unblock = sub.add_parser("unblock", help="remove every rule of a CIDR")
    unblock.add_argument("cidr")
    sub.add_parser("blocks", help="list blocked CIDRs")

    add = sub.add_parser("rule-add", help="add one rule")
    add.add_argument("cidr")
    add.add_argument("--protocol", default="all", choices=["tcp", "udp", "icmp", "all"])
    add.add_argument("--from-port", type=int)
    add.add_argument("--to-port", type=int)
    add.add_argument("--description")
    add.add_argument("--ttl", type=float)
    delete = sub.add_parser("rule-delete", help="delete one rule by id")
    delete.add_argument("id", type=int)
    show = sub.add_parser("rule-show", help="show one rule")
    show.add_argument("id", type=int)
    listing = sub.add_parser("rules", help="list rules")
    listing.add_argument("--cidr")
    listing.add_argument("--protocol")

    imp = sub.add_parser("import", help="bulk import a file of CIDRs/addresses, one per line")
    imp.add_argument("file")
    imp.add_argument("--protocol", default="all", choices=["tcp", "udp", "icmp", "all"])
    imp.add_argument("--description")
    imp.add_argument("--ttl", type=float)
    imp.add_argument("--chunk", type=int, default=IMPORT_CHUNK_LINES, help="lines per request")
    imp.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")

    sub.add_parser("services", help="compute workers and what they applied")
    audit = sub.add_parser("audit", help="recent audit records")
    audit.add_argument("--limit", type=int, default=20)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token or _default_token()
    if not token:
        print("provfw: no token; pass --token or set PROVFW_TOKEN "
              "(create one with 'provfw-manage token create --name NAME --role admin')", file=sys.stderr)
        return 2
    client = AdminClient(args.url, token)
    try:
        if args.command == "block":
            result = client.block_ips(args.cidr, args.description, args.ttl)
        elif args.command == "unblock":
            result = client.unblock_ips(args.cidr)
        elif args.command == "blocks":
            result = client.list_blocks()
        elif args.command == "rule-add":
            result = client.create_rule(args.cidr, args.protocol, args.from_port, args.to_port, args.description,
                                        args.ttl)
        elif args.command == "rule-delete":
            client.delete_rule(args.id)
            result = {"deleted": args.id}
        elif args.command == "rule-show":
            result = client.get_rule(args.id)
        elif args.command == "rules":
            result = [{k: r[k] for k in ("id", "cidr", "protocol", "from_port", "to_port", "expires_at",
                                          "description")} for r in client.iter_rules(args.cidr, args.protocol)]
        elif args.command == "import":
            result = cmd_import(client, args)
        elif args.command == "services":
            result = client.services()["services"]
        elif args.command == "audit":
            result = client.audit_log(args.limit)
        else:  # pragma: no cover - argparse refuses unknown commands
            raise AssertionError(args.command)
    except AdminClientError as exc:
        print(f"provfw: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"provfw: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
