"""``provfw``: the admin command line, built on AdminClient.

Design: the commands live in ``provfw.cli.commands`` (one registry, columns
declared in one table), printing in ``provfw.cli.output`` (pure), and this
module builds the parser and runs one command.  The common options (-o, -c,
--json, --url, --token, --version) are added to the top-level parser AND to
every command's parser, with ``SUPPRESS`` defaults so that an option given
before the command is not overwritten by the command parser's default; the
real defaults are applied after parsing.  Exit status: 0 ok, 1 error (the
server refused, the API could not be reached, a file could not be read),
2 usage (bad arguments, a number out of its range included; no token).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import urllib.parse

import provfw
from provfw.adminclient import AdminClient, AdminClientError, APIUnreachable
from provfw.cli import output
from provfw.cli.commands import COMMANDS, CommandError

DEFAULT_URL = "http://127.0.0.1:8774"
DEFAULT_STATE_PATH = "~/.local/state/provfw"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EPILOG = f"""\
Options may come before or after the command: 'provfw rules -o json' = 'provfw -o json rules'.

output (-o):
  table   aligned columns for people (default); a change answers in one line
  json    the API's complete answer (--json is the same)
  value   bare values for scripts: one row a line, tab separated, no header;
          choose and order the columns with -c NAME (repeatable)
  Empty values print as '-' in table and value output.

credentials:
  URL     --url, else $PROVFW_URL, else {DEFAULT_URL}
  token   --token, else $PROVFW_TOKEN, else the file admin-token that provfw-all-in-one
          writes in $PROVFW_STATE_PATH (default {DEFAULT_STATE_PATH})

exit status:
  0  success
  1  error: the server refused, the API could not be reached, a file could not be read, or every
     entry of an import was refused (its answer is printed first)
  2  usage: bad command line (an unknown option, a number not finite or out of its range), or no token
"""


class UsageError(Exception):
    """Something the caller must fix in how provfw was invoked (exit status 2)."""


def version() -> str:
    """The installed distribution's version, or the package's when running from a source tree."""
    try:
        return importlib.metadata.version("provfw")
    except importlib.metadata.PackageNotFoundError:
        return provfw.__version__


def state_path() -> str:
    """Where provfw-all-in-one keeps its state (and admin-token): $PROVFW_STATE_PATH or the default."""
    return provfw.default_state_path()


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output options")
    out.add_argument("-o", "--output", choices=output.MODES, default=argparse.SUPPRESS,
                     help="table (default), json or value")
    out.add_argument("--json", dest="output", action="store_const", const="json", default=argparse.SUPPRESS,
                     help="same as -o json")
    out.add_argument("-c", "--column", dest="columns", action="append", metavar="NAME", default=argparse.SUPPRESS,
                     help="print only this column (repeatable; table and value output)")
    conn = common.add_argument_group("connection options")
    conn.add_argument("--url", default=argparse.SUPPRESS, help=f"the API (default: $PROVFW_URL or {DEFAULT_URL})")
    conn.add_argument("--token", default=argparse.SUPPRESS,
                      help="API token (default: $PROVFW_TOKEN, else the all-in-one's admin-token file)")
    common.add_argument("--version", action="version", version=f"provfw {version()}")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The parser of every registered command; a parsed namespace's ``command`` names the one to run, and
    ``parser.command_parsers[command]`` is its own parser (whose usage a mistake in its options prints)."""
    common = _common_options()
    parser = argparse.ArgumentParser(prog="provfw", description="provfw admin client: block CIDRs on every "
                                     "hypervisor, list and remove rules, watch the workers.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    groups = {(): parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)}
    parser.command_parsers = {}
    for name, command in COMMANDS.items():
        words = tuple(name.split())
        for depth in range(1, len(words)):  # "feed list": the group "feed" first
            path = words[:depth]
            if path not in groups:
                group = groups[path[:-1]].add_parser(path[-1], help=f"{path[-1]} commands", parents=[common])
                groups[path] = group.add_subparsers(dest="_".join(path) + "_command", metavar="COMMAND",
                                                    required=True)
        sub = groups[words[:-1]].add_parser(
            words[-1], help=command.help, description=command.help, parents=[common],
            epilog=f"columns (-c): {', '.join(column.name for column in command.columns)}")
        for flags, options in command.arguments:
            sub.add_argument(*flags, **options)
        sub.set_defaults(command=name)
        parser.command_parsers[name] = sub
    return parser


def _token(given: str | None) -> tuple[str, str]:
    """(token, where it came from); raises UsageError when there is none."""
    if given:
        return given, "--token"
    if os.environ.get("PROVFW_TOKEN"):
        return os.environ["PROVFW_TOKEN"], "$PROVFW_TOKEN"
    path = os.path.join(state_path(), "admin-token")
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        token = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the admin token in {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if token:
        return token, path
    raise UsageError("no token; pass --token or set PROVFW_TOKEN (create one with "
                     f"'provfw-manage token create --name NAME --role admin'; provfw-all-in-one writes one to {path})")


def _url(given: str | None) -> str:
    url = given or os.environ.get("PROVFW_URL") or DEFAULT_URL
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url {url!r} is not an http:// or https:// URL")
    return url


def _write(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``provfw`` with ``argv`` (default: sys.argv[1:]); returns the exit status (see EPILOG)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # exits 2 on a usage error, 0 after --help / --version
    command = COMMANDS[args.command]
    # A mistake in a command's options prints that command's usage, not provfw's (newcomer trial: `provfw rules
    # --bogus` showed the top-level usage while `provfw rules -o yaml` showed the command's).
    command_parser = parser.command_parsers[args.command]
    if extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    problem = command.check(args) if command.check is not None else None
    if problem:
        command_parser.error(problem)
    mode = getattr(args, "output", "table")
    selected = getattr(args, "columns", None)
    if selected:
        try:
            output.visible_columns(command.columns, [], selected)
        except ValueError as exc:
            command_parser.error(str(exc))
    try:
        url = _url(getattr(args, "url", None))
        token, token_source = _token(getattr(args, "token", None))
    except UsageError as exc:
        print(f"provfw: {exc}", file=sys.stderr)
        return EXIT_USAGE

    try:
        result = command.run(AdminClient(url, token), args)
        _write(output.render(result, command.columns, mode, selected))
        if result.failed:
            print(f"provfw: {result.failed}", file=sys.stderr)
            return EXIT_ERROR
    except AdminClientError as exc:
        hint = f" (the token came from {token_source})" if exc.status == 401 else ""
        print(f"provfw: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except (APIUnreachable, CommandError) as exc:
        print(f"provfw: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("provfw: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`provfw rules -o value | head -1`): no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    return EXIT_OK
