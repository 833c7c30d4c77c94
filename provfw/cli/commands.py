"""The ``provfw`` commands.

Adding one: write ``def run(client, args) -> Result`` and decorate it with
``@command(name, help, arg(...), ..., columns=KEY)``.  A name with a space
(``"feed list"``) becomes a subcommand of a group (``provfw feed list``), the
group created on first use.  Every command gets the common options (-o, -c,
--json, --url, --token, --version) from the parser, before or after its name;
nothing to do per command.  What its table and ``value`` output show is
``COLUMNS[KEY]``, the one place columns are declared.

A command raises ``CommandError`` for what goes wrong on this side (a file it
cannot read); AdminClient's errors pass through to ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Mapping

from provfw import rules
from provfw.adminclient import AdminClient, AdminClientError, APIUnreachable
from provfw.cli.output import Column, Result

IMPORT_CHUNK_LINES = 20000
REFUSED_SHOWN = 20


class CommandError(Exception):
    """A failure on the client's side (e.g. the file to import); ``provfw`` prints it and exits 1."""


def _quarantined(row: Mapping[str, Any]) -> int | None:
    quarantine = row.get("quarantine")
    return None if quarantine is None else len(quarantine)


def _detail(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda row: (row.get("detail") or {}).get(key)


def _audit_cidrs(row: Mapping[str, Any]) -> str | None:
    detail = row.get("detail") or {}
    if detail.get("cidr"):
        return detail["cidr"]
    cidrs = list(dict.fromkeys(r.get("cidr") for r in detail.get("rules") or () if r.get("cidr")))
    return None if not cidrs else ", ".join(cidrs[:3]) + (f" +{len(cidrs) - 3}" if len(cidrs) > 3 else "")


def _columns(*names: str) -> tuple[Column, ...]:
    return tuple(Column(name) for name in names)


# What each kind of answer shows in a table and in `-o value`, in this order.  Only these lines decide it.
COLUMNS: dict[str, tuple[Column, ...]] = {
    "rule": _columns("id", "cidr", "protocol", "from_port", "to_port", "expires_at", "description"),
    "rule-detail": _columns("id", "cidr", "protocol", "from_port", "to_port", "description", "created_by",
                            "created_at", "expires_at", "generation"),
    "block": _columns("cidr", "rules"),
    "service": (*_columns("host", "state", "in_sync", "applied_generation", "rule_count"),
                Column("quarantined", _quarantined, requires="quarantine"),
                *_columns("driver", "last_error")),
    "audit": (*_columns("id", "at", "actor", "action", "generation"), Column("cidr", _audit_cidrs),
              Column("count", _detail("count")), Column("reason", _detail("reason"))),
    # Mutations: `-o value` prints these; a table prints the command's sentence instead.
    "blocked": _columns("cidr", "added", "generation"),
    "unblocked": _columns("cidr", "deleted", "generation"),
    "deleted": _columns("id", "generation"),
    "imported": _columns("added", "duplicate", "refused", "generation"),
}


@dataclasses.dataclass(frozen=True)
class Command:
    """A registered command: its name, help, argparse arguments, columns and what it runs."""

    name: str
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    columns: tuple[Column, ...]
    run: Callable[[AdminClient, argparse.Namespace], Result]


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument, spelled as for ``ArgumentParser.add_argument``."""
    return flags, options


def command(name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]], columns: str):
    """Register the decorated ``run(client, args) -> Result`` as ``provfw NAME``."""
    def register(run: Callable[[AdminClient, argparse.Namespace], Result]):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, arguments, COLUMNS[columns], run)
        return run
    return register


# ---------------------------------------------------------------- helpers

def count(number: int, noun: str) -> str:
    """``1 rule``, ``120,430 rules``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def describe_rule(rule: Mapping[str, Any]) -> str:
    """What a rule drops, in words: ``tcp port 22 from 203.0.113.0/24``."""
    protocol, low, high = rule.get("protocol"), rule.get("from_port"), rule.get("to_port")
    if protocol == "all":
        what = "all traffic"
    elif protocol == "icmp":
        what = "all icmp" if low in (None, rules.ANY) else \
            f"icmp type {low}" + ("" if high in (None, rules.ANY) else f" code {high}")
    elif low in (None, rules.MIN_PORT) and high in (None, rules.MAX_PORT):
        what = f"all {protocol}"
    elif low == high or high is None:
        what = f"{protocol} port {low}"
    else:
        what = f"{protocol} ports {low}-{high}"
    return f"{what} from {rule.get('cidr')}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _expiry(rule: Mapping[str, Any] | None) -> str:
    return f", expires {rule['expires_at']}" if rule and rule.get("expires_at") else ""


_PROTOCOL = arg("--protocol", default="all", choices=rules.PROTOCOLS, help="default: all")
_DESCRIPTION = arg("--description", help="why (kept with the rule and in the audit log)")
_TTL = arg("--ttl", type=float, metavar="SECONDS", help="seconds until the rule expires (default: never)")


# ---------------------------------------------------------------- the seed's CIDR-level calls

@command("block", "block all TCP, UDP and ICMP from a CIDR (the seed's block_ips)",
         arg("cidr", help="CIDR or address"), _DESCRIPTION, _TTL, columns="blocked")
def block(client: AdminClient, args: argparse.Namespace) -> Result:
    answer = client.block_ips(args.cidr, args.description, args.ttl)
    added = answer.get("rules") or []
    cidr = added[0]["cidr"] if added else args.cidr
    generation = answer.get("generation")
    message = f"blocked {cidr}: {count(len(added), 'rule')} added, generation {generation}" + \
        _expiry(added[0] if added else None)
    return Result(answer, [{"cidr": cidr, "added": len(added), "generation": generation}], message)


@command("unblock", "remove every rule of a CIDR", arg("cidr", help="CIDR or address"), columns="unblocked")
def unblock(client: AdminClient, args: argparse.Namespace) -> Result:
    answer = client.unblock_ips(args.cidr)
    cidr, deleted, generation = answer.get("cidr", args.cidr), answer.get("deleted"), answer.get("generation")
    what = answer.get("message") if deleted is None else f"{count(deleted, 'rule')} deleted"
    return Result(answer, [{"cidr": cidr, "deleted": deleted, "generation": generation}],
                  f"unblocked {cidr}: {what}, generation {generation}")


@command("blocks", "list blocked CIDRs", columns="block")
def blocks(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.list_blocks()
    return Result(rows, rows, empty="no blocked CIDRs")


# ---------------------------------------------------------------- rules

@command("rule-add", "add one rule",
         arg("cidr", help="CIDR or address"), _PROTOCOL,
         arg("--from-port", type=int, help="first destination port (tcp/udp), or the ICMP type"),
         arg("--to-port", type=int, help="last destination port (tcp/udp), or the ICMP code"),
         _DESCRIPTION, _TTL, columns="rule")
def rule_add(client: AdminClient, args: argparse.Namespace) -> Result:
    rule = client.create_rule(args.cidr, args.protocol, args.from_port, args.to_port, args.description, args.ttl)
    message = f"added rule {rule['id']}: {describe_rule(rule)}, generation {rule.get('generation')}" + _expiry(rule)
    return Result(rule, [rule], message)


@command("rule-delete", "delete one rule by id", arg("id", type=int), columns="deleted")
def rule_delete(client: AdminClient, args: argparse.Namespace) -> Result:
    generation = client.delete_rule(args.id)
    answer = {"deleted": args.id, "generation": generation}
    return Result(answer, [{"id": args.id, "generation": generation}],
                  f"deleted rule {args.id}, generation {generation}")


@command("rule-show", "show one rule", arg("id", type=int), columns="rule-detail")
def rule_show(client: AdminClient, args: argparse.Namespace) -> Result:
    rule = client.get_rule(args.id)
    return Result(rule, [rule], record=True)


@command("rules", "list rules",
         arg("--cidr", help="only this CIDR"), arg("--protocol", choices=rules.PROTOCOLS, help="only this protocol"),
         columns="rule")
def rules_list(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = list(client.iter_rules(args.cidr, args.protocol))
    return Result(rows, rows, empty="no rules")


# ---------------------------------------------------------------- bulk import

def read_source(path: str) -> tuple[str, list[str]]:
    """(the name to report, the lines) of ``path``, or of standard input for ``-``.

    Raises CommandError saying what is wrong with the file: missing, a
    directory, not readable, not UTF-8.  A UTF-8 byte-order mark is dropped.
    """
    if path == "-":
        name, data = "stdin", sys.stdin.buffer.read()
    else:
        name = path
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise CommandError(f"cannot import {path}: no such file") from None
        except IsADirectoryError:
            raise CommandError(f"cannot import {path}: it is a directory") from None
        except PermissionError:
            raise CommandError(f"cannot import {path}: not readable (permission denied)") from None
        except OSError as exc:
            raise CommandError(f"cannot import {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CommandError(f"cannot import {name}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") \
            from None
    return name, text.splitlines()


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    rate = done / max(time.monotonic() - started, 1e-6)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} lines  {rate:,.0f}/s")
    sys.stderr.flush()


@command("import", "bulk import CIDRs/addresses, one a line ('#' comments), from a file or - for stdin",
         arg("file", help="the file to read, or - for standard input"), _PROTOCOL, _DESCRIPTION, _TTL,
         arg("--chunk", type=_positive_int, default=IMPORT_CHUNK_LINES, metavar="LINES",
             help=f"lines per request, each one transaction and one cast (default: {IMPORT_CHUNK_LINES})"),
         arg("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal"),
         columns="imported")
def import_(client: AdminClient, args: argparse.Namespace) -> Result:
    name, lines = read_source(args.file)
    totals: dict[str, Any] = {"added": 0, "duplicate": 0, "refused": 0, "refused_lines": [], "generation": None}
    started = time.monotonic()
    show = sys.stderr.isatty() or args.progress
    # An empty file still sends one (empty) request, so the answer carries the current generation.
    for start in range(0, max(len(lines), 1), args.chunk):
        chunk = lines[start:start + args.chunk]
        try:
            answer = client.import_rules(chunk, protocol=args.protocol, description=args.description, ttl=args.ttl)
        except (AdminClientError, APIUnreachable) as exc:
            if start == 0:
                raise
            raise CommandError(
                f"{exc}; lines 1-{start:,} of {name} were imported (generation {totals['generation']}), the rest "
                "were not. Importing the whole file again is safe: rules already present count as duplicate."
            ) from None
        for key in ("added", "duplicate", "refused"):
            totals[key] += answer[key]
        totals["refused_lines"] += [{**refused, "line": refused["line"] + start} for refused in answer["refused_lines"]]
        totals["generation"] = answer["generation"]
        if show:
            _progress(min(start + args.chunk, len(lines)), len(lines), started)
    if show:
        sys.stderr.write("\n")
    message = (f"imported {name}: {totals['added']:,} added, {totals['duplicate']:,} duplicate, "
               f"{totals['refused']:,} refused, generation {totals['generation']}")
    details = [f"  line {r['line']}: {r['reason']}" for r in totals["refused_lines"][:REFUSED_SHOWN]]
    if totals["refused"] > len(details):
        more = count(totals["refused"] - len(details), "more refused line")
        details.append(f"  ... {more} (-o json lists up to 1,000 per request)")
    return Result(totals, [totals], message, details)


# ---------------------------------------------------------------- operations

@command("services", "compute workers and what they applied", columns="service")
def services(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.services()["services"]
    return Result(rows, rows, empty="no compute worker has reported yet")


@command("audit", "recent audit records, newest first (admin tokens only)",
         arg("--limit", type=_positive_int, default=20, help="how many records (default: 20)"), columns="audit")
def audit(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.audit_log(args.limit)
    return Result(rows, rows, empty="no audit records")
