"""The ``provfw`` CLI's parser, command registry and printing, without a server."""

from __future__ import annotations

import argparse

import pytest

from provfw import cli
from provfw.api import schemas
from provfw.cli import commands, output
from provfw.cli.output import Column, Result


def _positionals(command: commands.Command) -> list[str]:
    return ["1" for flags, _ in command.arguments if not flags[0].startswith("-")]


@pytest.mark.parametrize("name", sorted(commands.COMMANDS))
def test_every_command_takes_the_common_options_before_and_after_its_name(name):
    words, values = name.split(), _positionals(commands.COMMANDS[name])
    parser = cli.build_parser()
    after = parser.parse_args([*words, *values, "-o", "value", "--url", "http://h:1", "--token", "t", "-c", "x"])
    before = parser.parse_args(["-o", "value", "--url", "http://h:1", "--token", "t", "-c", "x", *words, *values])
    for args in (after, before):
        parsed = (args.command, args.output, args.url, args.token, args.columns)
        assert parsed == (name, "value", "http://h:1", "t", ["x"])
    assert parser.parse_args([*words, *values, "--json"]).output == "json"
    assert not hasattr(parser.parse_args([*words, *values]), "output"), "defaults are applied after parsing"


@pytest.mark.parametrize("name", sorted(commands.COMMANDS))
def test_every_command_prints_the_version(name, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args([*name.split(), "--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"provfw {cli.version()}\n"


def test_a_command_named_with_a_space_becomes_a_subcommand_of_its_group(monkeypatch):
    def feed_list(client, args):
        return Result([], [])

    monkeypatch.setitem(commands.COMMANDS, "feed list",
                        commands.Command("feed list", "list feeds", (commands.arg("--enabled", action="store_true"),),
                                         (Column("name"),), feed_list))
    monkeypatch.setitem(commands.COMMANDS, "feed sync",
                        commands.Command("feed sync", "sync a feed", (commands.arg("name"),), (Column("name"),),
                                         feed_list))
    parser = cli.build_parser()
    args = parser.parse_args(["feed", "-o", "json", "list", "--enabled", "--token", "t"])
    assert (args.command, args.output, args.enabled, args.token) == ("feed list", "json", True, "t")
    assert parser.parse_args(["feed", "sync", "spamhaus"]).name == "spamhaus"
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["feed"])
    assert exited.value.code == 2


def test_a_command_cannot_be_registered_twice():
    with pytest.raises(ValueError):
        commands.command("rules", "again", columns="rule")(lambda client, args: None)


def test_empty_values_print_as_a_dash_and_control_characters_escaped():
    assert [output.cell(v) for v in (None, "", [], {}, 0, False, True, 1.5, ["a", None])] == \
        ["-", "-", "-", "-", "0", "false", "true", "1.5", "a, -"]
    assert output.cell("a\tb\nc\x1b") == "a\\tb\\nc\\x1b"
    assert output.cell({"b": 1, "a": None}) == '{"a":null,"b":1}'


def test_value_output_is_one_line_per_row_tab_separated_in_column_order():
    columns = (Column("id"), Column("cidr"), Column("note", lambda row: row.get("description")))
    rows = [{"id": 1, "cidr": "192.0.2.0/24", "description": "two\nlines"}, {"id": 2, "cidr": "::/1"}]
    result = Result(rows, rows)
    assert output.render(result, columns, "value") == ["1\t192.0.2.0/24\ttwo\\nlines", "2\t::/1\t-"]
    assert output.render(result, columns, "value", ["cidr", "id"]) == ["192.0.2.0/24\t1", "::/1\t2"]
    assert output.render(Result([], []), columns, "value") == []


def test_a_table_aligns_columns_under_their_names():
    rows = [{"host": "hv-1", "state": "up"}, {"host": "hypervisor-22", "state": None}]
    assert output.render(Result(rows, rows), (Column("host"), Column("state")), "table") == [
        "host           state",
        "hv-1           up",
        "hypervisor-22  -",
    ]
    assert output.render(Result([], [], empty="no workers"), (Column("host"),), "table") == ["no workers"]


def test_the_quarantined_column_appears_when_the_api_reports_quarantine():
    old = [{"host": "hv-1", "state": "up", "last_error": None}]
    new = [{"host": "hv-1", "state": "up", "last_error": None,
            "quarantine": [{"id": 7, "cidr": "192.0.2.0/24", "reason": "kernel refused"}]},
           {"host": "hv-2", "state": "up", "last_error": None, "quarantine": []}]
    columns = commands.COMMANDS["services"].columns
    assert "quarantined" not in output.render(Result(old, old), columns, "table")[0].split()
    header, first, second = output.render(Result(new, new), columns, "table")
    at = header.split().index("quarantined")
    assert (first.split()[at], second.split()[at]) == ("1", "0")
    assert output.render(Result(old, old), columns, "value", ["host", "quarantined"]) == ["hv-1\t-"]


def test_a_mutation_prints_its_sentence_in_a_table_and_its_answer_in_json():
    result = Result({"message": "Added 3 rules", "generation": 4}, [{"cidr": "192.0.2.0/24", "added": 3}],
                    "blocked 192.0.2.0/24: 3 rules added, generation 4", ["  a detail"])
    columns = (Column("cidr"), Column("added"))
    assert output.render(result, columns, "table") == ["blocked 192.0.2.0/24: 3 rules added, generation 4",
                                                       "  a detail"]
    assert output.render(result, columns, "table", ["added"]) == ["added", "3"], "-c asks for columns"
    assert output.render(result, columns, "json") == ["{", '  "generation": 4,', '  "message": "Added 3 rules"', "}"]
    assert output.render(result, columns, "value") == ["192.0.2.0/24\t3"]


def test_one_object_prints_as_field_value_lines():
    rule = {"id": 7, "cidr": "192.0.2.0/24", "description": None}
    lines = output.render(Result(rule, [rule], record=True), (Column("id"), Column("cidr"), Column("description")))
    assert lines == ["id           7", "cidr         192.0.2.0/24", "description  -"]


def test_an_unknown_column_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown column 'colour' \(choose from id, cidr"):
        output.visible_columns(commands.COMMANDS["rules"].columns, [], ["colour"])


@pytest.mark.parametrize("rule, words", [
    ({"protocol": "all", "from_port": -1, "to_port": -1, "cidr": "c"}, "all traffic from c"),
    ({"protocol": "tcp", "from_port": 1, "to_port": 65535, "cidr": "c"}, "all tcp from c"),
    ({"protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "c"}, "udp port 53 from c"),
    ({"protocol": "tcp", "from_port": 8000, "to_port": 8080, "cidr": "c"}, "tcp ports 8000-8080 from c"),
    ({"protocol": "icmp", "from_port": -1, "to_port": -1, "cidr": "c"}, "all icmp from c"),
    ({"protocol": "icmp", "from_port": 3, "to_port": 4, "cidr": "c"}, "icmp type 3 code 4 from c"),
])
def test_a_rule_is_described_in_words(rule, words):
    assert commands.describe_rule(rule) == words


def test_the_chunk_size_must_be_positive():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["import", "f", "--chunk", "0"])
    with pytest.raises(argparse.ArgumentTypeError):
        commands.Number(1)("x")


_NUMBERS = {"ttl", "from_port", "to_port", "id", "chunk", "interval", "timeout", "limit"}


@pytest.mark.parametrize("name", sorted(commands.COMMANDS))
def test_every_number_a_command_takes_is_read_by_the_one_number_type(name):
    # A newcomer's --ttl inf ended in a traceback: it was a bare float, while feed add's --ttl had its own type.
    for flags, options in commands.COMMANDS[name].arguments:
        dest = options.get("dest") or flags[-1].lstrip("-").replace("-", "_")
        if "type" in options or dest in _NUMBERS:
            assert isinstance(options.get("type"), commands.Number), (name, flags)


@pytest.mark.parametrize("text, number, value", [
    ("5", commands.Number(1), 5), (" 7 ", commands.Number(1), 7), ("-1", commands.PORT, -1),
    ("65535", commands.PORT, 65535), ("0.5", commands.SECONDS, 1), ("3600.2", commands.SECONDS, 3601),
    ("1e3", commands.SECONDS, 1000), ("315360000", commands.SECONDS, 315360000), ("0", commands.Number(0), 0),
    ("0.1", commands.Number(0, fractions=True), 1),
])
def test_a_number_in_range_is_read_whole_and_a_fraction_rounded_up_where_taken(text, number, value):
    assert number(text) == value


@pytest.mark.parametrize("text, number, message", [
    ("inf", commands.SECONDS, "'inf' is not a finite number"),
    ("nan", commands.SECONDS, "'nan' is not a finite number"),
    ("1e400", commands.SECONDS, "'1e400' is not a finite number"),
    ("inf", commands.Number(1), "'inf' is not a whole number"),
    ("22.5", commands.PORT, "'22.5' is not a whole number"),
    ("x", commands.SECONDS, "'x' is not a number"),
    ("0", commands.SECONDS, "must be from 1 to 315360000, not 0"),
    ("-0.5", commands.SECONDS, "must be from 1 to 315360000, not -0.5"),
    ("315360000.5", commands.SECONDS, "must be from 1 to 315360000, not 315360000.5"),
    ("65536", commands.PORT, "must be from -1 to 65535, not 65536"),
    ("0", commands.Number(1), "must be at least 1, not 0"),
    ("9" * 5000, commands.RULE_ID, "must be from 1 to 9223372036854775807, not 99999999999999999999..."),
    ("\u0661\u0662\u0663", commands.PORT, "'\u0661\u0662\u0663' is not a number in ASCII digits"),   # Arabic-Indic 123
    ("\u0661\u0665", commands.RULE_ID, "'\u0661\u0665' is not a number in ASCII digits"),
    ("1_000", commands.SECONDS, "'1_000' is not a number in ASCII digits"),
])
def test_a_number_not_finite_not_whole_or_out_of_range_is_refused_saying_why(text, number, message):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        number(text)
    assert str(refused.value) == message


def test_the_clis_ranges_are_the_apis():
    def bounds(schema):
        return schema["minimum"], schema["maximum"]

    assert (commands.SECONDS.low, commands.SECONDS.high) == bounds(schemas.TTL)
    assert (commands.PORT.low, commands.PORT.high) == bounds(schemas.PORT)
    assert (commands.RULE_ID.low, commands.RULE_ID.high) == bounds(schemas.RULE_ID)
    assert (1, commands.MAX_FEED_INTERVAL) == bounds(schemas.SCHEMAS["FeedCreate"]["properties"]["interval"]) == \
        bounds(schemas.SCHEMAS["FeedUpdate"]["properties"]["interval"])
    assert (1, commands.MAX_AUDIT_LIMIT) == bounds(schemas.OPERATIONS["audit_log"].query["limit"])
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["audit", "--limit", str(commands.MAX_AUDIT_LIMIT + 1)])
    assert exited.value.code == 2
    assert parser.parse_args(["audit", "--limit", str(commands.MAX_AUDIT_LIMIT)]).limit == commands.MAX_AUDIT_LIMIT


def _answer(start, added, refused_lines=(), notified=True, **more):
    return start, {"added": added, "renewed": 0, "duplicate": 1, "removed": 0, "deleted": 0,
                   "refused": len(refused_lines), "refused_lines": [{"line": n, "value": "x", "reason": "bad"}
                                                                    for n in refused_lines],
                   "generation": 3 + start, "source": "import:l", "mode": "add", "format": "plain",
                   "dry_run": False, "non_global_allowed": 1, "guard": None, "preview": None, "notified": notified,
                   **more}


def test_one_import_answer_prints_as_the_api_sent_it_and_chunks_sum_into_one():
    single = _answer(0, 2, [3], future="kept")[1]
    assert commands.merge_import_answers([(0, single)]) == single
    merged = commands.merge_import_answers([_answer(0, 2, [1]), _answer(4, 0, [2], notified=None),
                                            _answer(8, 3, [], notified=False)])
    assert set(merged) == set(single) - {"future"}
    assert (merged["added"], merged["duplicate"], merged["refused"], merged["non_global_allowed"]) == (5, 3, 2, 3)
    assert [r["line"] for r in merged["refused_lines"]] == [1, 6]
    assert (merged["generation"], merged["notified"]) == (11, False)
    unchanged = commands.merge_import_answers([_answer(0, 0, notified=None), _answer(4, 0, notified=None)])
    assert unchanged["notified"] is None


@pytest.mark.parametrize("argv", [["import", "list.txt", "--mode", "replace"],
                                  ["import", "-", "--mode", "replace", "--dry-run"]])
def test_a_replace_without_a_source_is_a_usage_error_sent_nowhere(argv, capsys):
    # Exit 2 before any token or URL is looked at: nothing was sent, and the message says what to add.
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--url", "http://127.0.0.1:9", "--token", "t"])
    assert info.value.code == 2
    assert "--mode replace needs --source NAME" in capsys.readouterr().err
