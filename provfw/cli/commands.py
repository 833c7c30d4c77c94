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
import datetime
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from provfw import exception, rules, sources
from provfw.feeds import formats
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
    rules = detail.get("rules")
    if not isinstance(rules, list):         # an action whose detail names no rules (a db.purge counts them)
        return None
    cidrs = list(dict.fromkeys(r.get("cidr") for r in rules if isinstance(r, dict) and r.get("cidr")))
    return None if not cidrs else ", ".join(cidrs[:3]) + (f" +{len(cidrs) - 3}" if len(cidrs) > 3 else "")


def _columns(*names: str) -> tuple[Column, ...]:
    return tuple(Column(name) for name in names)


def _sources(row: Mapping[str, Any]) -> str | None:
    names = [item.get("source") for item in row.get("sources") or ()]
    return ", ".join(name for name in names if name) or None


def _sources_detail(row: Mapping[str, Any]) -> str | None:
    items = row.get("sources") or ()
    return "; ".join(f"{item.get('source')} until {item.get('expires_at') or 'never'}" for item in items) or None


def _count(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda row: (row.get("counts") or {}).get(key)


# What each kind of answer shows in a table and in `-o value`, in this order.  Only these lines decide it.
COLUMNS: dict[str, tuple[Column, ...]] = {
    "rule": (*_columns("id", "cidr", "protocol", "from_port", "to_port", "expires_at"),
             Column("source", _sources, requires="sources"), Column("description")),
    "rule-detail": (*_columns("id", "cidr", "protocol", "from_port", "to_port", "description", "created_by",
                              "created_at", "expires_at"), Column("sources", _sources_detail, requires="sources"),
                    *_columns("generation")),
    "why": (*_columns("id", "cidr", "protocol", "from_port", "to_port"), Column("source", _sources),
            *_columns("expires_at", "generation", "enforced", "covers")),
    "source": _columns("source", "rules"),
    "feed": (*_columns("name", "enabled", "interval", "rules", "last_status", "last_sync"),
             Column("refused", _count("refused")), *_columns("last_error", "url")),
    "feed-detail": (*_columns("name", "source", "url", "format", "column", "interval", "ttl", "protocol",
                              "from_port", "to_port", "enabled", "allow_non_global", "description", "rules",
                              "next_sync", "syncing", "last_sync", "last_success", "last_applied", "last_status",
                              "last_error", "last_generation"),
                    *(Column(key, _count(key)) for key in ("lines", "entries", "added", "renewed", "removed",
                                                           "deleted", "refused"))),
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
    "imported": _columns("source", "added", "renewed", "duplicate", "removed", "refused", "generation"),
    "feed-deleted": _columns("feed", "removed", "deleted", "generation"),
    "feed-synced": _columns("name", "last_status", "last_generation", "last_error"),
}


@dataclasses.dataclass(frozen=True)
class Command:
    """A registered command: its name, help, argparse arguments, columns and what it runs."""

    name: str
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    columns: tuple[Column, ...]
    run: Callable[[AdminClient, argparse.Namespace], Result]
    # A usage problem the parser cannot see (a combination of options): a message, or None.
    check: Callable[[argparse.Namespace], str | None] | None = None


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument, spelled as for ``ArgumentParser.add_argument``."""
    return flags, options


def command(name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]], columns: str,
            check: Callable[[argparse.Namespace], str | None] | None = None):
    """Register the decorated ``run(client, args) -> Result`` as ``provfw NAME``.

    ``check(args)``: a usage error the parser cannot see (exit status 2), or None.
    """
    def register(run: Callable[[AdminClient, argparse.Namespace], Result]):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, arguments, COLUMNS[columns], run, check)
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


class Number:
    """The argparse type of every number ``provfw`` takes: a whole number from ``low`` to ``high`` (no limit
    when None), so that what the API would refuse, and what no request can carry (``inf``, ``nan``), is a
    usage error naming the option (exit 2), never a traceback or an HTTP 400.

    ``fractions``: a decimal number (``0.5``, ``1e3``) is taken too and rounded up to a whole number, the
    range checked after rounding (seconds: the API takes whole seconds, and a fraction was always rounded up).
    """

    def __init__(self, low: int, high: int | None = None, *, fractions: bool = False):
        self.low, self.high, self.fractions = low, high, fractions

    def __repr__(self) -> str:
        return f"Number({self.low}, {self.high}, fractions={self.fractions})"

    def __call__(self, text: str) -> int:
        # Python reads '١٢٣' and '1_000' as numbers; the API and every shell tool do not.
        if not text.isascii() or "_" in text:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number in ASCII digits")
        try:
            value = int(text)
        except ValueError:
            value = None
            if text.strip().lstrip("+-").isdecimal():       # a whole number of more digits than int() reads
                raise argparse.ArgumentTypeError(f"must be {self.range()}, not {text[:20]}...") from None
            if not self.fractions:
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value is None:
            try:
                number = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            if not math.isfinite(number):
                raise argparse.ArgumentTypeError(f"{text!r} is not a finite number") from None
            value = math.ceil(number)
        if value < self.low or self.high is not None and value > self.high:
            raise argparse.ArgumentTypeError(f"must be {self.range()}, not {text}")
        return value

    def range(self) -> str:
        return f"at least {self.low}" if self.high is None else f"from {self.low} to {self.high}"


# The ranges the API takes (provfw.api.schemas; tests/unit/test_cli.py keeps them in step), here so that the
# CLI need not load the API's schemas to read its command line.
MAX_FEED_INTERVAL = 7 * 86400
MAX_AUDIT_LIMIT = 1000
MAX_ID = 2**63 - 1
SECONDS = Number(1, rules.MAX_LIFETIME, fractions=True)   # every --ttl: 1 s to ten years, rounded up
PORT = Number(rules.ANY, rules.MAX_PORT)                   # then the protocol narrows it (the server says how)
RULE_ID = Number(1, MAX_ID)


def _source(given: str | None) -> str:
    """The source a block or rule-add names, as the API reads it (a bare NAME is manual:NAME)."""
    try:
        return sources.parse_source(given or sources.MANUAL, sources.MANUAL)
    except exception.InvalidInput:
        return str(given)                      # the API took it: print it as given


def _expiry(rule: Mapping[str, Any] | None) -> str:
    return f", expires {rule['expires_at']}" if rule and rule.get("expires_at") else ""


_PROTOCOL = arg("--protocol", default="all", choices=rules.PROTOCOLS, help="default: all")
_DESCRIPTION = arg("--description", help="why (kept with the rule and in the audit log)")
_TTL = arg("--ttl", type=SECONDS, metavar="SECONDS", help="seconds until the rule expires (default: never)")
_SOURCE = arg("--source", metavar="SOURCE",
              help="who wants the rule: manual (default), manual:LABEL or import:NAME; a bare NAME means manual:NAME")
_ALLOW_NON_GLOBAL = arg("--allow-non-global", action="store_true", default=None,
                        help="block a non-global range too (private, link-local, loopback...; audited)")


# ---------------------------------------------------------------- the seed's CIDR-level calls

@command("block", "block all TCP, UDP and ICMP from a CIDR (the seed's block_ips)",
         arg("cidr", help="CIDR or address"), _DESCRIPTION, _TTL, _SOURCE, _ALLOW_NON_GLOBAL, columns="blocked")
def block(client: AdminClient, args: argparse.Namespace) -> Result:
    answer = client.block_ips(args.cidr, args.description, args.ttl, source=args.source,
                              allow_non_global=args.allow_non_global)
    added = answer.get("rules") or []
    cidr = added[0]["cidr"] if added else rules.normalise_cidr(args.cidr)
    generation = answer.get("generation")
    renewed, unchanged, kept = (answer.get(key) or 0 for key in ("renewed", "unchanged", "kept"))
    if "kept" not in answer:          # an API before 2026-12-02 counted the two together
        kept = len(rules.external_block_specs(cidr)) - len(added) - renewed
    source = _source(args.source)
    message = (f"blocked {cidr}: {count(len(added), 'rule')} added"
               + (f", {count(renewed, 'rule')} renewed" if renewed else "")
               + (f", {count(kept, 'rule')} kept (already live; source {source} added)" if kept else "")
               + (f", {count(unchanged, 'rule')} unchanged (already live for {source})" if unchanged else "")
               + f", generation {generation}" + _expiry(added[0] if added else None))
    return Result(answer, [{"cidr": cidr, "added": len(added), "generation": generation}], message)


@command("unblock", "remove every rule of a CIDR",
         arg("cidr", help="CIDR or address"),
         arg("--source", metavar="SOURCE", help="only this source lets go; rules other sources want stay"),
         columns="unblocked")
def unblock(client: AdminClient, args: argparse.Namespace) -> Result:
    answer = client.unblock_ips(args.cidr, source=args.source)
    cidr, deleted, generation = answer.get("cidr", args.cidr), answer.get("deleted"), answer.get("generation")
    what = answer.get("message") if deleted is None else f"{count(deleted, 'rule')} deleted"
    if answer.get("kept"):
        what += f", {count(answer['kept'], 'rule')} kept for other sources"
    return Result(answer, [{"cidr": cidr, "deleted": deleted, "generation": generation}],
                  f"unblocked {cidr}: {what}, generation {generation}")


@command("blocks", "list blocked CIDRs", columns="block")
def blocks(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.list_blocks()
    return Result(rows, rows, empty="no blocked CIDRs")


# ---------------------------------------------------------------- rules

@command("rule-add", "add one rule (or renew it: the same rule again with a later expiry, or none)",
         arg("cidr", help="CIDR or address"), _PROTOCOL,
         arg("--from-port", type=PORT, help="first destination port (tcp/udp), or the ICMP type"),
         arg("--to-port", type=PORT, help="last destination port (tcp/udp), or the ICMP code"),
         _DESCRIPTION, _TTL, _SOURCE, _ALLOW_NON_GLOBAL, columns="rule")
def rule_add(client: AdminClient, args: argparse.Namespace) -> Result:
    status, answer = client.create_rule_answer(args.cidr, args.protocol, args.from_port, args.to_port,
                                               args.description, args.ttl, source=args.source,
                                               allow_non_global=args.allow_non_global)
    rule, generation = answer["rule"], answer.get("generation")
    # 201: created; 200: it was live, and this request renewed it (a later expiry, or none) or added its source.
    if status == 201:
        what = f"added rule {rule['id']}: {describe_rule(rule)}"
    elif answer.get("renewed"):
        what = f"renewed rule {rule['id']}: {describe_rule(rule)}"
    else:
        source = _source(args.source)
        others = [item["source"] for item in rule.get("sources") or () if item.get("source") != source]
        what = (f"kept rule {rule['id']}: {describe_rule(rule)} was already live"
                + (f" for {', '.join(others)}" if others else "") + f"; source {source} added")
    return Result(answer, [rule], f"{what}, generation {generation}" + _expiry(rule))


@command("rule-delete", "delete one rule by id",
         arg("id", type=RULE_ID),
         arg("--source", metavar="SOURCE", help="only this source lets go; the rule stays while others want it"),
         columns="deleted")
def rule_delete(client: AdminClient, args: argparse.Namespace) -> Result:
    generation = client.delete_rule(args.id, source=args.source)
    answer = {"deleted": args.id, "generation": generation}
    what = f"released rule {args.id} from {args.source}" if args.source else f"deleted rule {args.id}"
    return Result(answer, [{"id": args.id, "generation": generation}], f"{what}, generation {generation}")


@command("rule-show", "show one rule", arg("id", type=RULE_ID), columns="rule-detail")
def rule_show(client: AdminClient, args: argparse.Namespace) -> Result:
    rule = client.get_rule(args.id)
    return Result(rule, [rule], record=True)


@command("rules", "list rules",
         arg("--cidr", help="only this CIDR"), arg("--protocol", choices=rules.PROTOCOLS, help="only this protocol"),
         arg("--source", metavar="SOURCE", help="only rules this source wants (manual, import:NAME, feed:NAME)"),
         arg("--within", metavar="NETWORK", help="only rules inside this network (itself included)"),
         columns="rule")
def rules_list(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = list(client.iter_rules(args.cidr, args.protocol, source=args.source, within=args.within))
    empty = "no rules" if args.within is None else f"no rules inside {args.within}"
    if args.source:
        # The server read a bare name as manual:NAME (an import's --source NAME is import:NAME): say so.
        empty += f" of source {sources.parse_source(args.source, sources.MANUAL, allowed=sources.KINDS)}"
    return Result(rows, rows, empty=empty)


@command("sources", "every source (manual, import:NAME, feed:NAME) and how many rules it wants", columns="source")
def sources_list(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.sources()
    return Result(rows, rows, empty="no sources: no live rule is wanted by any source")


def _enforcement(rule: Mapping[str, Any], services: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """('2/3 hosts', [why each other host does not]) for one rule and the workers' reports."""
    enforcing, notes = 0, []
    for host in services:
        name = host.get("host")
        applied = host.get("applied_generation", -1)
        quarantined = [q for q in host.get("quarantine") or () if q.get("id") == rule["id"]]
        if quarantined:
            notes.append(f"{name}: refused rule {rule['id']} (quarantined: {quarantined[0].get('reason')})")
        elif applied < rule["generation"]:
            notes.append(f"{name}: not yet (applied generation {applied} < {rule['generation']})")
        elif str(host.get("driver") or "").endswith("/noop"):
            notes.append(f"{name}: its firewall driver is noop, which enforces nothing")
        elif host.get("state") != "up":
            notes.append(f"{name}: down (last applied generation {applied}; still enforced if its kernel kept it)")
        else:
            enforcing += 1
            updated = rule.get("updated_generation")
            if updated is not None and applied < updated:
                notes.append(f"{name}: enforces it with its expiry before generation {updated}")
    return f"{enforcing}/{len(services)} hosts", notes


@command("why", "why is this address blocked: every rule containing it, its sources, and which hosts enforce it",
         arg("address", help="an address (or a CIDR)"), columns="why")
def why(client: AdminClient, args: argparse.Namespace) -> Result:
    found = client.rules_containing(args.address)["rules"]
    # A network may be blocked in parts only: the rules inside it (narrower than it), up to WHY_INSIDE_SHOWN.
    inside = _narrower_rules(client, args.address, found)
    services = client.services()["services"]
    rows, details = [], []
    for number, rule in enumerate(found + inside[:WHY_INSIDE_SHOWN]):
        enforced, notes = _enforcement(rule, services)
        # "covers": all of the address (or network), or a part of it (a narrower rule inside a network).
        rows.append({**rule, "enforced": enforced, "covers": "all" if number < len(found) else "part"})
        details += [f"  rule {rule['id']}: {note}" for note in notes]
    payload = {"address": args.address, "rules": rows[:len(found)], "inside": rows[len(found):],
               "services": services}
    if not rows:
        return Result(payload, [], empty=f"{args.address} is not blocked by any live rule")
    shown = f"{count(len(inside), 'narrower rule')}" if len(inside) <= WHY_INSIDE_SHOWN else \
        f"more than {WHY_INSIDE_SHOWN} narrower rules (the first {WHY_INSIDE_SHOWN} shown; provfw rules --within " \
        f"{args.address} lists them all)"
    if not found:
        verb = "blocks" if len(inside) == 1 else "block"
        heading = f"{args.address} is not blocked as a whole; {shown} inside it {verb} parts of it:"
    elif inside:
        heading = (f"{args.address} is blocked by {count(len(found), 'rule')}, most specific first, then "
                   f"{shown} inside it:")
    else:
        heading = f"{args.address} is blocked by {count(len(found), 'rule')}, most specific first:"
    return Result(payload, rows, heading=heading, details=details)


WHY_INSIDE_SHOWN = 20


def _narrower_rules(client: AdminClient, address: str, containing: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Up to WHY_INSIDE_SHOWN + 1 live rules strictly inside ``address`` when it is a network (none for an
    address: a /32 or /128 has nothing inside it but itself, which ``contains`` already answers).

    ``within`` answers the network's own rules too (``containing`` holds them: one per protocol of a block);
    the page is that much longer, so that they never hide a narrower rule past WHY_INSIDE_SHOWN."""
    try:
        network = rules.parse_network(address)
    except exception.InvalidInput:
        return []                                           # the server's "contains" answer says what is wrong
    if network.prefixlen == network.max_prefixlen:
        return []
    own = sum(1 for rule in containing if rule["cidr"] == network.with_prefixlen)
    page = client.list_rules_page(limit=WHY_INSIDE_SHOWN + 1 + own, within=network.with_prefixlen)["rules"]
    return [rule for rule in page if rule["cidr"] != network.with_prefixlen][:WHY_INSIDE_SHOWN + 1]


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
    return name, text.split("\n") if text else []


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    rate = done / max(time.monotonic() - started, 1e-6)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} lines  {rate:,.0f}/s")
    sys.stderr.flush()


def default_source(path: str) -> str:
    """``import:<file name>`` (``import:stdin`` for ``-``), with what a source name cannot hold replaced."""
    base = "stdin" if path == "-" else os.path.basename(path.rstrip("/")) or "file"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip("._-")[:64] or "file"
    return f"import:{name}"


_LINE_FORMATS = ("plain", "spamhaus", "ipsum")


def _replace_needs_a_source(args: argparse.Namespace) -> str | None:
    # A replace deletes the source's rules that are not in the list: which list it replaces is said, never
    # guessed from a file name (a renamed file would replace, or start, another list).  As the API requires.
    if args.mode == "replace" and not args.source:
        return "--mode replace needs --source NAME: the list it replaces (see provfw sources)"
    return None


@command("import", "import a block list (plain, FireHOL, Spamhaus, IPsum, DShield, CSV; docs/feeds.md) from a "
                   "file or - for stdin",
         arg("file", help="the file to read, or - for standard input"), _PROTOCOL, _DESCRIPTION, _TTL,
         arg("--source", metavar="NAME",
             help="the source: import:NAME (default: import:<file name>; required with --mode replace)"),
         arg("--mode", choices=("add", "replace"), default="add",
             help="add (default) to the source, or replace: the source's rules become exactly this list, in one "
                  "request (refused past the guard unless --force)"),
         arg("--format", choices=(formats.AUTO, *formats.FORMATS, *formats.FORMAT_ALIASES), default=formats.AUTO,
             help="the list's format (default: auto, detected from its first lines)"),
         arg("--csv-column", metavar="NAME", help="CSV: the address column's header name"),
         arg("--dry-run", action="store_true", help="say what would be added, renewed, removed and refused; change "
                                                    "nothing"),
         arg("--force", action="store_true", help="replace even past the guard (the list really shrank)"),
         _ALLOW_NON_GLOBAL,
         arg("--chunk", type=Number(1), default=IMPORT_CHUNK_LINES, metavar="LINES",
             help=f"add mode, one-entry-a-line formats: lines per request, each one transaction and one cast "
                  f"(default: {IMPORT_CHUNK_LINES})"),
         arg("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal"),
         columns="imported", check=_replace_needs_a_source)
def import_(client: AdminClient, args: argparse.Namespace) -> Result:
    name, lines = read_source(args.file)
    source = args.source or default_source(args.file)
    if lines and lines[-1] == "":
        lines.pop()
    fmt = args.format if args.csv_column is None else "csv"
    if fmt == formats.AUTO:
        fmt = formats.detect_format("\n".join(lines[:200]))
    fmt = formats.FORMAT_ALIASES.get(fmt, fmt)
    options = dict(protocol=args.protocol, description=args.description, source=source, mode=args.mode,
                   format=fmt, column=args.csv_column, dry_run=args.dry_run, force=args.force,
                   allow_non_global=args.allow_non_global)
    # A list whose entries stand one a line can go in chunks (each its own transaction: a progress bar, and a
    # failure part way loses nothing already sent).  A replace, a dry run, or a format with a header is one
    # request: the whole list is the unit.
    chunked = args.mode == "add" and not args.dry_run and fmt in _LINE_FORMATS and len(lines) > args.chunk
    if chunked and args.ttl is not None:
        # One expiry for the whole list, so a later chunk repeating an earlier entry is not a renewal.
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=math.ceil(args.ttl))
        options["expires_at"] = expires.isoformat(timespec="seconds").replace("+00:00", "Z")
    else:
        options["ttl"] = args.ttl
    answers: list[tuple[int, Mapping[str, Any]]] = []           # (the chunk's first line - 1, its answer)
    started = time.monotonic()
    show = chunked and (sys.stderr.isatty() or args.progress)
    step = args.chunk if chunked else max(len(lines), 1)
    # An empty file still sends one (empty) request, so the answer carries the current generation.
    for start in range(0, max(len(lines), 1), step):
        chunk = lines[start:start + step]
        try:
            answer = client.import_rules(chunk, **options)
        except (AdminClientError, APIUnreachable) as exc:
            if start == 0:
                raise
            raise CommandError(
                f"{exc}; lines 1-{start:,} of {name} were imported (generation {answers[-1][1]['generation']}), "
                "the rest were not. Importing the whole file again is safe: rules already present count as "
                "duplicate."
            ) from None
        answers.append((start, answer))
        if show:
            _progress(min(start + step, len(lines)), len(lines), started)
    if show:
        sys.stderr.write("\n")
    totals = merge_import_answers(answers)
    accepted = totals["added"] + totals["renewed"] + totals["duplicate"]
    # Some refused lines are a list's normal state (one bad line never costs the rest); all of them refused
    # is an import that went wrong (the wrong --format, the wrong file), and a script must be able to tell.
    failed = (f"every entry of {name} was refused ({totals['refused']:,}); nothing was imported"
              if totals["refused"] and not accepted else None)
    guard = totals.get("guard") or {}
    if failed is None and totals["dry_run"] and guard.get("tripped") and not args.force:
        # A dry run answers "would the real one pass?": as nft -c does for a rule set, it fails when the real
        # import would be refused, so that "provfw import --dry-run ... && provfw import ..." stops there.
        failed = ("the replace guard would refuse this import (HTTP 409); nothing was changed; add --force "
                  "if the list really shrank")
    details = _import_details(totals, args)
    if not accepted and not totals["refused"] and not totals.get("removed") and not totals.get("deleted"):
        # An empty standard input or file is no error (an empty list adds nothing), but rarely what was meant.
        details.append(f"  {name} held no entries (only blank lines and comments, or nothing at all)")
    return Result(totals, [totals], _import_sentence(name, totals, args), details, failed=failed)


_SUMMED = ("added", "renewed", "duplicate", "removed", "deleted", "refused", "non_global_allowed")


def merge_import_answers(answers: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """The one answer an import prints (``-o json``) from the API's answers to its requests, in order, each with
    the number of lines before its chunk.

    One request (every import but a chunked add): its answer, exactly as the API sent it.  Chunks: an answer
    of the same fields, those of the last chunk's answer (``generation``, ``source``, ``format``...) but for
    the counts (``added``, ``renewed``, ``duplicate``, ``removed``, ``deleted``, ``refused``,
    ``non_global_allowed``), summed; ``refused_lines``, every chunk's (up to 1,000 each), numbered in the
    file; and ``notified``, true when every chunk that changed something was notified (false when one was
    not, null when no chunk changed anything).
    """
    if len(answers) == 1:
        return dict(answers[0][1])
    merged = dict(answers[-1][1])
    for key in _SUMMED:
        if key in merged:
            merged[key] = sum(answer.get(key, 0) for _, answer in answers)
    merged["refused_lines"] = [{**refused, "line": refused["line"] + start}
                               for start, answer in answers for refused in answer.get("refused_lines") or ()]
    if "notified" in merged:
        told = [answer["notified"] for _, answer in answers if answer.get("notified") is not None]
        merged["notified"] = all(told) if told else None
    return merged


def _import_sentence(name: str, totals: Mapping[str, Any], args: argparse.Namespace) -> str:
    counts = f"{totals['added']:,} added, {totals['renewed']:,} renewed, {totals['duplicate']:,} duplicate"
    if totals["mode"] == "replace":
        counts = (f"{totals['added']:,} added, {totals['removed']:,} removed ({totals['deleted']:,} deleted), "
                  f"{totals['renewed']:,} renewed, {totals['duplicate']:,} duplicate")
    counts += f", {totals['refused']:,} refused"
    # The format the list was read as, so a mis-detected one shows at once (a header-less CSV read as plain).
    detected = args.format == formats.AUTO and args.csv_column is None
    what = f"{name} ({totals['format']}{', detected' if detected else ''})"
    verb = f"replaced {totals['source']} with {what}" if totals["mode"] == "replace" else \
        f"imported {what} into {totals['source']}"
    if totals["dry_run"]:
        return f"dry run, nothing changed: {verb} would give {counts} (generation stays {totals['generation']})"
    return f"{verb}: {counts}, generation {totals['generation']}"


def _import_details(totals: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    details = []
    guard = totals.get("guard")
    if guard and guard.get("tripped"):
        verdict = ("refuses this" if not args.force else
                   "would be passed with --force" if args.dry_run else "was passed with --force")
        details.append(f"  the replace guard {verdict}: "
                       f"it removes {guard['removing']:,} of the {guard['in_force']:,} rules in force "
                       f"(more than {guard['max_fraction']:.0%})")
    details += _refused_details(totals["refused_lines"][:REFUSED_SHOWN])
    if totals["refused"] > len(totals["refused_lines"][:REFUSED_SHOWN]):
        more = count(totals["refused"] - min(len(totals["refused_lines"]), REFUSED_SHOWN), "more refused line")
        details.append(f"  ... {more} (-o json lists up to 1,000 per request)")
    if any("allow_non_global" in r["reason"] for r in totals["refused_lines"]) and not args.allow_non_global:
        details.append("  (non-global ranges are blocked only with --allow-non-global, which is audited)")
    return details


def _refused_details(refused: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per refused line of a list: its number, the text it had (when it had any) and the reason."""
    return [f"  line {r['line']}: {r['value']}: {r['reason']}" if r.get("value") else
            f"  line {r['line']}: {r['reason']}" for r in refused]


# ---------------------------------------------------------------- feeds

def _feed_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"format": args.format, "column": args.csv_column, "protocol": args.protocol, "from_port": args.from_port,
            "to_port": args.to_port, "ttl": args.ttl, "allow_non_global": args.allow_non_global,
            "description": args.description}


_FEED_OPTIONS = (
    arg("--format", choices=(formats.AUTO, *formats.FORMATS, *formats.FORMAT_ALIASES),
        help="the list's format (default: auto)"),
    arg("--csv-column", metavar="NAME", help="CSV: the address column's header name"),
    arg("--protocol", choices=rules.PROTOCOLS, help="what the rules block (default: all)"),
    arg("--from-port", type=PORT, help="first destination port (tcp/udp), or the ICMP type"),
    arg("--to-port", type=PORT, help="last destination port (tcp/udp), or the ICMP code"),
    arg("--ttl", type=SECONDS, metavar="SECONDS",
        help="listed rules expire this long after the last sync that saw them (at least twice the interval)"),
    arg("--allow-non-global", action="store_true", default=None,
        help="block the non-global ranges the list names too (audited)"),
    _DESCRIPTION,
)


@command("feed list", "the feeds and their last sync", columns="feed")
def feed_list(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.list_feeds()
    return Result(rows, rows, empty="no feeds")


@command("feed show", "one feed: settings, last sync, counts and refused lines", arg("name"), columns="feed-detail")
def feed_show(client: AdminClient, args: argparse.Namespace) -> Result:
    feed = client.get_feed(args.name)
    refused = (feed.get("counts") or {}).get("refused_lines") or []
    return Result(feed, [feed], record=True, details=_refused_details(refused))


@command("feed add", "subscribe to a block list: the conductor fetches it every INTERVAL seconds and replace-syncs "
                     "its rules (source feed:NAME)",
         arg("name", help="1-64 letters, digits, '.', '_' or '-'"),
         arg("list_url", metavar="URL", help="where the list is: http:// or https://"),
         arg("--interval", type=Number(1, MAX_FEED_INTERVAL), default=3600, metavar="SECONDS",
             help="seconds between syncs (default: 3600)"),
         *_FEED_OPTIONS, arg("--disabled", action="store_true", help="create it disabled"),
         columns="feed")
def feed_add(client: AdminClient, args: argparse.Namespace) -> Result:
    answer = client.create_feed_answer(args.name, args.list_url, args.interval,
                                       enabled=False if args.disabled else None, **_feed_settings(args))
    feed = answer["feed"]
    state = "disabled" if not feed["enabled"] else "the conductor syncs it at its next poll"
    return Result(answer, [feed], f"added feed {feed['name']} ({feed['source']}): every "
                                  f"{feed['interval']:,} s from {feed['url']}; {state}")


@command("feed set", "change a feed's settings",
         arg("name"), arg("--list-url", metavar="URL", help="where the list is (--url is the API's)"),
         arg("--interval", type=Number(1, MAX_FEED_INTERVAL), metavar="SECONDS"), *_FEED_OPTIONS,
         arg("--enable", dest="enabled", action="store_true", default=None, help="sync it again"),
         arg("--disable", dest="enabled", action="store_false", help="stop syncing it (its rules stay)"),
         columns="feed")
def feed_set(client: AdminClient, args: argparse.Namespace) -> Result:
    answer = client.update_feed_answer(args.name, url=args.list_url, interval=args.interval, enabled=args.enabled,
                                       **_feed_settings(args))
    feed = answer["feed"]
    return Result(answer, [feed], f"changed feed {feed['name']}: {'enabled' if feed['enabled'] else 'disabled'}, "
                                  f"next sync {feed['next_sync'] or 'never'}")


@command("feed sync", "sync a feed now and wait for the conductor's result",
         arg("name"),
         arg("--force", action="store_true", help="apply the list even past the replace guard or if it is empty"),
         arg("--no-wait", dest="wait", action="store_false", help="only ask; do not wait for the result"),
         arg("--timeout", type=Number(0, fractions=True), default=120, metavar="SECONDS",
             help="how long to wait (default: 120)"),
         columns="feed-synced")
def feed_sync(client: AdminClient, args: argparse.Namespace) -> Result:
    before = client.get_feed(args.name).get("last_sync")
    answer = client.sync_feed_answer(args.name, force=args.force)
    if not args.wait:
        return Result(answer, [answer["feed"]], f"feed {args.name} is due now; the next conductor poll syncs it")
    deadline = time.monotonic() + args.timeout
    while True:
        # What -o json prints is the answer that reports the sync: the feed as GET /v1/feeds/NAME answers it.
        answer = client.get_feed_answer(args.name)
        feed = answer["feed"]
        if feed.get("last_sync") != before and not feed.get("syncing"):
            break
        if time.monotonic() > deadline:
            raise CommandError(f"feed {args.name}: no conductor synced it within {args.timeout:g} s; is "
                               "provfw-conductor running? (the request stands: it syncs when one runs)")
        time.sleep(0.2)
    counts = feed.get("counts") or {}
    status = feed.get("last_status")
    if status == "ok":
        message = (f"synced feed {args.name}: {counts.get('added', 0):,} added, {counts.get('removed', 0):,} "
                   f"removed, {counts.get('renewed', 0):,} renewed, {counts.get('refused', 0):,} refused, "
                   f"{feed.get('rules', 0):,} rules, generation {feed.get('last_generation')}")
    elif status in ("not_modified", "unchanged"):
        message = f"synced feed {args.name}: the list has not changed ({status}), {feed.get('rules', 0):,} rules"
    else:
        raise CommandError(f"feed {args.name}: {status}: {feed.get('last_error')}; the rules of its last good list "
                           "stay in force")
    return Result(answer, [feed], message)


@command("feed remove", "unsubscribe: delete the feed and release its rules (rules other sources want stay)",
         arg("name"), columns="feed-deleted")
def feed_remove(client: AdminClient, args: argparse.Namespace) -> Result:
    answer = client.delete_feed(args.name)
    return Result(answer, [answer], f"removed feed {args.name}: {count(answer['removed'], 'rule')} released, "
                                    f"{answer['deleted']:,} deleted, generation {answer['generation']}")


# ---------------------------------------------------------------- operations

@command("services", "compute workers and what they applied", columns="service")
def services(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.services()["services"]
    return Result(rows, rows, empty="no compute worker has reported yet")


@command("audit", "recent audit records, newest first (admin tokens only)",
         arg("--limit", type=Number(1, MAX_AUDIT_LIMIT), default=20,
             help=f"how many records, 1 to {MAX_AUDIT_LIMIT} (default: 20)"), columns="audit")
def audit(client: AdminClient, args: argparse.Namespace) -> Result:
    rows = client.audit_log(args.limit)
    return Result(rows, rows, empty="no audit records")
