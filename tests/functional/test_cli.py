"""The ``provfw`` CLI against the real provfw-api WSGI application, served over HTTP on 127.0.0.1 by a thread,
on SQLite and the in-process bus.  Output and options are checked in-process through ``main``; standard input,
exit statuses and ``--version`` through the installed entry point run as a subprocess (``python -m provfw.cli``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from wsgiref import simple_server

import pytest
import requests

from provfw import cli
from provfw.api import router, schemas
from provfw.compute import api as compute_api
from provfw.conductor import feeds as conductor_feeds
from provfw.db import api as db
from tests.lib import services
from tests.lib.httpserver import FeedServer, data_file

pytestmark = pytest.mark.functional


class _QuietHandler(simple_server.WSGIRequestHandler):
    def log_message(self, *args):  # the test output is for failures, not for access logs
        pass


@dataclasses.dataclass
class Api:
    url: str
    admin: str
    reader: str


@pytest.fixture
def api(conf, sqlite_db):
    conf.set_override("control_exchange", "cli-test-" + secrets.token_hex(4))
    compute = compute_api.ComputeAPI(conf)
    server = simple_server.make_server("127.0.0.1", 0, router.build_app(conf, compute), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Api(f"http://127.0.0.1:{server.server_port}", db.api_token_create("cli-admin", "admin"),
                  db.api_token_create("cli-reader", "reader"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        compute.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """No credentials from the environment of whoever runs the tests."""
    for name in ("PROVFW_TOKEN", "PROVFW_URL", "PROVFW_STATE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@dataclasses.dataclass
class Ran:
    code: int
    out: str
    err: str


def provfw(capsys, *argv: str) -> Ran:
    """Run ``main`` in this process (argparse's usage errors exit through SystemExit)."""
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return Ran(code, captured.out, captured.err)


def admin(capsys, api: Api, *argv: str) -> Ran:
    """``provfw ARGV --url URL --token ADMIN``, the connection options AFTER the command."""
    return provfw(capsys, *argv, "--url", api.url, "--token", api.admin)


def run(*argv: str, stdin: bytes | None = None, env: dict | None = None, wrapper: tuple[str, ...] = ()) -> Ran:
    """``[WRAPPER] python -m provfw.cli ARGV`` as a subprocess, without the caller's PROVFW_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROVFW_")}
    proc = subprocess.run([*wrapper, sys.executable, "-m", "provfw.cli", *argv], input=stdin or b"",
                          capture_output=True, env={**base, **(env or {})}, timeout=60)
    return Ran(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture
def refused_port():
    """A port on 127.0.0.1 bound but not listening: connecting is refused for as long as the test holds it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# ---------------------------------------------------------------- the new user's failing cases

def test_options_work_after_the_subcommand_as_well_as_before(api, home, capsys):
    assert admin(capsys, api, "rule-add", "198.51.100.7").code == 0

    after = admin(capsys, api, "rules", "--json")
    assert after.code == 0, after.err
    (rule,) = json.loads(after.out)
    assert rule["cidr"] == "198.51.100.7/32"

    before = provfw(capsys, "--url", api.url, "--token", api.admin, "-o", "json", "rules")
    assert json.loads(before.out) == json.loads(after.out)
    mixed = provfw(capsys, "--url", api.url, "-o", "table", "rules", "--token", api.admin, "-o", "value")
    assert mixed.out.split("\t")[:2] == [str(rule["id"]), "198.51.100.7/32"], "the later -o wins"


def test_a_list_prints_as_table_json_and_value_with_a_dash_for_empty_values(api, home, capsys):
    admin(capsys, api, "rule-add", "198.51.100.0/24", "--protocol", "tcp", "--from-port", "22", "--to-port", "22",
          "--description", "ssh brute force")
    admin(capsys, api, "rule-add", "2001:db8::/32")

    table = admin(capsys, api, "rules")
    assert table.code == 0
    header, *lines = table.out.splitlines()
    assert header.split() == ["id", "cidr", "protocol", "from_port", "to_port", "expires_at", "source",
                              "description"]
    assert len(lines) == 2 and "None" not in table.out
    assert lines[1].split() == [lines[1].split()[0], "2001:db8::/32", "all", "-1", "-1", "-", "manual", "-"]

    rows = json.loads(admin(capsys, api, "rules", "-o", "json").out)
    assert [r["cidr"] for r in rows] == ["198.51.100.0/24", "2001:db8::/32"]
    assert rows[0]["description"] == "ssh brute force" and rows[1]["expires_at"] is None  # JSON stays exact
    assert {"created_by", "created_at", "generation"} <= set(rows[0]), "json is the API's complete answer"

    value = admin(capsys, api, "rules", "-o", "value")
    assert value.out.splitlines() == [
        f"{rows[0]['id']}\t198.51.100.0/24\ttcp\t22\t22\t-\tmanual\tssh brute force",
        f"{rows[1]['id']}\t2001:db8::/32\tall\t-1\t-1\t-\tmanual\t-",
    ]


def test_a_mutation_answers_in_one_line_with_the_full_answer_behind_json(api, home, capsys):
    blocked = admin(capsys, api, "block", "203.0.113.9/24", "--description", "scanner")
    assert blocked.code == 0, blocked.err
    generation = json.loads(admin(capsys, api, "rules", "-o", "json").out)[0]["generation"]
    assert blocked.out == f"blocked 203.0.113.0/24: 3 rules added, generation {generation}\n"

    admin(capsys, api, "unblock", "203.0.113.0/24")
    as_json = json.loads(admin(capsys, api, "block", "203.0.113.0/24", "-o", "json").out)
    assert as_json["message"] == "Added 3 rules" and len(as_json["rules"]) == 3
    admin(capsys, api, "unblock", "203.0.113.0/24")
    value = admin(capsys, api, "block", "203.0.113.0/24", "-o", "value").out
    assert value == f"203.0.113.0/24\t3\t{as_json['generation'] + 2}\n"

    unblocked = admin(capsys, api, "unblock", "203.0.113.0/24")
    assert unblocked.out == f"unblocked 203.0.113.0/24: 3 rules deleted, generation {as_json['generation'] + 3}\n"


def test_one_rule_is_added_shown_and_deleted_in_words(api, home, capsys):
    added = admin(capsys, api, "rule-add", "198.51.100.0/24", "--protocol", "tcp", "--from-port", "22",
                  "--to-port", "22", "-o", "value", "-c", "id")
    rule_id = added.out.strip()
    generation = admin(capsys, api, "rule-show", rule_id, "-o", "value", "-c", "generation").out.strip()
    assert admin(capsys, api, "rule-add", "192.0.2.1", "--protocol", "icmp", "--from-port", "8").out == \
        f"added rule {int(rule_id) + 1}: icmp type 8 from 192.0.2.1/32, generation {int(generation) + 1}\n"

    shown = admin(capsys, api, "rule-show", rule_id).out.splitlines()
    assert shown[0].split() == ["id", rule_id] and ["protocol", "tcp"] in [line.split() for line in shown]
    assert ["description", "-"] in [line.split() for line in shown]

    deleted = admin(capsys, api, "rule-delete", rule_id)
    assert deleted.out == f"deleted rule {rule_id}, generation {int(generation) + 2}\n"
    assert json.loads(admin(capsys, api, "rule-delete", str(int(rule_id) + 1), "--json").out) == \
        {"deleted": int(rule_id) + 1, "generation": int(generation) + 3}


def test_empty_listings_say_so_in_a_table_and_print_nothing_as_values(api, home, capsys):
    assert admin(capsys, api, "blocks").out == "no blocked CIDRs\n"
    assert admin(capsys, api, "rules").out == "no rules\n"
    assert admin(capsys, api, "sources").out == "no sources: no live rule is wanted by any source\n"
    # A bare source name means manual:NAME when listing, as when blocking; an import's is import:NAME.
    assert admin(capsys, api, "rules", "--source", "newcomer").out == "no rules of source manual:newcomer\n"
    assert admin(capsys, api, "rules", "--source", "import:x").out == "no rules of source import:x\n"
    assert admin(capsys, api, "services", "-o", "value").out == ""
    assert json.loads(admin(capsys, api, "rules", "-o", "json").out) == []


def test_services_print_a_dash_not_none_for_what_a_worker_has_not_reported(api, home, capsys):
    db.service_update("hv-1", heartbeat=True, driver="ipset", applied_generation=0, rule_count=0)
    table = admin(capsys, api, "services")
    (row,) = json.loads(admin(capsys, api, "services", "--json").out)
    assert row["last_error"] is None
    # The quarantined column appears once the API reports each worker's quarantine list.
    quarantined = [["quarantined"], ["0"]] if "quarantine" in row else [[], []]
    header, line = table.out.splitlines()
    assert header.split() == ["host", "state", "in_sync", "applied_generation", "rule_count", *quarantined[0],
                              "driver", "last_error"]
    assert line.split() == ["hv-1", "up", "true", "0", "0", *quarantined[1], "ipset", "-"]
    assert "None" not in table.out


def test_the_audit_log_shows_who_blocked_what_and_why(api, home, capsys):
    admin(capsys, api, "block", "203.0.113.0/24", "--description", "scanner")
    value = admin(capsys, api, "audit", "-o", "value", "-c", "actor", "-c", "action", "-c", "cidr",
                  "-c", "count", "-c", "reason")
    assert value.out.splitlines()[0] == "cli-admin\tcidr.block\t203.0.113.0/24\t3\tscanner"


def test_the_audit_log_shows_a_purge_with_its_count(api, home, capsys):
    # An operator trial: once `provfw-manage db purge` had deleted rows, `provfw audit` ended in a traceback
    # (its table read the purge's count of rules as a list of rules).
    import datetime

    import sqlalchemy as sa

    from provfw.db.sqlalchemy import models

    admin(capsys, api, "block", "203.0.113.0/24")
    admin(capsys, api, "unblock", "203.0.113.0/24")
    admin(capsys, api, "block", "198.51.100.0/24")
    with db.get_engine().begin() as conn:
        conn.execute(sa.update(models.ProviderFirewallRule.__table__).where(models.ProviderFirewallRule.deleted != 0)
                     .values(deleted_at=models.utcnow() - datetime.timedelta(days=40)))
    assert db.provider_fw_purge_deleted(models.utcnow() - datetime.timedelta(days=30),
                                        audit=db.Audit("provfw-manage")).rules == 3
    table = admin(capsys, api, "audit")
    assert table.code == 0, table.err
    value = admin(capsys, api, "audit", "-o", "value", "-c", "actor", "-c", "action", "-c", "cidr", "-c", "count")
    assert value.out.splitlines()[0] == "provfw-manage\tdb.purge\t-\t3"


def test_refused_lines_show_their_text_and_the_cli_flag_that_lets_non_global_ranges_through(api, home, capsys,
                                                                                            tmp_path):
    # Found by a newcomer: the table output gave only the line number and the reason, and the reason named
    # the API's allow_non_global, not the CLI's flag.
    feed = tmp_path / "mixed.txt"
    feed.write_text("203.0.113.7\n192.168.1.1\n1.2.3.4 5 6\n")
    result = admin(capsys, api, "import", str(feed), "--dry-run")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[1].startswith("  line 2: 192.168.1.1/32: ") and "private" in lines[1]
    assert lines[2].startswith("  line 3: 1.2.3.4 5 6: expected one address")
    assert lines[3] == "  (non-global ranges are blocked only with --allow-non-global, which is audited)"
    allowed = admin(capsys, api, "import", str(feed), "--dry-run", "--allow-non-global")
    assert "--allow-non-global" not in allowed.out and allowed.out.count("\n  line ") == 1


def test_import_counts_and_lists_refused_lines_numbered_across_chunks(api, home, capsys, tmp_path):
    feed = tmp_path / "blocklist.txt"
    feed.write_text("# feed\n192.0.2.1\n192.0.2.2\nbogus\n192.0.2.1\n10.0.0.0/0\n192.0.2.3\n")
    result = admin(capsys, api, "import", str(feed), "--chunk", "2")
    assert result.code == 0, result.err
    first, *refused = result.out.splitlines()
    generation = json.loads(admin(capsys, api, "rules", "--json").out)[-1]["generation"]
    assert first == (f"imported {feed} (plain, detected) into import:blocklist.txt: "
                     f"3 added, 0 renewed, 1 duplicate, 2 refused, generation {generation}")
    assert [line.split(":")[0].strip() for line in refused] == ["line 4", "line 6"]  # numbered in the file
    assert "'bogus'" in refused[0]

    again = json.loads(admin(capsys, api, "import", str(feed), "--chunk", "4", "-o", "json").out)
    assert (again["added"], again["duplicate"], again["refused"]) == (0, 4, 2)
    assert [r["line"] for r in again["refused_lines"]] == [4, 6]


def test_import_of_many_refused_lines_shows_the_first_ones_and_counts_the_rest(api, home, capsys, tmp_path):
    feed = tmp_path / "junk.txt"
    feed.write_text("".join(f"junk{i}\n" for i in range(25)))
    result = admin(capsys, api, "import", str(feed))
    lines = result.out.splitlines()
    assert lines[0].endswith("0 added, 0 renewed, 0 duplicate, 25 refused, generation 0")
    assert len(lines) == 1 + 20 + 1 and lines[-1].startswith("  ... 5 more refused lines")
    # Every entry refused is an import that went wrong: scripts see it in the exit status (newcomer trial).
    assert result.code == 1 and result.err == f"provfw: every entry of {feed} was refused (25); nothing was imported\n"


def test_an_import_read_in_the_wrong_format_fails_and_one_bad_line_does_not(api, home, capsys, tmp_path):
    ipsum = tmp_path / "ipsum.txt"
    ipsum.write_text("# IPsum\n198.51.100.7\t3\n198.51.100.8\t2\n")
    wrong = admin(capsys, api, "import", str(ipsum), "--format", "plain", "--dry-run", "-o", "json")
    assert wrong.code == 1 and json.loads(wrong.out)["refused"] == 2 and "was refused (2)" in wrong.err
    ipsum.write_text("# IPsum\n198.51.100.7\t3\nbogus\t2\n")
    partly = admin(capsys, api, "import", str(ipsum))
    assert partly.code == 0 and "(ipsum, detected)" in partly.out and "1 added" in partly.out and partly.err == ""


def test_an_import_refused_part_way_says_which_lines_were_imported(api, home, capsys, conf, tmp_path):
    conf.set_override("max_rules", 3)
    feed = tmp_path / "big.txt"
    feed.write_text("".join(f"192.0.2.{i}\n" for i in range(1, 6)))
    result = admin(capsys, api, "import", str(feed), "--chunk", "2")
    assert result.code == 1 and result.out == ""
    assert result.err.startswith("provfw: HTTP 409: ") and "max_rules" in result.err
    assert f"lines 1-2 of {feed} were imported (generation 1), the rest were not" in result.err
    assert len(json.loads(admin(capsys, api, "rules", "--json").out)) == 2


# ---------------------------------------------------------------- stdin, files, exit statuses (subprocess)

def test_import_dash_reads_standard_input(api, home, capsys):
    result = run("import", "-", "--ttl", "3600", "--url", api.url, "--token", api.admin,
                 stdin=b"192.0.2.10\n192.0.2.11\n# comment\n192.0.2.10\n")
    assert result.code == 0, result.err
    assert result.out.startswith("imported stdin (plain, detected) into import:stdin: "
                                 "2 added, 0 renewed, 1 duplicate, 0 refused, generation ")
    assert "cannot reach" not in result.err
    rows = json.loads(admin(capsys, api, "rules", "--json").out)
    assert [r["cidr"] for r in rows] == ["192.0.2.10/32", "192.0.2.11/32"]
    assert all(r["expires_at"] for r in rows), "--ttl reached the API"


def test_an_empty_import_says_the_list_held_no_entries(api, home):
    """A newcomer's 'provfw import - </dev/null' answered '0 added' and nothing else."""
    for stdin in (b"", b"# only a comment\n\n"):
        result = run("import", "-", "--dry-run", "--url", api.url, "--token", api.admin, stdin=stdin)
        assert result.code == 0, result.err
        assert result.out.splitlines()[1:] == [
            "  stdin held no entries (only blank lines and comments, or nothing at all)"], result.out
    result = run("import", "-", "--url", api.url, "--token", api.admin, stdin=b"192.0.2.77\n")
    assert "held no entries" not in result.out


def test_file_errors_say_what_is_wrong_with_the_file_never_cannot_reach(api, home, tmp_path):
    credentials = ("--url", api.url, "--token", api.admin)
    missing = run("import", str(tmp_path / "nope.txt"), *credentials)
    assert (missing.code, missing.err) == (1, f"provfw: cannot import {tmp_path / 'nope.txt'}: no such file\n")

    directory = run("import", str(tmp_path), *credentials)
    assert directory.code == 1 and "it is a directory" in directory.err

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("192.0.2.1\n# caf\u00e9\n".encode("latin-1"))
    not_utf8 = run("import", str(latin1), *credentials)
    assert not_utf8.code == 1 and "not UTF-8 text (byte 0xe9 on line 2)" in not_utf8.err

    for result in (missing, directory, not_utf8):
        assert "cannot reach" not in result.err and result.out == ""
    assert run("rules", "-o", "value", *credentials).out == "", "a file that could not be read imports nothing"


def test_an_unreadable_file_is_reported_as_not_readable(api, home, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("192.0.2.1\n")
    secret.chmod(0o000)
    wrapper: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root reads any file: run the CLI without the capabilities that let it
        services.require_tools("setpriv")
        wrapper = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    result = run("import", str(secret), "--url", api.url, "--token", api.admin, wrapper=wrapper)
    assert (result.code, result.err) == (1, f"provfw: cannot import {secret}: not readable (permission denied)\n")


def test_exit_status_is_0_ok_1_error_2_usage(api, home, tmp_path, refused_port):
    credentials = ("--url", api.url, "--token", api.admin)
    assert run("block", "203.0.113.0/24", *credentials).code == 0

    duplicate = run("block", "203.0.113.0/24", *credentials)
    assert (duplicate.code, duplicate.err) == (1, "provfw: HTTP 409: Duplicate rule. 0 rules added\n")
    as_json = run("block", "203.0.113.0/24", *credentials, "-o", "json")      # docs/design.md, "Exit status"
    assert (as_json.code, as_json.out, as_json.err) == (1, "", duplicate.err)
    bad_cidr = run("rule-add", "not-a-cidr", *credentials)
    assert bad_cidr.code == 1 and "HTTP 400" in bad_cidr.err
    forbidden = run("audit", "--url", api.url, "--token", api.reader)
    assert forbidden.code == 1 and "HTTP 403" in forbidden.err

    unreachable = run("rules", "--url", f"http://127.0.0.1:{refused_port}", "--token", api.admin)
    assert (unreachable.code, unreachable.err) == (
        1, f"provfw: cannot reach http://127.0.0.1:{refused_port}: Connection refused\n")
    missing = run("import", str(tmp_path / "nope.txt"), *credentials)
    assert missing.code == 1

    usage = run("rules", "--no-such-option", *credentials)
    assert usage.code == 2 and "unrecognized arguments: --no-such-option" in usage.err
    # Each mistake in a command's options prints that command's usage (newcomer trial: some printed provfw's).
    for argv in (["--no-such-option"], ["stray"], ["-o", "yaml"], ["-c", "colour"], ["-c", "colour", "-o", "value"]):
        mistake = run("rules", *argv, *credentials)
        assert mistake.code == 2 and mistake.err.startswith("usage: provfw rules "), (argv, mistake.err)
    assert run("feed", "show", "x", "--no-such-option", *credentials).err.startswith("usage: provfw feed show ")
    assert run("rules", "--url", "127.0.0.1:8774", "--token", api.admin).code == 2
    no_token = run("rules", "--url", api.url, env={"HOME": str(home)})
    assert no_token.code == 2 and "provfw-manage token create" in no_token.err


def test_a_wrong_token_exits_1_and_says_where_the_token_came_from(api, home):
    result = run("rules", "--url", api.url, env={"HOME": str(home), "PROVFW_TOKEN": "not-a-token"})
    assert result.code == 1 and "HTTP 401" in result.err and "$PROVFW_TOKEN" in result.err


def test_credentials_come_from_the_environment_and_the_all_in_one_token_file(api, home, tmp_path):
    state = tmp_path / "aio-state"
    state.mkdir()
    (state / "admin-token").write_text(api.admin + "\n")
    env = {"HOME": str(home), "PROVFW_URL": api.url, "PROVFW_STATE_PATH": str(state)}
    from_file = run("block", "203.0.113.0/24", env=env)
    assert from_file.code == 0, from_file.err

    (state / "admin-token").unlink()
    assert run("blocks", env=env).code == 2, "no token anywhere is a usage error"
    from_env = run("blocks", "-o", "value", env={**env, "PROVFW_TOKEN": api.reader})
    assert (from_env.code, from_env.out) == (0, "203.0.113.0/24\t3\n")
    assert run("blocks", "--token", "wrong", env={**env, "PROVFW_TOKEN": api.reader}).code == 1, \
        "--token wins over $PROVFW_TOKEN"

    home_state = home / ".local" / "state" / "provfw"
    home_state.mkdir(parents=True)
    (home_state / "admin-token").write_text(api.reader + "\n")
    default = run("blocks", "-o", "value", env={"HOME": str(home), "PROVFW_URL": api.url})
    assert (default.code, default.out) == (0, "203.0.113.0/24\t3\n"), "without PROVFW_STATE_PATH: ~/.local/state"


def test_version_after_a_subcommand_prints_the_installed_version():
    expected = f"provfw {importlib.metadata.version('provfw')}\n"
    for argv in (("rules", "--version"), ("block", "--version"), ("--version",)):
        result = run(*argv)
        assert (result.code, result.out) == (0, expected)


# ---------------------------------------------------------------- numbers, whole answers, what a change did

def _keys(schema: str) -> set[str]:
    """The fields of one of the API's answers, as its contract declares them."""
    return set(schemas.SCHEMAS[schema]["properties"])


@pytest.mark.parametrize("argv, option", [
    (["block", "198.18.63.0/24", "--ttl", "inf"], "--ttl"),
    (["block", "198.18.63.0/24", "--ttl", "nan"], "--ttl"),
    (["block", "198.18.63.0/24", "--ttl", "0"], "--ttl"),
    (["block", "198.18.63.0/24", "--ttl", "1e12"], "--ttl"),
    (["rule-add", "198.18.63.0/24", "--ttl", "inf"], "--ttl"),
    (["rule-add", "198.18.63.0/24", "--ttl", "-5"], "--ttl"),
    (["rule-add", "198.18.63.0/24", "--protocol", "tcp", "--from-port", "70000"], "--from-port"),
    (["rule-add", "198.18.63.0/24", "--protocol", "tcp", "--to-port", "-2"], "--to-port"),
    (["rule-add", "198.18.63.0/24", "--protocol", "tcp", "--from-port", "nan"], "--from-port"),
    (["import", "LIST", "--ttl", "inf"], "--ttl"),
    (["import", "LIST", "--ttl", "nan"], "--ttl"),
    (["import", "LIST", "--chunk", "1", "--ttl", "1e12"], "--ttl"),
    (["import", "LIST", "--chunk", "0"], "--chunk"),
    (["import", "LIST", "--chunk", "inf"], "--chunk"),
    (["feed", "add", "f", "http://127.0.0.1:9/l.txt", "--ttl", "inf"], "--ttl"),
    (["feed", "add", "f", "http://127.0.0.1:9/l.txt", "--ttl", "1e12"], "--ttl"),
    (["feed", "add", "f", "http://127.0.0.1:9/l.txt", "--interval", "nan"], "--interval"),
    (["feed", "add", "f", "http://127.0.0.1:9/l.txt", "--interval", "99999999"], "--interval"),
    (["feed", "add", "f", "http://127.0.0.1:9/l.txt", "--from-port", "65536"], "--from-port"),
    (["feed", "set", "f", "--interval", "0"], "--interval"),
    (["feed", "set", "f", "--ttl", "nan"], "--ttl"),
    (["feed", "sync", "f", "--timeout", "nan"], "--timeout"),
    (["feed", "sync", "f", "--timeout", "inf"], "--timeout"),
    (["feed", "sync", "f", "--timeout", "-1"], "--timeout"),
    (["audit", "--limit", "0"], "--limit"),
    (["audit", "--limit", "100000"], "--limit"),
    (["audit", "--limit", "inf"], "--limit"),
    (["rule-delete", "0"], "id"),
    (["rule-delete", str(2**63)], "id"),
    (["rule-show", "nan"], "id"),
])
def test_a_number_out_of_range_or_not_finite_is_a_usage_error_naming_the_option(api, home, capsys, tmp_path, argv,
                                                                                option):
    # Found by a newcomer: --ttl inf and nan ended in a traceback (exit 1), --limit 100000 went to the server
    # (HTTP 400, exit 1) while --limit 0 was a usage error.  Every number the CLI takes is checked as it is read.
    listed = tmp_path / "list.txt"
    listed.write_text("198.18.64.1\n198.18.64.2\n")
    argv = [str(listed) if word == "LIST" else word for word in argv]
    result = admin(capsys, api, *argv)
    command = " ".join(argv[:2] if argv[0] == "feed" else argv[:1])
    assert result.code == 2 and result.out == "", result
    assert result.err.startswith(f"usage: provfw {command} ") and f"argument {option}: " in result.err, result.err
    assert admin(capsys, api, "rules", "-o", "value").out == "", "nothing was sent"


def test_a_number_that_is_not_finite_exits_2_without_a_traceback(api, home):
    result = run("block", "198.18.63.0/24", "--ttl", "inf", "--url", api.url, "--token", api.admin)
    assert result.code == 2 and "Traceback" not in result.err, result.err
    assert "argument --ttl: 'inf' is not a finite number" in result.err


def test_numbers_at_the_ends_of_their_range_are_taken(api, home, capsys, tmp_path):
    assert admin(capsys, api, "rule-add", "198.18.70.0/24", "--ttl", "315360000").code == 0
    assert admin(capsys, api, "rule-add", "198.18.71.0/24", "--ttl", "0.5", "--protocol", "tcp", "--from-port",
                 "1", "--to-port", "65535").code == 0, "a fraction of a second is rounded up, as it always was"
    listed = tmp_path / "list.txt"
    listed.write_text("198.18.72.1\n198.18.72.2\n")
    assert admin(capsys, api, "import", str(listed), "--chunk", "1", "--ttl", "3600.5").code == 0
    for limit in ("1", "1000"):
        audit = admin(capsys, api, "audit", "--limit", limit, "-o", "json")
        assert audit.code == 0 and len(json.loads(audit.out)) == min(int(limit), 4), audit.err


def test_rule_add_says_whether_it_added_renewed_or_kept_the_rule(api, home, capsys):
    # Found by a newcomer: the same rule asked for by a second source printed "added rule" twice.
    first = admin(capsys, api, "rule-add", "198.18.150.0/24", "--source", "ops")
    rule_id = first.out.split()[2].rstrip(":")
    generation = db.provider_fw_generation_get()
    assert first.out == f"added rule {rule_id}: all traffic from 198.18.150.0/24, generation {generation}\n"
    kept = admin(capsys, api, "rule-add", "198.18.150.0/24")
    assert kept.code == 0, kept.err
    assert kept.out == (f"kept rule {rule_id}: all traffic from 198.18.150.0/24 was already live for manual:ops; "
                        f"source manual added, generation {db.provider_fw_generation_get()}\n")
    assert admin(capsys, api, "rule-add", "198.18.150.0/24").code == 1, "the same request again changes nothing"

    admin(capsys, api, "rule-add", "198.18.151.0/24", "--ttl", "60")
    renewed = admin(capsys, api, "rule-add", "198.18.151.0/24")
    assert renewed.code == 0 and renewed.out.startswith(f"renewed rule {int(rule_id) + 1}: all traffic from "
                                                        "198.18.151.0/24, generation ")

    # block: the three rules it wants, already live for another source, are kept (not "0 rules added" alone).
    admin(capsys, api, "block", "198.18.152.0/24", "--source", "ops")
    again = admin(capsys, api, "block", "198.18.152.0/24")
    assert again.code == 0, again.err
    assert again.out == (f"blocked 198.18.152.0/24: 0 rules added, 3 rules kept (already live; source manual "
                         f"added), generation {db.provider_fw_generation_get()}\n")

    # Found at stop 27: a block whose rules this source partly held already called those "kept ... source manual
    # added" too.  The answer now tells the three kinds apart: added, kept for another source, unchanged.
    admin(capsys, api, "rule-add", "198.18.153.0/24", "--protocol", "tcp")                  # manual's already
    admin(capsys, api, "rule-add", "198.18.153.0/24", "--protocol", "udp", "--source", "ops")
    mixed = admin(capsys, api, "block", "198.18.153.0/24")
    assert mixed.code == 0, mixed.err
    assert mixed.out == (f"blocked 198.18.153.0/24: 1 rule added, 1 rule kept (already live; source manual added), "
                         f"1 rule unchanged (already live for manual), generation {db.provider_fw_generation_get()}\n")
    answer = json.loads(admin(capsys, api, "block", "198.18.154.0/24", "-o", "json").out)
    assert (len(answer["rules"]), answer["renewed"], answer["kept"], answer["unchanged"]) == (3, 0, 0, 0)


def test_every_change_prints_the_apis_whole_answer_as_json(api, home, capsys, tmp_path):
    # Found by a newcomer: -o json of rule-add printed a flattened rule plus change_generation, and of import
    # left out notified and non_global_allowed.  Each change prints what the API answered, as it answered it.
    blocked = json.loads(admin(capsys, api, "block", "198.18.160.0/24", "-o", "json").out)
    assert set(blocked) == _keys("BlockAdded") and len(blocked["rules"]) == 3
    unblocked = json.loads(admin(capsys, api, "unblock", "198.18.160.0/24", "-o", "json").out)
    assert set(unblocked) == _keys("BlockRemoved") and unblocked["deleted"] == 3

    added = json.loads(admin(capsys, api, "rule-add", "198.18.162.0/24", "-o", "json").out)
    assert set(added) == _keys("RuleCreated") == {"rule", "generation", "renewed", "notified"}
    assert (added["renewed"], added["notified"]) == (False, True)
    assert added["rule"] == json.loads(admin(capsys, api, "rule-show", str(added["rule"]["id"]), "-o", "json").out)
    deleted = json.loads(admin(capsys, api, "rule-delete", str(added["rule"]["id"]), "-o", "json").out)
    assert deleted == {"deleted": added["rule"]["id"], "generation": added["generation"] + 1}, \
        "an empty 204: the id and its X-Provfw-Generation"

    one = tmp_path / "one.txt"
    one.write_text("198.18.163.1\n198.18.163.2\nbogus\n")
    # One request: its answer exactly, compared with the same request sent over HTTP (a dry run changes nothing).
    dry = json.loads(admin(capsys, api, "import", str(one), "--source", "one", "--dry-run", "-o", "json").out)
    raw = requests.post(f"{api.url}/v1/provider-fw-rules/import", data=one.read_bytes(),
                        params={"protocol": "all", "source": "one", "mode": "add", "format": "plain",
                                "dry_run": "true"},
                        headers={"X-Auth-Token": api.admin, "Content-Type": "text/plain"}, timeout=30)
    assert dry == raw.json()
    imported = json.loads(admin(capsys, api, "import", str(one), "--source", "one", "-o", "json").out)
    assert set(imported) == _keys("ImportResult")
    assert (imported["added"], imported["refused"], imported["notified"], imported["non_global_allowed"]) == \
        (2, 1, True, 0)

    feed = json.loads(admin(capsys, api, "feed", "add", "f1", "http://127.0.0.1:9/l.txt", "-o", "json").out)
    assert set(feed) == _keys("FeedShown") and feed["feed"]["name"] == "f1"
    changed = json.loads(admin(capsys, api, "feed", "set", "f1", "--disable", "-o", "json").out)
    assert set(changed) == {"feed"} and changed["feed"]["enabled"] is False
    admin(capsys, api, "feed", "set", "f1", "--enable")
    due = json.loads(admin(capsys, api, "feed", "sync", "f1", "--no-wait", "-o", "json").out)
    assert set(due) == {"feed"} and due["feed"]["force_next"] is False
    removed = json.loads(admin(capsys, api, "feed", "remove", "f1", "-o", "json").out)
    assert set(removed) == _keys("FeedDeleted") and removed["feed"] == "f1"


def test_a_chunked_import_prints_one_answer_that_sums_every_chunks(api, home, capsys, tmp_path):
    listed = tmp_path / "chunks.txt"
    listed.write_text("198.18.170.1\nbogus\n198.18.170.2\n198.18.170.3\nworse\n198.18.170.1\n")
    merged = json.loads(admin(capsys, api, "import", str(listed), "--chunk", "2", "-o", "json").out)
    assert set(merged) == _keys("ImportResult"), "the fields of one answer"
    assert (merged["added"], merged["duplicate"], merged["refused"]) == (3, 1, 2)
    assert [r["line"] for r in merged["refused_lines"]] == [2, 5], "numbered in the file"
    assert merged["notified"] is True and merged["non_global_allowed"] == 0
    assert merged["generation"] == db.provider_fw_generation_get(), "the last chunk's"


def test_feed_sync_prints_the_feed_it_waited_for_as_the_api_answers_it(api, home, capsys, conf):
    conf.set_override("min_interval", 60, group="feeds")
    server = FeedServer()
    syncer = conductor_feeds.FeedSyncer(conf, None, host="cli-test-conductor")
    stop = threading.Event()

    def conductor():                                  # the conductor's feed syncer, polling every 50 ms
        while not stop.wait(0.05):
            syncer.run_due()

    thread = threading.Thread(target=conductor, daemon=True)
    thread.start()
    try:
        server.publish("/drop.txt", data_file("feeds", "spamhaus-drop.txt"))
        admin(capsys, api, "feed", "add", "drop", server.url("/drop.txt"), "--interval", "3600")
        synced = admin(capsys, api, "feed", "sync", "drop", "--timeout", "20", "-o", "json")
        assert synced.code == 0, synced.err
        answer = json.loads(synced.out)
        assert set(answer) == _keys("FeedShown") and answer["feed"]["last_status"] == "ok"
        assert answer["feed"]["rules"] == 4
    finally:
        stop.set()
        thread.join(10)
        server.close()
